"""How numbers are written in tables: significant digits, compact forms, one format per column."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """A metric value for display: ``digits`` significant digits, '—' for null."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.{digits}g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.{digits - 1}e}"
    return str(value)


def fmt_compact(value: Any) -> str:
    """A value in at most 7 characters, 3 significant digits: ``0.0131``, ``0.997``, ``8.60e-4``, ``1.23e4``."""
    if not isinstance(value, float) or value == 0 or not math.isfinite(value):
        return fmt(value)
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def column_format(values: Sequence[Any]) -> Callable[[Any], str]:
    """One format for a whole column: fixed decimals (3 significant digits on the smallest value) when every value
    lies in [1e-3, 1e5), else scientific notation for all."""
    nonzero = [abs(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v != 0]
    if not nonzero:
        return lambda v: fmt(v)
    if min(nonzero) >= 1e-3 and max(nonzero) < 1e5:
        decimals = max(0, min(6, 2 - math.floor(math.log10(min(nonzero)))))
        return lambda v: "—" if v is None else f"{v:.{decimals}f}"
    return lambda v: "—" if v is None else f"{v:.2e}"


def fmt_signed(value: Any, digits: int = 4) -> str:
    """A change: :func:`fmt` with its sign (``+0.0123``, ``-4.5e-3``, ``0``)."""
    text = fmt(value, digits)
    return f"+{text}" if isinstance(value, (int, float)) and value > 0 else text


def fmt_percent(value: Any, digits: int = 3) -> str:
    """A relative change as a signed percentage through :func:`fmt` (``+12.5 %``); '—' for null."""
    if not isinstance(value, (int, float)):
        return fmt(value)
    return f"{fmt_signed(100.0 * value, digits)} %"
