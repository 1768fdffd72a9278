"""Money is exact: integer micro-dollars inside, decimal strings at the edges. Never float."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
#: The largest amount taken anywhere (a trillion dollars): sums stay far inside a 64-bit integer.
MAX_MICROS = 10**18


def usd_to_micros(text: str) -> int:
    """``"12.5"`` -> ``12500000``; refuses negatives, non-numbers and sub-micro-dollar precision."""
    try:
        amount = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        raise ValueError(f"{text!r} is not an amount in USD") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{text!r} must be a finite amount of at least 0")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{text!r} is more precise than a micro-dollar")
    if micros > MAX_MICROS:
        raise ValueError(f"{text!r} is larger than the {MAX_MICROS // MICROS_PER_USD} USD the gateway handles")
    return int(micros)


def micros_to_usd(micros: int) -> str:
    """``12500000`` -> ``"12.50"``: at least cents, more digits only where they matter."""
    amount = Decimal(micros) / MICROS_PER_USD
    text = f"{amount:f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{whole}.{fraction}"
