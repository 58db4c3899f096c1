"""Computations on 1-D series — switch detection, power-law fits, explained-variance ratios — kept
apart from runs and checkpoints so that the metric plugins and the published reference series
(`geobench.published`) go through the same code."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geobench.api import EvalRecord

__all__ = [
    "CORR_POINTS",
    "PROBE_LEARNED",
    "PROMINENCE",
    "REACH",
    "bootstrap_interval",
    "bootstrap_means",
    "bootstrap_sigma",
    "default_fit_windows",
    "detect_switches",
    "explained_ratios",
    "in_window",
    "p_ood_at",
    "pair_switches",
    "power_law_fit",
    "probe_not_learned",
    "tier",
    "window_fits",
]

Values = Sequence[float] | np.ndarray

PROMINENCE = 0.03  # the source's frozen detection constants
REACH = 3
TIER_A, TIER_B = 3.0, 2.0  # |Δp_ood| in units of σ
PROBE_LEARNED = 0.1  # a best p_ood below this: no capability to switch, re-enter or perturb

# The source's power-law windows (lo, hi] for its 10k-step runs, as fractions of the run.
FIT_FRACTIONS = ((0.0, 0.2), (0.2, 0.4), (0.0, 0.4), (0.4, 0.6), (0.4, 1.0), (0.6, 1.0))


def detect_switches(values: Values, prominence: float = PROMINENCE,
                    reach: int = REACH) -> tuple[list[int], list[int]]:
    """Peaks and troughs of a series by the source's detector (docs/science.md#switching): interior points only; a
    peak is strictly above both neighbours and its prominence v[i] − max(min of the ≤reach values
    before, min of the ≤reach values after) is at least `prominence`; a trough mirrors it with
    min(max before, max after) − v[i]. Returns (peak indices, trough indices)."""
    v = np.asarray(values, dtype=float)
    peaks, troughs = [], []
    for i in range(1, len(v) - 1):
        before, after = v[max(0, i - reach):i], v[i + 1:i + 1 + reach]
        if v[i] > v[i - 1] and v[i] > v[i + 1]:
            if v[i] - max(before.min(), after.min()) >= prominence:
                peaks.append(i)
        elif v[i] < v[i - 1] and v[i] < v[i + 1]:
            if min(before.max(), after.max()) - v[i] >= prominence:
                troughs.append(i)
    return peaks, troughs


def pair_switches(peaks: Sequence[int], troughs: Sequence[int]) -> list[tuple[int, int]]:
    """Each peak with the first trough after it (several peaks may share one trough)."""
    return [(pk, next(t for t in troughs if t > pk)) for pk in peaks if any(t > pk for t in troughs)]


def tier(delta: float, sigma: float | None) -> str | None:
    """The source's tiers: A if Δ ≥ 3σ, B if Δ ≥ 2σ, else C (None without a σ)."""
    if sigma is None:
        return None
    k = delta / sigma if sigma > 0 else (float("inf") if delta > 0 else 0.0)
    return "A" if k >= TIER_A else "B" if k >= TIER_B else "C"


def bootstrap_means(samples: Values, resamples: int, rng: np.random.Generator,
                    paired_with: np.ndarray | None = None) -> np.ndarray:
    """The means of `resamples` bootstrap resamples (with replacement) of `samples`; with
    `paired_with`, the difference of the two means on the same resampled indices."""
    data = np.asarray(samples, dtype=float)
    idx = rng.integers(0, len(data), size=(resamples, len(data)))
    means = data[idx].mean(axis=1)
    return means - np.asarray(paired_with, dtype=float)[idx].mean(axis=1) if paired_with is not None else means


def bootstrap_sigma(correct: np.ndarray, resamples: int, rng: np.random.Generator,
                    paired_with: np.ndarray | None = None) -> float:
    """σ of the exact-match rate over bootstrap resamples of the eval examples; with `paired_with`,
    σ of the difference of two rates on the same resampled examples."""
    return float(np.std(bootstrap_means(correct, resamples, rng, paired_with), ddof=1))


