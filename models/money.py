"""Money: Decimal amounts in a currency's minor unit, rounded half-up. Never a float.

The minor units (ISO 4217 exponents) come from the maintained `iso4217` package.
"""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import iso4217

from models.errors import DomainError

ZERO = Decimal(0)


@functools.lru_cache(maxsize=512)
def minor_unit(currency: str) -> int:
    """Decimals of the currency's minor unit: 2 for USD, 0 for JPY, 3 for BHD."""
    try:
        exponent = iso4217.Currency(currency).exponent
    except (ValueError, KeyError, TypeError):
        raise DomainError("unknown-currency", f"{currency!r} is not an ISO 4217 currency code") from None
    if exponent is None:
        raise DomainError("unknown-currency", f"{currency} is not a currency that invoices can use (it has no minor unit)")
    return exponent


def is_currency(currency: str) -> bool:
    try:
        minor_unit(currency)
    except DomainError:
        return False
    return True


# currency → its minor unit as a Decimal quantum (0.01 for USD); filled by valid currencies only.
_QUANTA: dict[str, Decimal] = {}


def quantum(currency: str) -> Decimal:
    """The currency's minor unit as a Decimal (0.01 for USD). Also for formatting many amounts an
    invoice holds: `str(amount.quantize(q, ROUND_HALF_UP))` is format_money without its checks,
    which such amounts have passed (round_money made them, or a Numeric(20, 4) column held them).
    An invoice.created event formats 17 amounts for an invoice of 3 lines. The hot paths below
    read _QUANTA first and call this only for a currency not seen yet (a call less per amount)."""
    q = _QUANTA.get(currency)
    if q is None:
        q = _QUANTA[currency] = Decimal(1).scaleb(-minor_unit(currency))
    return q


# Money columns are Numeric(20, 4): sixteen digits before the point. A computed amount beyond
# that (1,000 lines of 10^11 each, a quantity of 10^8 at 10^11) is rejected, never a database error.
MONEY_DIGITS = 16


def round_money(amount: Decimal, currency: str, *, field: str = "amount") -> Decimal:
    """Computed amounts are rounded half-up to the currency's minor unit, and must fit the columns."""
    # adjusted(): the exponent of the leading digit, ≥ 16 exactly when |amount| ≥ 10^16 (and not zero)
    if not amount.is_finite() or (amount and amount.adjusted() >= MONEY_DIGITS):
        raise DomainError("amount-too-large", f"{field} {amount:.4E} is beyond what an invoice can hold "
                                              f"(less than 10^16 {currency})")
    return amount.quantize(_QUANTA.get(currency) or quantum(currency), ROUND_HALF_UP)


def too_precise(amount: Decimal, currency: str) -> bool:
    """More decimals than the currency's minor unit allows, trailing zeros aside ("10.000" is
    10.00 for USD): the amount is not its own rounding. (A quantize and a compare take ~90 ns,
    reading the exponent from as_tuple() ~260 ns.)"""
    try:
        return amount != amount.quantize(_QUANTA.get(currency) or quantum(currency))
    except InvalidOperation:  # more digits than the context holds: compare the exponents
        exponent = amount.normalize().as_tuple().exponent
        return isinstance(exponent, int) and -exponent > minor_unit(currency)


def money(value: Decimal | int | str, currency: str, *, field: str = "amount") -> Decimal:
    """A given amount: exact, finite, and with no more decimals than the currency allows."""
    if isinstance(value, Decimal) and value.is_finite():
        # The usual case in one quantize: an amount that is its own rounding and fits the columns.
        try:
            rounded = value.quantize(_QUANTA.get(currency) or quantum(currency), ROUND_HALF_UP)
        except InvalidOperation:  # more digits than the context holds: the checks below say which
            rounded = None
        if rounded == value and (not rounded or rounded.adjusted() < MONEY_DIGITS):
            return rounded
    try:
        amount = Decimal(value) if not isinstance(value, Decimal) else value
    except (InvalidOperation, TypeError, ValueError):
        raise DomainError("invalid-amount", f"{field} {value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise DomainError("invalid-amount", f"{field} must be a finite number, got {value}")
    if too_precise(amount, currency):
        raise DomainError(
            "invalid-amount",
            f"{field} {amount} has more decimals than {currency} allows ({minor_unit(currency)})",
        )
    return round_money(amount, currency, field=field)


def format_money(amount: Decimal, currency: str) -> str:
    """The contract's decimal string for an amount: '120.50'."""
    return str(round_money(amount, currency))
