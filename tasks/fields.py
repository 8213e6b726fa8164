"""Field types of the message schemas: strict where money and ids are concerned."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

from models.money import is_currency

DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
# Amounts below 10^12: with up to 1,000 lines and quantities below 10^6 every computed amount
# still fits the money columns (Numeric(20, 4)); what a computation pushes past them is rejected
# `amount-too-large` by the domain.
MAX_DIGITS = 12


def _to_decimal(value: Any) -> Decimal:
    """Amounts are decimal strings ("120.50"); JSON numbers are accepted too, a float through its
    shortest repr, so 0.1 stays 0.1 and 0.30000000000000004 is caught by the decimals check."""
    if isinstance(value, str):  # the usual case first
        text = value.strip()
        if not DECIMAL.match(text):
            raise ValueError(f"must be a decimal string like \"120.50\", got {value[:40]!r}")
        try:
            result = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"must be a decimal string like \"120.50\", got {value[:40]!r}") from None
    elif isinstance(value, bool):
        raise ValueError("must be a decimal string, not a boolean")
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        result = Decimal(repr(value))
    elif isinstance(value, Decimal):
        result = value
    else:
        raise ValueError(f"must be a decimal string, got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError("must be a finite number")
    if result.adjusted() >= MAX_DIGITS:
        raise ValueError(f"is too large (at most {MAX_DIGITS} digits before the decimal point)")
    return result


def _not_negative(value: Decimal) -> Decimal:
    if value < 0:
        raise ValueError("may not be negative")
    return value


def _positive(value: Decimal) -> Decimal:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _currency(value: str) -> str:
    if not is_currency(value):
        raise ValueError(f"{value!r} is not an ISO 4217 currency code with a minor unit")
    return value


Amount = Annotated[Decimal, BeforeValidator(_to_decimal), AfterValidator(_not_negative)]
PositiveAmount = Annotated[Decimal, BeforeValidator(_to_decimal), AfterValidator(_positive)]


def _quantity(value: Decimal) -> Decimal:
    if value.adjusted() >= 6:
        raise ValueError("must be below 1,000,000")
    if -value.as_tuple().exponent > 6 and -value.normalize().as_tuple().exponent > 6:  # type: ignore[operator]
        raise ValueError("may have at most 6 decimals")
    return value


Quantity = Annotated[Decimal, BeforeValidator(_to_decimal), AfterValidator(_positive), AfterValidator(_quantity)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$"), AfterValidator(_currency)]
def _storable(value: str) -> str:
    """Text PostgreSQL can keep: no NUL character, no lone UTF-16 surrogate (JSON can carry both)."""
    if "\x00" in value:
        raise ValueError("may not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate, which is not text") from None
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True), AfterValidator(_storable)]
Short = Annotated[str, StringConstraints(max_length=200), AfterValidator(_storable)]
# Values kept in 50-character columns (paymentTerms, paymentMethod, cardBrand, provider).
Code = Annotated[str, StringConstraints(max_length=50), AfterValidator(_storable)]
Text = Annotated[str, StringConstraints(max_length=10_000), AfterValidator(_storable)]
Percent = Annotated[Decimal, BeforeValidator(_to_decimal), Field(ge=0, le=100)]
