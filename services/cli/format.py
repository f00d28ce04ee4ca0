"""How the CLI prints: tables, enum names and money. Pure functions, no gRPC (unit-tested).

One style for every command: UPPERCASE headers, columns separated by two spaces, enum values in
UPPERCASE without their proto prefix, money as a decimal string (never a float in JSON).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

# Amounts are summed per row from per-million prices; micro-dollars keep every cent exact and the
# sub-cent detail of a few tokens visible (0.05 USD/M * 1 token = 0.00000005 USD rounds to 0.000000).
MONEY_PLACES = Decimal("0.00000001")


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns; headers are upper-cased so every table looks the same."""
    cells = [[h.upper() for h in header], *[[_cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """ADAPTER_STATUS_READY -> READY: the one way an enum value is printed (enum: a proto enum)."""
    return enum.Name(value).removeprefix(prefix)


def enum_choices(enum: Any, prefix: str) -> list[str]:
    """The printable names of an enum, without its UNSPECIFIED zero value."""
    return [
        n.removeprefix(prefix)
        for n in (v.name for v in enum.DESCRIPTOR.values)
        if not n.endswith("_UNSPECIFIED")
    ]


def enum_arg(enum: Any, prefix: str) -> Callable[[str], int]:
    """An argparse `type` that accepts an enum value in any case: ARCHIVED, archived, Archived."""
    choices = enum_choices(enum, prefix)

    def parse(text: str) -> int:
        name = text.strip().upper().removeprefix(prefix)
        if name not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)} (any case)")
        return int(enum.Value(prefix + name))

    parse.__name__ = prefix.rstrip("_").lower()
    parse.choices = choices  # type: ignore[attr-defined]  # read by the completion script
    return parse


def decimal_text(value: float) -> str:
    """A float price as the shortest exact decimal string: 0.05 -> '0.05', 1e-07 -> '0.0000001'."""
    return format(Decimal(repr(value)), "f")


def money(amount: float | Decimal | str) -> str:
    """A USD amount as a decimal string with 8 places: 5.305e-05 -> '0.00005305'.

    Floats go through repr (the shortest string that round-trips) so no binary noise is added.
    """
    if isinstance(amount, float):
        amount = repr(amount)
    value = amount if isinstance(amount, Decimal) else Decimal(amount)
    return format(value.quantize(MONEY_PLACES, rounding=ROUND_HALF_EVEN), "f")