def bootstrap_interval(values: Sequence[float], rng: np.random.Generator, resamples: int = 1000) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean of `values` (e.g. a metric over seeds)."""
    means = bootstrap_means(values, resamples, rng)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def p_ood_at(evals: Sequence[EvalRecord], steps: Sequence[int]) -> dict[int, float]:
    """p_ood of the evaluations at `steps` (the steps without one left out)."""
    by_step = {e.step: e.p_ood for e in evals if e.p_ood is not None}
    return {s: by_step[s] for s in steps if s in by_step}


def probe_not_learned(evals: Sequence[EvalRecord]) -> str | None:
    """Why a run's probe gives the probe metrics nothing to measure, in words, or None when its best
    p_ood reached PROBE_LEARNED."""
    p_ood = [e.p_ood for e in evals if e.p_ood is not None and np.isfinite(e.p_ood)]
    p_in = [e.p_in for e in evals if e.p_in is not None and np.isfinite(e.p_in)]
    if not p_ood:
        return "no evaluation of p_ood"
    best = max(p_ood)
    if best >= PROBE_LEARNED:
        return None
    learned_in = p_in and max(p_in) >= 0.5
    return (f"best p_ood {best:.3g} < {PROBE_LEARNED:g}"
            + (f" (best p_in {max(p_in):.3g}): the probe was learned in distribution but never out of it"
               if learned_in else f" (best p_in {max(p_in, default=0.0):.3g}): the probe was not learned"))


def power_law_fit(steps: Sequence[float], values: Sequence[float | None]) -> dict:
    """y = C·t^γ by least squares on (log t, log y) over the points with t > 0 and y > 0, as the
    source fitted it; R² of that linear fit. Fewer than two points give None values."""
    pts = [(t, y) for t, y in zip(steps, values) if t > 0 and y is not None and np.isfinite(y) and y > 0]
    if len(pts) < 2:
        return {"gamma": None, "C": None, "r2": None, "n": len(pts)}
    x, y = np.log(np.array(pts, dtype=float)).T
    A = np.vstack([x, np.ones_like(x)]).T
    (gamma, log_c), *_ = np.linalg.lstsq(A, y, rcond=None)
    ss_res = float(np.sum((y - (gamma * x + log_c)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"gamma": float(gamma), "C": float(np.exp(log_c)), "r2": 1 - ss_res / max(ss_tot, 1e-30), "n": len(pts)}


def in_window(steps: Sequence[int], lo: float, hi: float) -> list[int]:
    """Indices of the steps in the half-open window (lo, hi]."""
    return [i for i, s in enumerate(steps) if lo < s <= hi]


def default_fit_windows(last_step: int) -> list[list[int]]:
    """The source's six windows scaled to a run of `last_step` steps: for 10,000 steps exactly
    (0, 2000], (2000, 4000], (0, 4000], (4000, 6000], (4000, 10000], (6000, 10000]."""
    return [[round(lo * last_step), round(hi * last_step)] for lo, hi in FIT_FRACTIONS]


CORR_POINTS = ("moved", "all")


def window_fits(steps: Sequence[int], a: Sequence[float], r: Sequence[float], p_ood: Sequence[float | None],
                windows: Sequence[Sequence[float]], corr_points: str = "moved") -> list[dict]:
    """Per half-open window (lo, hi]: power laws of |a(t)| and ‖r(t)‖ and the Pearson correlation of
    p_ood with ‖r‖ over the points where both exist — with `corr_points="moved"` only those with
    ‖r‖ > 0 (the regime script's), with "all" also Θ₀'s own point, ‖r‖ = 0 (the β₂ script's);
    None below three points."""
    rows = []
    for lo, hi in windows:
        idx = in_window(steps, lo, hi)
        t = [steps[i] for i in idx]
        fa = power_law_fit(t, [abs(a[i]) for i in idx])
        fr = power_law_fit(t, [r[i] for i in idx])
        pairs = [(p_ood[i], r[i]) for i in idx if p_ood[i] is not None and (r[i] > 0 or corr_points == "all")]
        corr = None
        if len(pairs) >= 3:
            p, rr = np.array(pairs, dtype=float).T
            corr = float(np.corrcoef(p, rr)[0, 1]) if p.std() > 0 and rr.std() > 0 else None
        rows.append({"start": lo, "end": hi, "gamma_a": fa["gamma"], "C_a": fa["C"], "R2_a": fa["r2"],
                     "gamma_r": fr["gamma"], "C_r": fr["C"], "R2_r": fr["r2"], "corr_p_ood_r": corr,
                     "n": len(idx)})
    return rows


def explained_ratios(sigma: Values, top: int | None = None) -> np.ndarray:
    """σ_k² / Σ σ_j², over the full spectrum or (top=k) over the first k values, as the published
    trunk PC1 of the source was computed."""
    s2 = np.asarray(sigma, dtype=float) ** 2
    return s2 / (s2[:top].sum() if top else s2.sum())
