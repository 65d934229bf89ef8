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


#: A value whose relative uncertainty reaches this is printed as undetermined (its magnitude only).
UNDETERMINED = 1.0


def fmt_uncertain(value: Any, uncertainty: float | None, digits: int = 4, *, compact: bool = False) -> str:
    """A metric value with the digits its uncertainty leaves: ``-0.016 ±31%``, ``0.2002 ±0.025%``, ``8.600e-04``,
    ``~2e-2 (undetermined)``. Every renderer prints uncertain values through this function.

    Parameters
    ----------
    value
        The value (None: '—').
    uncertainty
        Its relative uncertainty (``details.uncertainty[key]``); None when unknown: the value is printed as
        :func:`fmt` (or :func:`fmt_compact`) prints it.
    digits
        The most significant digits shown (3 when ``compact``).
    compact
        The short forms of :func:`fmt_compact` (``8.60e-4``) for tables with many columns.

    Notes
    -----
    The value is rounded to the decade of its absolute uncertainty delta = uncertainty * |value| (the last digit
    shown is the first uncertain one) and the relative uncertainty follows in percent, two significant digits. Below
    10^-digits the uncertainty does not reach the digits shown and is left out. At ``UNDETERMINED`` (100 %) or more
    not even the first digit is determined: only the magnitude is shown, ``~2e-2 (undetermined)``.
    """
    digits = 3 if compact else digits
    plain = fmt_compact if compact else (lambda v: fmt(v, digits))
    if not isinstance(value, float) or not math.isfinite(value) or uncertainty is None or math.isnan(uncertainty):
        return plain(value)
    if uncertainty >= UNDETERMINED:
        if value == 0:
            return "~0 (undetermined)"
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"~{mantissa}e{int(exponent)} (undetermined)"
    if uncertainty <= 10.0**-digits or value == 0:
        return plain(value)
    magnitude = math.floor(math.log10(abs(value)))
    significant = max(1, min(digits, magnitude - math.floor(math.log10(uncertainty * abs(value))) + 1))
    if 1e-3 <= abs(value) < 1e5 and magnitude < significant:
        text = f"{value:.{max(0, significant - 1 - magnitude)}f}"
    else:
        mantissa, exponent = f"{value:.{significant - 1}e}".split("e")
        text = f"{mantissa}e{int(exponent)}" if compact else f"{mantissa}e{exponent}"
    return f"{text} ±{_percent(uncertainty)}"


def _percent(uncertainty: float) -> str:
    """A relative uncertainty in percent, two significant digits: ``31%``, ``0.52%``, ``0.0031%``."""
    pct = 100.0 * uncertainty
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"
