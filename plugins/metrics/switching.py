"""Switching (docs/science.md#switching): peaks and troughs of p_ood by the source's detector, their bootstrap
significance, and where the switch directions v_sw = unit(θ_peak − θ_trough) point relative to the
backbone and the next PCs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from geobench import series as series_math
from geobench.api import BACKBONE_CHECKPOINTS, SCOPE, MetricPlugin, MetricResult, Param, hookimpl, seed_param

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "scope": SCOPE,
    "window": Param([], "checkpoint steps [start, end] (empty: the whole run)", items=int),
    "prominence": Param(series_math.PROMINENCE, "minimum prominence of a peak or trough", low=0),
    "reach": Param(series_math.REACH, "prominence against the min (max) of this many evaluations each side", low=1),
    "backbone": Param("rownorm", "v_b and PCs 2-6 from the row-normalized or the raw PCA (the source: raw)",
                      choices=("rownorm", "raw")),
    "per_block": Param(False, "shares and E2:6 per transformer block against that block's own PCA "
                              "(the source's published numbers), besides the scope's"),
    "resamples": Param(20, "bootstrap resamples of the OOD set for the noise σ (0: skip)", low=0),
    "sigma": Param("paired", "σ that tiers the pairs: 'paired' (of p_peak − p_trough on shared resamples) or "
                             "'last' (the source: of p_ood at the last checkpoint)", choices=("paired", "last")),
    "seed": seed_param(0, "seed of the bootstrap"),
    "e2_6": Param("residual", "E2:6 of the switch direction v_sw: 'residual' Σ⟨v_sw⊥/‖v_sw⊥‖, PC_k⟩² (v_sw with its "
                              "backbone part removed, as update_alignment.py) or 'whole' Σ⟨v_sw, PC_k⟩² (unit v_sw, as "
                              "residual_decomposition.py); they differ by the factor 1 − cos²(v_sw, v_b)",
                  choices=("residual", "whole")),
}

SIGMAS = {"paired": "paired bootstrap σ of p_peak − p_trough",
          "last": "bootstrap σ of p_ood at the last checkpoint (the source)"}


def direction_shares(ctx, bb, pca, s_peak: int, s_trough: int, e2_6: str = "residual") -> dict:
    """|⟨v_sw, v_b⟩|, the backbone share ⟨v_sw, v_b⟩² and E2:6 of v_sw (the `e2_6` formula) against
    one trajectory PCA."""
    gram, v_b = bb.gram, pca.directions[0]
    v = gram.row(s_peak) - gram.row(s_trough)
    v = v / gram.norm(v)
    along = gram.inner(v, v_b)
    if e2_6 == "whole":
        e26 = sum(gram.inner(v, d) ** 2 for d in pca.directions[1:6])
    else:
        perp = v - along * v_b
        perp_norm = gram.norm(perp)
        e26 = sum(gram.inner(perp / perp_norm, d) ** 2 for d in pca.directions[1:6]) if perp_norm > 0 else 0.0
    return {"v": v, "backbone_share": along**2, "abs_cos_vb": abs(along), "e2_6": e26}


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    window = options["window"]
    evals = [(e.step, e.p_ood) for e in ctx.evals if e.p_ood is not None
             and (not window or window[0] <= e.step <= window[1])]
    if len(evals) < 3:  # a run that stopped early (diverged, interrupted): a result with no signal, not a failure
        last = ctx.evals[-1].step if ctx.evals else 0
        return MetricResult(scalars={"n_switches": 0}, no_signal=(
            f"no switching to detect: {len(evals)} evaluation{'s' if len(evals) != 1 else ''} of p_ood"
            f"{' in ' + str(window) if window else ''} (the last at step {last}); the detector needs at least 3"))
    steps = [s for s, _ in evals]
    p = np.array([v for _, v in evals])
    peaks, troughs = series_math.detect_switches(p, options["prominence"], options["reach"])
    pairs = series_math.pair_switches(peaks, troughs)
    pick = (lambda b: b.pca) if options["backbone"] == "rownorm" else (lambda b: b.pca_raw)
    bb = ctx.trajectory.backbone(options["scope"], tuple(window))
    checkpoints = set(bb.gram.steps)
    blocks = ({i: ctx.trajectory.backbone(f"block:{i}", tuple(window)) for i in ctx.trajectory.block_indices()}
              if options["per_block"] else {})
    rng = np.random.default_rng(options["seed"])
    correct: dict[int, np.ndarray] = {}

    def ood_correct(step: int) -> np.ndarray:
        if step not in correct:
            correct[step] = ctx.setup.evaluator.ood_correct(ctx.setup.model_at(step))
        return correct[step]

    sigma_last = None
    if options["resamples"] and pairs:
        sigma_last = series_math.bootstrap_sigma(ood_correct(ctx.trajectory.checkpoint_steps()[-1]), options["resamples"], rng)
    rows, directions, block_rows = [], [], []
    for pk, tr in pairs:
        s_peak, s_trough = steps[pk], steps[tr]
        row: dict = {"peak": s_peak, "trough": s_trough, "p_peak": float(p[pk]), "p_trough": float(p[tr]),
                     "delta_p": float(p[pk] - p[tr])}
        if {s_peak, s_trough} <= checkpoints:
            shares = direction_shares(ctx, bb, pick(bb), s_peak, s_trough, options["e2_6"])
            directions.append(shares.pop("v"))
            row.update(shares)
            for i, block in blocks.items():
                block_shares = direction_shares(ctx, block, pick(block), s_peak, s_trough, options["e2_6"])
                block_shares.pop("v")
                block_rows.append({"peak": s_peak, "trough": s_trough, "block": i, **block_shares})
        else:
            row.update(backbone_share=None, abs_cos_vb=None, e2_6=None)  # no checkpoint there: no direction
        if options["resamples"]:
            paired = None
            if {s_peak, s_trough} <= checkpoints:
                paired = series_math.bootstrap_sigma(ood_correct(s_peak), options["resamples"], rng,
                                                     paired_with=ood_correct(s_trough))
            row.update(sigma_paired=paired, sigma_last=sigma_last)
            row["tier"] = series_math.tier(row["delta_p"], paired if options["sigma"] == "paired" else sigma_last)
        rows.append(row)
    pairwise = [[abs(bb.gram.inner(a, b)) for b in directions] for a in directions]
    scalars: dict[str, float] = {"n_peaks": len(peaks), "n_troughs": len(troughs), "n_switches": len(rows)}
    measured = [r for r in rows if r["abs_cos_vb"] is not None]
    if measured:
        scalars.update(mean_abs_cos_vb=float(np.mean([r["abs_cos_vb"] for r in measured])),
                       mean_e2_6=float(np.mean([r["e2_6"] for r in measured])))
    if block_rows:
        scalars.update(block_mean_abs_cos_vb=float(np.mean([r["abs_cos_vb"] for r in block_rows])),
                       block_mean_e2_6=float(np.mean([r["e2_6"] for r in block_rows])))
    if options["resamples"] and rows:
        scalars.update(tier_a=sum(r["tier"] == "A" for r in rows), tier_b=sum(r["tier"] == "B" for r in rows))
        if sigma_last is not None:
            scalars["sigma_last"] = sigma_last
    series = {"steps": steps, "p_ood": p.tolist(), "peaks": [steps[i] for i in peaks],
              "troughs": [steps[i] for i in troughs], "pairwise_abs_cos": pairwise}
    tables = {"switches": rows}
    if block_rows:
        tables["per_block"] = block_rows
    variant = (f"the source's detector (interior strict extrema, prominence >= {options['prominence']:g} against "
               f"±{options['reach']} evaluations, each peak paired with the first trough after it) on every "
               f"evaluation; v_b and PCs 2-6 from the {options['scope']}-scope "
               f"{'row-normalized' if options['backbone'] == 'rownorm' else 'raw'} PCA; E2:6 "
               + ("Σ⟨v_sw, PC_k⟩² of the unit v_sw" if options["e2_6"] == "whole"
                  else "Σ⟨v_sw⊥, PC_k⟩² of v_sw's unit part orthogonal to v_b")
               + ("; per_block: each block against its own PCA, LayerNorms included" if options["per_block"] else "")
               + (f"; tiers by the {SIGMAS[options['sigma']]}, {options['resamples']} resamples"
                  if options["resamples"] else "; no tiers (resamples=0)"))
    result = MetricResult(scalars=scalars, series=series, tables=tables, figures=[plot(ctx, series, rows)],
                          variant=variant)
    if not rows:
        result.no_signal = "no switching: " + (
            series_math.probe_not_learned(ctx.evals)
            or f"p_ood (best {p.max():.3g}) has no peak of prominence >= {options['prominence']:g} "
               "followed by a trough")
    return result


def plot(ctx, series, rows) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(series["steps"], series["p_ood"], marker="o", ms=3, label="p_ood")
    p = dict(zip(series["steps"], series["p_ood"]))
    for steps, marker, colour, name in ((series["peaks"], "^", "green", "peak"), (series["troughs"], "v", "red", "trough")):
        if steps:  # a legend entry only for markers that are drawn
            ax.scatter(steps, [p[s] for s in steps], marker=marker, color=colour, s=50, label=name, zorder=3)
    for r in rows:
        ax.annotate(r.get("tier") or "", (r["peak"], r["p_peak"]), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("p_ood (probe exact match, OOD gaps)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    found = len(series["peaks"]) + len(series["troughs"])
    return ctx.figure(fig, "switching", caption=(
        "p_ood at every evaluation" + (" with the detected peaks (▲) and troughs (▼), each pair labelled with its tier"
                                       if found else "; the detector found no peak or trough") + "."))


TERMS = {
    "switch pairs": "peaks of p_ood (interior, above both neighbours, prominence ≥ 0.03) each paired with the first "
                    "trough after it (n_switches)",
    "tier A": "pairs whose drop |Δp_ood| is at least 3σ, σ the bootstrap noise of p_ood (tier B: at least 2σ)",
    "v_sw": "the unit vector of θ_peak − θ_trough; its backbone share is ⟨v_sw, v_b⟩²",
}


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("switching", "p_ood peaks/troughs, bootstrap tiers, switch directions vs the backbone",
                          OPTIONS, compute, default=True, needs=("checkpoints", "evals", "model", "data"),
                          min_checkpoints=BACKBONE_CHECKPOINTS, min_evals=3,
                          columns={"switches": ("n_switches", "switch pairs"), "tier_a": ("tier_a", "tier A")},
                          terms=TERMS))
