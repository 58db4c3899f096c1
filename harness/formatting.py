"""Numbers as a reader sees them in a table: one notation and one number of decimals per column, so
that a column reads down (0.626 above 0.627, not 0.626 above 0.6271), scientific notation only when
the column spans decades or holds very large or very small values."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, TypeGuard

__all__ = ["Estimate", "column", "duration", "number", "ordinary_limit", "plain"]

MISSING = "—"
SIGNIFICANT = 3  # of the column's largest value, in fixed notation
MIN_SIGNIFICANT = 2  # of its smallest non-zero value
MAX_DECIMALS = 6
OUTLIER = 100.0  # a value over this × the typical magnitude dwarfs the others (a diverged run's loss)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean and the half-width of its interval, shown as `mean ± half` in its column's notation."""

    value: float | None
    half_width: float | None = None


def _numeric(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scientific(value: float, digits: int = SIGNIFICANT) -> str:
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def ordinary_limit(magnitudes: Sequence[float]) -> float:
    """The largest magnitude that does not dwarf the others: OUTLIER × the lower median of the
    non-zero magnitudes (infinite when there is nothing to compare with). Tables write a value
    beyond it apart; figures clip a series whose peak is beyond it."""
    nonzero = sorted(abs(m) for m in magnitudes if m != 0)
    return OUTLIER * nonzero[(len(nonzero) - 1) // 2] if len(nonzero) >= 2 else math.inf


def _style(values: Sequence[float]) -> tuple[str, int, float]:
    """('int' | 'fixed' | 'sci', decimals, the largest magnitude the style is for) of a column's
    finite values. A value beyond `ordinary_limit` is left out of the choice and written in
    scientific notation, so it cannot turn the column's ordinary values into exponents."""
    cut = ordinary_limit(values)
    ordinary = [v for v in values if abs(v) <= cut]
    limit = max((abs(v) for v in ordinary), default=0.0)
    if all(float(v).is_integer() and abs(v) < 1e15 for v in ordinary):
        return "int", 0, limit
    magnitudes = [abs(v) for v in ordinary if v != 0]
    big, small = max(magnitudes), min(magnitudes)
    if big >= 1e5 or small < 1e-3 or big / small >= 1e3:
        return "sci", 0, limit
    decimals = max(SIGNIFICANT - 1 - math.floor(math.log10(big)), MIN_SIGNIFICANT - 1 - math.floor(math.log10(small)), 0)
    return "fixed", min(decimals, MAX_DECIMALS), limit


def _render(value: Any, style: tuple[str, int, float]) -> str:
    if isinstance(value, Estimate):
        text = _render(value.value, style)
        if value.value is None or value.half_width is None:
            return text
        kind, decimals, _ = style
        half = _scientific(value.half_width, 2) if kind == "sci" else f"{value.half_width:.{max(decimals, 1)}f}"
        return f"{text} ± {half}"
    if value is None:
        return MISSING
    if not _numeric(value):
        return str(value)
    if not math.isfinite(value):
        return str(value)  # nan, inf, -inf: said, not hidden
    kind, decimals, limit = style
    if abs(value) > limit:  # an outlier the column's style was not chosen for
        return _scientific(float(value))
    if kind == "int":
        return str(int(value))
    if kind == "sci":
        return _scientific(float(value))
    return f"{value:.{decimals}f}"


def column(values: Sequence[Any]) -> list[str]:
    """Each value of one table column as text: numbers in the column's one notation, None as —,
    strings as they are."""
    numbers: list[float] = [float(v) for v in (e.value if isinstance(e, Estimate) else e for e in values)
                            if _numeric(v)]
    finite = [v for v in numbers if math.isfinite(v)]
    style = _style(finite) if finite else ("fixed", 1, 0.0)
    return [_render(v, style) for v in values]


def number(value: Any, significant: int = SIGNIFICANT) -> str:
    """One number on its own (in a sentence, a legend, a cell of a key/value table): `significant`
    digits without trailing zeros, whole units from 1000 up to 10^(significant + 2) (53451 tokens/s),
    scientific notation beyond and below 1e-3."""
    if not _numeric(value) or isinstance(value, int) or not math.isfinite(value):
        return _render(value, ("int", 0, math.inf))
    if 999.5 <= abs(value) < 10 ** (significant + 2):
        return f"{value:.0f}"
    if value == 0 or 1e-3 <= abs(value) < 999.5:
        return f"{value:.{significant}g}"
    return _scientific(value, significant)


def plain(value: Any) -> str:
    """A setting's value, short: floats in their shortest form (0.001, 0.0003, 1e-08), anything
    else as it prints."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def duration(seconds: float) -> str:
    """`seconds` in the largest unit that keeps the number readable: 0.4 s, 40 s, 12.5 min, 5.3 h, 2.1 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
