"""Field types of the message schemas: strict where money and ids are concerned."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, GetCoreSchemaHandler, StringConstraints, ValidationError
from pydantic_core import core_schema as cs

from models.money import is_currency

# Amounts below 10^12: with up to 1,000 lines and quantities below 10^6 every computed amount
# still fits the money columns (Numeric(20, 4)); what a computation pushes past them is rejected
# `amount-too-large` by the domain.
MAX_DIGITS = 12
# A decimal string: digits (ASCII only), an optional point, an optional sign; no exponent, no
# underscores, no NaN or Infinity (all of which Python's Decimal would take).
DECIMAL_TEXT = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$"


def _step(schema: cs.CoreSchema, error: str, message: str) -> cs.CoreSchema:
    return cs.custom_error_schema(schema, custom_error_type=error, custom_error_message=message)


def decimal_schema(*steps: tuple[dict[str, Any], str, str]) -> cs.CoreSchema:
    """An amount as pydantic-core checks it, with no Python call: a decimal string ("120.50",
    surrounding blanks ignored) or a JSON number (an integer, or a finite float through its
    shortest repr, so 0.1 stays 0.1 and 0.30000000000000004 is caught by the decimals check), or
    a Decimal; never a boolean. Then each step: decimal constraints and the message when one
    fails. (Python validators cost ~0.3 µs a field, eight fields an imported invoice of 3 lines.)"""
    parse = cs.union_schema([
        cs.chain_schema([cs.str_schema(strict=True, strip_whitespace=True, pattern=DECIMAL_TEXT),
                         cs.decimal_schema()]),
        cs.chain_schema([cs.int_schema(strict=True), cs.decimal_schema()]),
        cs.chain_schema([cs.float_schema(strict=True, allow_inf_nan=False), cs.decimal_schema()]),
        cs.decimal_schema(strict=True, allow_inf_nan=False),
    ], mode="left_to_right")
    return cs.chain_schema([
        _step(parse, "decimal_text", 'must be a decimal string like "120.50", or a finite JSON number (not a boolean)'),
        _step(cs.decimal_schema(lt=Decimal(10) ** MAX_DIGITS, gt=-Decimal(10) ** MAX_DIGITS), "amount_too_large",
              f"is too large (at most {MAX_DIGITS} digits before the decimal point)"),
        *(_step(cs.decimal_schema(**constraints), error, message) for constraints, error, message in steps),
    ])


class DecimalField:
    """Annotated[Decimal, DecimalField(...)]: a decimal_schema with these steps."""

    def __init__(self, *steps: tuple[dict[str, Any], str, str]) -> None:
        self.steps = steps

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> cs.CoreSchema:
        return decimal_schema(*self.steps)


NOT_NEGATIVE = ({"ge": Decimal(0)}, "amount_negative", "may not be negative")
POSITIVE = ({"gt": Decimal(0)}, "amount_not_positive", "must be greater than zero")


def _currency(value: str) -> str:
    if not is_currency(value):
        raise ValueError(f"{value!r} is not an ISO 4217 currency code with a minor unit")
    return value


Amount = Annotated[Decimal, DecimalField(NOT_NEGATIVE)]
PositiveAmount = Annotated[Decimal, DecimalField(POSITIVE)]
Quantity = Annotated[Decimal, DecimalField(
    POSITIVE,
    ({"lt": Decimal(1_000_000)}, "quantity_too_large", "must be below 1,000,000"),
    # multiple_of rather than decimal_places: the same rule (1.1000000 passes), and no as_tuple()
    ({"multiple_of": Decimal("0.000001")}, "quantity_decimals", "may have at most 6 decimals"),
)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$"), AfterValidator(_currency)]


# Text PostgreSQL can keep: no NUL character (pattern), no lone UTF-16 surrogate (pydantic-core
# refuses one as string_unicode when it reads the text for the pattern). JSON can carry both.
# describe_validation (below) words both errors plainly. Checked in pydantic-core, not by a Python
# validator: eleven strings an imported invoice.
STORABLE = r"^[^\x00]*$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True, pattern=STORABLE)]
Short = Annotated[str, StringConstraints(max_length=200, pattern=STORABLE)]
# Values kept in 50-character columns (paymentTerms, paymentMethod, cardBrand, provider).
Code = Annotated[str, StringConstraints(max_length=50, pattern=STORABLE)]
Text = Annotated[str, StringConstraints(max_length=10_000, pattern=STORABLE)]


def _message(err: Any) -> str:
    """pydantic's message, or ours where its own says less (the storable-text pattern)."""
    if err["type"] == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == STORABLE:
        return "may not contain a NUL character"
    if err["type"] == "string_unicode":
        return "contains a lone surrogate, which is not text"
    return err["msg"]


def describe_validation(exc: ValidationError) -> str:
    """Every wrong field of a message, named and explained (the first ten), in one line."""
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {_message(err)}")
    more = len(exc.errors()) - 10
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
