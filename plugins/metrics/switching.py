"""Switching (SPEC §4): peaks and troughs of p_ood, their bootstrap significance, and where the
switch directions v_sw = unit(θ_peak − θ_trough) point relative to the backbone and the next PCs."""

from __future__ import annotations

import numpy as np

from geobench import Param, hookimpl
from geobench.errors import UsageError
from geobench.registry import MetricPlugin

OPTIONS = {
    "scope": Param("trunk", "parameters: trunk, all or block:I"),
    "window": Param([], "checkpoint steps [start, end] (empty: the whole run)"),
    "prominence": Param(0.03, "minimum rise/fall of an extremum against its neighbourhood", low=0),
    "reach": Param(3, "neighbourhood of an extremum: ± this many evaluations", low=1),
    "resamples": Param(20, "bootstrap resamples of the OOD set for the noise σ (0: skip)", low=0),
    "seed": Param(0, "seed of the bootstrap"),
}


def extrema(p: np.ndarray, prominence: float, reach: int) -> tuple[list[int], list[int]]:
    """Indices of local maxima (minima) of p within ±reach whose height above the neighbourhood's
    minimum (depth below its maximum) is at least `prominence`; of equal neighbours the first."""
    peaks, troughs = [], []
    for i in range(len(p)):
        hood = p[max(0, i - reach): i + reach + 1]
        first_of_plateau = i == 0 or p[i - 1] != p[i]
        if p[i] == hood.max() and p[i] - hood.min() >= prominence and first_of_plateau:
            peaks.append(i)
        if p[i] == hood.min() and hood.max() - p[i] >= prominence and first_of_plateau:
            troughs.append(i)
    return peaks, troughs


def pair(peaks: list[int], troughs: list[int]) -> list[tuple[int, int]]:
    """Each peak with the next trough after it."""
    return [(pk, next(t for t in troughs if t > pk)) for pk in peaks if any(t > pk for t in troughs)]


def bootstrap_sigma(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int, rng) -> float:
    """σ of p_a − p_b over resamples of the (shared) OOD examples."""
    n = len(correct_a)
    diffs = [correct_a[idx].mean() - correct_b[idx].mean() for idx in (rng.integers(0, n, n) for _ in range(resamples))]
    return float(np.std(diffs, ddof=1))


def compute(ctx, options: dict) -> dict:
    bb = ctx.backbone(options["scope"], tuple(options["window"]))
    gram = bb.gram
    p_ood = ctx.p_ood_at(gram.steps)
    if len(p_ood) < 3:
        raise UsageError(f"run {str(ctx.run)!r} has p_ood at only {len(p_ood)} checkpoint steps; "
                         "switching needs evaluations at checkpoint steps (eval_every a multiple of checkpoint_every)")
    steps = sorted(p_ood)
    p = np.array([p_ood[s] for s in steps])
    peaks, troughs = extrema(p, options["prominence"], options["reach"])
    rng = np.random.default_rng(options["seed"])
    correct: dict[int, np.ndarray] = {}
    rows, directions = [], []
    for pk, tr in pair(peaks, troughs):
        s_peak, s_trough = steps[pk], steps[tr]
        v = gram.row(s_peak) - gram.row(s_trough)
        v = v / gram.norm(v)
        along = gram.inner(v, bb.v_b)
        perp = v - along * bb.v_b
        perp_norm = gram.norm(perp)
        e26 = sum(gram.inner(perp / perp_norm, d) ** 2 for d in bb.pca.directions[1:6]) if perp_norm > 0 else 0.0
        row = {"peak": s_peak, "trough": s_trough, "p_peak": float(p[pk]), "p_trough": float(p[tr]),
               "delta_p": float(p[pk] - p[tr]), "backbone_share": along**2, "abs_cos_vb": abs(along), "e2_6": e26}
        if options["resamples"]:
            for s in (s_peak, s_trough):
                if s not in correct:
                    correct[s] = ctx.live.evaluator.ood_correct(ctx.model_at(s))
            sigma = bootstrap_sigma(correct[s_peak], correct[s_trough], options["resamples"], rng)
            row["sigma"] = sigma
            row["tier"] = "A" if row["delta_p"] >= 3 * sigma else "B" if row["delta_p"] >= 2 * sigma else "-"
        rows.append(row)
        directions.append(v)
    pairwise = [[abs(gram.inner(a, b)) for b in directions] for a in directions]
    scalars: dict[str, float] = {"n_peaks": len(peaks), "n_troughs": len(troughs), "n_switches": len(rows)}
    if rows:
        scalars.update(mean_abs_cos_vb=float(np.mean([r["abs_cos_vb"] for r in rows])),
                       mean_e2_6=float(np.mean([r["e2_6"] for r in rows])))
        if options["resamples"]:
            scalars.update(tier_a=sum(r["tier"] == "A" for r in rows), tier_b=sum(r["tier"] == "B" for r in rows))
    series = {"steps": steps, "p_ood": p.tolist(), "peaks": [steps[i] for i in peaks],
              "troughs": [steps[i] for i in troughs], "pairwise_abs_cos": pairwise}
    return {"scalars": scalars, "series": series, "tables": {"switches": rows}, "figures": [plot(ctx, series, rows)]}


def plot(ctx, series, rows) -> str:
    from geobench.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(series["steps"], series["p_ood"], marker="o", ms=3, label="p_ood")
    p = dict(zip(series["steps"], series["p_ood"]))
    ax.scatter(series["peaks"], [p[s] for s in series["peaks"]], marker="^", color="green", s=50, label="peak", zorder=3)
    ax.scatter(series["troughs"], [p[s] for s in series["troughs"]], marker="v", color="red", s=50, label="trough", zorder=3)
    for r in rows:
        ax.annotate(r.get("tier", ""), (r["peak"], r["p_peak"]), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("p_ood")
    ax.legend()
    fig.tight_layout()
    return ctx.figure(fig, "switching")


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("switching", "p_ood peaks/troughs, bootstrap tiers, switch directions vs the backbone",
                          OPTIONS, compute, needs=("checkpoints", "evals", "model", "data")))
