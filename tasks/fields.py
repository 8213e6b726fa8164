"""Field types of the message schemas: strict where money and ids are concerned."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

from models.money import is_currency

DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
MAX_DIGITS = 18


def _to_decimal(value: Any) -> Decimal:
    """Amounts are decimal strings ("120.50"); JSON numbers are accepted too, a float through its
    shortest repr, so 0.1 stays 0.1 and 0.30000000000000004 is caught by the decimals check."""
    if isinstance(value, bool):
        raise ValueError("must be a decimal string, not a boolean")
    if isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        result = Decimal(repr(value))
    elif isinstance(value, str):
        text = value.strip()
        if not DECIMAL.match(text):
            raise ValueError(f"must be a decimal string like \"120.50\", got {value[:40]!r}")
        try:
            result = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"must be a decimal string like \"120.50\", got {value[:40]!r}") from None
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
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$"), AfterValidator(_currency)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
Short = Annotated[str, StringConstraints(max_length=200)]
Text = Annotated[str, StringConstraints(max_length=10_000)]
Percent = Annotated[Decimal, BeforeValidator(_to_decimal), Field(ge=0, le=100)]
