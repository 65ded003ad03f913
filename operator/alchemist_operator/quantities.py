"""Kubernetes resource quantities ("8Gi", "500m", 4) turned into numbers the worker reads without parsing."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

# Plain decimal numbers with an optional binary or decimal suffix: the forms people write in manifests.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str | int) -> Decimal:
    """The quantity's value in base units (bytes for memory, cores for CPU)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"quantity must not be negative, got {value}")
        return Decimal(value)
    text = value.strip()
    number = text.rstrip("kKMGTPEim")
    suffix = text[len(number) :]
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"unknown quantity suffix in {value!r}; use one of {', '.join(s for s in _SUFFIXES if s)}"
        )
    try:
        parsed = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a quantity like '8Gi', '500m' or '4'") from None
    if parsed < 0 or not parsed.is_finite():
        raise ValueError(f"quantity must be a finite non-negative number, got {value!r}")
    return parsed * _SUFFIXES[suffix]


def quantity_bytes(value: str | int) -> int:
    """Whole bytes of a memory quantity (rounded up, as the kubelet does)."""
    amount = parse_quantity(value)
    whole = int(amount)
    return whole if whole == amount else whole + 1
