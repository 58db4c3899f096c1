"""Backbone: uncentered trajectory PCA (docs/science.md#backbone), its decomposition, power laws, rotation and the
per-block table."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from geobench import series as series_math
from geobench.api import BACKBONE_CHECKPOINTS, SCOPE, MetricPlugin, MetricResult, Param, hookimpl
from geobench.linalg import pca

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "scope": SCOPE,
    "window": Param([], "checkpoint steps [start, end] (empty: the whole run), anchored at the first", items=int),
    "top_k": Param(10, "explained-variance ratios reported", low=1),
    "rotation_window": Param(10, "checkpoints W per sliding rotation window (stride one checkpoint)", low=3),
    "phase_split": Param(None, "step splitting v_E and v_L (none: the λ switch of the run's schedule)", kind=int,
                         nullable=True, low=1),
    "fit_windows": Param([], "[[lo, hi], ...] half-open (lo, hi] windows for power laws and corr(p_ood, |r|) "
                             "(empty: the source's six, scaled to the run's length)", items=int),
    "corr_points": Param("moved", "points of corr(p_ood, |r|): 'moved' (|r| > 0, the regime script's) or 'all' (Θ₀'s "
                                  "own point too, |r| = 0, as the β₂ script's summary)", choices=series_math.CORR_POINTS),
    "per_block": Param(True, "also the PC1 of every block"),
    "per_block_every": Param(0, "per-block PCA on checkpoints every N steps plus the first and last "
                                "(0: every checkpoint; the source's Table 2 used 400)", low=0),
}


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    bb = ctx.trajectory.backbone(options["scope"], tuple(options["window"]))
    gram, steps = bb.gram, bb.gram.steps
    G = gram.gram
    a = G @ bb.v_b                         # a(t) = ⟨Δθ_t, v_b⟩
    sq = np.clip(np.diag(G), 0.0, None)
    r = np.sqrt(np.clip(sq - a**2, 0.0, None))
    fraction = np.divide(a**2, sq, out=np.zeros_like(sq), where=sq > 0)
    raw_v = bb.pca_raw.directions[0]
    k = options["top_k"]
    scalars: dict[str, float | None] = {
        "pc1": float(bb.pca.ratios[0]), "pc1_raw": float(bb.pca_raw.ratios[0]),
        "pc1_top10": float(series_math.explained_ratios(bb.pca.sigma, top=10)[0]),
        "pc1_raw_top10": float(series_math.explained_ratios(bb.pca_raw.sigma, top=10)[0]),
        "k95": bb.pca.k_for(0.95), "k99": bb.pca.k_for(0.99),
        "k95_raw": bb.pca_raw.k_for(0.95), "k99_raw": bb.pca_raw.k_for(0.99),
        "drift": float(np.sqrt(sq[-1])), "backbone_fraction_final": float(fraction[-1]),
        "overlap_raw_rownorm": abs(gram.inner(raw_v, bb.v_b)),
        "n_checkpoints": len(steps), "dimension": sum(int(np.prod(ctx.trajectory.parameter_shapes[n])) for n in gram.names),
    }
    series = {"steps": steps, "ratios": bb.pca.ratios[:k].tolist(), "ratios_raw": bb.pca_raw.ratios[:k].tolist(),
              "a": a.tolist(), "r_norm": r.tolist(), "backbone_fraction": fraction.tolist()}
    p_ood = series_math.p_ood_at(ctx.evals, steps)
    windows = options["fit_windows"] or series_math.default_fit_windows(steps[-1])
    tables = {"fits": series_math.window_fits(steps, a.tolist(), r.tolist(), [p_ood.get(s) for s in steps], windows,
                                              options["corr_points"])}

    rho_steps, rho = rotation(gram, options["rotation_window"])
    series.update(rotation_steps=rho_steps, rotation_rho=rho)
    notes = []
    if not rho:
        notes.append(f"rotation not computed: two windows of {options['rotation_window']} checkpoints after the anchor "
                     f"need {options['rotation_window'] + 2} checkpoints, and the window has {len(steps)} "
                     "(backbone.rotation_window, or checkpoint more often)")
    defined = [v for v in rho if math.isfinite(v)]
    if defined:
        scalars.update(rotation_mean=float(np.mean(defined)), rotation_min=float(np.min(defined)))
    if len(defined) < len(rho):
        scalars["rotation_undefined"] = len(rho) - len(defined)  # pairs with a window that did not move
    scalars["phase_overlap"], why = phase_overlap(gram, options["phase_split"], ctx)
    if why:
        notes.append(f"phase overlap not computed: {why}")
    every = options["per_block_every"]
    if options["per_block"]:
        tables["per_block"] = per_block(ctx, options["window"], every)
    figures = plots(ctx, bb, steps, a, r, rho_steps, rho, k)
    variant = (f"{options['scope']}-scope PCA of {len(steps)} checkpoints anchored at step {steps[0]}, uncentered; "
               "v_b, pc1, k95: row-normalized rows, full-spectrum denominator; pc1_top10: top-10 denominator (how the "
               "source published its trunk PC1); *_raw: raw rows; fits: half-open windows (lo, hi], least squares on "
               "logs"
               + (f"; rotation: sliding windows of {options['rotation_window']} checkpoints after the anchor, stride 1"
                  if rho else "")
               + (f"; per_block: PCA per block on {thinned(every)}" if options["per_block"] else ""))
    return MetricResult(scalars=scalars, series=series, tables=tables, figures=figures, variant=variant, notes=notes)


def thinned(every: int) -> str:
    return f"checkpoints every {every} steps plus the first and last" if every else "every checkpoint"


def rotation(gram, size: int) -> tuple[list[float], list[float]]:
    """The source's rotation curve: sliding windows (stride one checkpoint) of `size` consecutive
    checkpoints taken after the anchor (Θ₀ is never in a window), each window's drift anchored at
    its own first checkpoint, v_w its row-normalized PC1; ρ = |⟨v_w, v_w+1⟩| for adjacent windows
    (40 values for 50 checkpoints after Θ₀ and W = 10). Returns the midpoint step of each pair of
    windows (the mean of their centres) and ρ."""
    T = len(gram.steps)
    starts = list(range(1, T - size + 1))
    backbones: list[np.ndarray | None] = []
    centres = []
    scale = float(np.max(np.diag(gram.gram)))
    for s in starts:
        rows = np.zeros((size - 1, T))
        rows[:, s + 1:s + size] = np.eye(size - 1)
        rows[:, s] = -1.0  # Δ_t − Δ_s
        # a window in which some checkpoint did not move from its first has no direction to normalize
        moved = np.einsum("ij,jk,ik->i", rows, gram.gram, rows) > 1e-12 * scale
        backbones.append(pca(gram, rows, normalize_rows=True).directions[0] if moved.all() else None)
        centres.append((gram.steps[s] + gram.steps[s + size - 1]) / 2)
    rho = [abs(gram.inner(u, v)) if u is not None and v is not None else math.nan
           for u, v in zip(backbones, backbones[1:])]
    return [(a + b) / 2 for a, b in zip(centres, centres[1:])], rho


def phase_overlap(gram, split: int | None, ctx) -> tuple[float | None, str | None]:
    """|⟨v_E, v_L⟩|: backbones of steps <= split (anchored at the first) and >= split (anchored
    there); or None and why it could not be computed."""
    if split is None:
        if ctx.config is None:
            return None, "a manifest's checkpoints carry no λ schedule to split at (backbone.phase_split)"
        schedule = ctx.config.train.lambda_schedule
        if len(schedule) < 2:
            return None, "the λ schedule never switches (backbone.phase_split sets a step)"
        split = schedule[1][0]
    i = int(np.argmin([abs(s - split) for s in gram.steps]))  # the checkpoint nearest the split
    T = len(gram.steps)
    if i < 2 or T - i < 3:
        return None, (f"each phase needs 3 checkpoints; around step {split} the window has {i + 1} before and "
                      f"{T - i} after")
    early = np.eye(T)[1:i + 1]
    late = np.eye(T)[i + 1:]
    late[:, i] = -1.0
    v_e = pca(gram, early, normalize_rows=True, sign_row=-1).directions[0]
    v_l = pca(gram, late, normalize_rows=True, sign_row=-1).directions[0]
    return abs(gram.inner(v_e, v_l)), None


def per_block(ctx, window: list, every: int) -> list[dict]:
    out = []
    for i in ctx.trajectory.block_indices():
        bb = ctx.trajectory.backbone(f"block:{i}", tuple(window), every=every)
        out.append({"block": i, "pc1": float(bb.pca.ratios[0]), "pc1_raw": float(bb.pca_raw.ratios[0]),
                    "k95": bb.pca.k_for(0.95), "k95_raw": bb.pca_raw.k_for(0.95), "checkpoints": len(bb.gram.steps)})
    return out


A_LABEL = "a(t) = ⟨Δθ_t, v_b⟩ (parameter L2 units)"
R_LABEL = "‖r(t)‖ = ‖Δθ_t − a(t) v_b‖ (parameter L2 units)"


def plots(ctx, bb, steps, a, r, rho_steps, rho, k) -> list[str]:
    from geobench.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    n = min(k, len(bb.pca.ratios))
    ax.bar(np.arange(1, n + 1) - 0.2, bb.pca.ratios[:n], width=0.4, label="row-normalized")
    ax.bar(np.arange(1, n + 1) + 0.2, bb.pca_raw.ratios[:n], width=0.4, label="raw")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.legend()
    fig.tight_layout()
    figures = [ctx.figure(fig, "backbone_spectrum", caption=(
        f"The share of the drift's energy along each of the first {n} principal directions of the trajectory, "
        "with every checkpoint's drift scaled to unit length (row-normalized) and as it is (raw)."))]

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sc = ax.scatter(a, r, c=steps, cmap="viridis", s=14)
    ax.plot(a, r, lw=0.6, color="grey")
    fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel(A_LABEL)
    ax.set_ylabel(R_LABEL)
    fig.tight_layout()
    figures.append(ctx.figure(fig, "backbone_plane", caption=(
        "Each checkpoint's drift from the anchor split into its component a(t) along the backbone v_b and the "
        "length ‖r(t)‖ of the rest; colour is the step.")))

    if rho:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(rho_steps, rho, marker="o")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step (midpoint of two adjacent windows)")
        ax.set_ylabel("ρ = |⟨v_w, v_w+1⟩|")
        fig.tight_layout()
        figures.append(ctx.figure(fig, "backbone_rotation", caption=(
            "Rotation of the backbone: the overlap ρ of the first principal directions of adjacent sliding windows "
            "(1: the direction holds; 0: it turned by 90°).")))
    return figures


COLUMNS = {"pc1": ("pc1", "PC1 (row-norm.)"), "k95": ("k95", "k95"), "drift": ("drift", "drift"),
           "pc1_top10": ("pc1_top10", "PC1 (row-norm., top-10 denom.)"), "pc1_raw": ("pc1_raw", "PC1 (raw)"),
           "rotation": ("rotation_mean", "rotation ρ (mean)")}
TERMS = {
    "v_b": "the backbone: the first principal direction of the trajectory's drifts Δθ_t = θ_t − θ_anchor, each "
           "drift scaled to unit length (row-normalized), uncentered",
    "PC1 (row-norm.)": "the share of the row-normalized drifts' energy along v_b, over the full spectrum (pc1)",
    "PC1 (row-norm., top-10 denom.)": "the same over the ten largest singular values (pc1_top10)",
    "PC1 (raw)": "the share of the raw drifts' energy along their own first direction (pc1_raw)",
    "k95": "the number of principal directions that hold 95% of the row-normalized energy",
    "drift": "‖θ_last − θ_anchor‖, the L2 length of the final drift over the measured parameters",
    "a(t), ‖r(t)‖": "the drift's component along v_b and the length of the rest",
    "rotation ρ (mean)": "the mean overlap |⟨v_w, v_w+1⟩| of the backbones of adjacent sliding windows",
    "phase_overlap": "|⟨v_E, v_L⟩|, the overlap of the backbones before and after the λ switch",
}


def _beta2_axis(beta2: float) -> float:
    return 1.0 - beta2  # 0.99 … 0.0 spread over decades on a log axis


def comparison_figures(*, runs, groups, references, plt, save) -> None:
    """The backbone planes and |a(t)|, ‖r(t)‖ of every run (the published series beside them);
    where the configurations differ in β₂, trunk PC1 against β₂ with the published series' PC1;
    where they use different optimizers, trunk PC1 against the final val_loss, a marker per
    configuration."""
    from geobench.figures import Line, draw, outliers, published_lines
    from geobench.formatting import plain

    planes = [Line(run.label, run.result.series["a"], run.result.series["r_norm"], colour=run.colour)
              for run in runs]
    planes += [Line(ref["name"] + " (published)", ref["series"]["a"], ref["series"]["r_norm"], colour=ref.get("colour"),
                    dashed=True) for ref in references]
    if runs:
        magnitude = [Line(p.label, [], [max(abs(x), abs(y or 0.0)) for x, y in zip(p.x, p.y)]) for p in planes]
        far = {m.label for m in outliers(magnitude)}
        near = [p for p in planes if p.label not in far]
        fig, axes = plt.subplots(1, 2 if far else 1, figsize=(11 if far else 6, 4.5), squeeze=False)
        for ax, lines, title in ((axes[0][0], near, "runs on a common scale"),
                                 *(((axes[0][1], [p for p in planes if p.label in far], "far larger drifts (own scale)"),)
                                   if far else ())):
            for line in lines:
                ax.plot(line.x, line.y, marker="o" if not line.dashed else None, ms=2, color=line.colour,
                        ls="--" if line.dashed else "-", label=line.label)
            ax.set_xlabel(A_LABEL)
            ax.set_ylabel(R_LABEL)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        save(fig, "backbone_planes", caption=(
            "Each run's drift split into its component a(t) along its own backbone and the length of the rest, "
            "one point per checkpoint" + (", the published series dashed" if references else "")
            + ("; runs whose drift is over 100 times the others' are drawn in their own panel: " + ", ".join(sorted(far))
               if far else "") + "."))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    said: list[str] = []
    for ax, key, label in ((left, "a", "|a(t)| (parameter L2 units)"), (right, "r_norm", "‖r(t)‖ (parameter L2 units)")):
        lines = [Line(run.label, run.result.series["steps"],
                      [abs(v) for v in run.result.series[key]] if key == "a" else run.result.series[key],
                      colour=run.colour, group=run.group, length=run.steps,
                      marks={"diverged": run.diverged_at} if run.diverged_at is not None else {}) for run in runs]
        published = published_lines(references, key)
        if key == "a":
            published = [dataclasses.replace(p, y=[abs(v) for v in p.y if v is not None]) for p in published]
        said += [s for s in draw(ax, lines + published, ylabel=label) if s not in said]
    save(fig, "backbone_curves", caption=(
        "The drift along the backbone, |a(t)|, and across it, ‖r(t)‖, at every checkpoint"
        + (", the published series dashed in the colour of the run they pair with" if references else "")
        + "".join(f"; {s}" for s in said) + "."))
    points = sorted((g["params"]["beta2"], g["pc1"], g["pc1_raw"], g["colour"]) for g in groups
                    if "beta2" in g["params"] and g.get("pc1") is not None)
    if len({b for b, *_ in points}) > 1 and len({g["optimizer"] for g in groups}) == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        b = [_beta2_axis(p[0]) for p in points]
        ax.plot(b, [p[1] for p in points], marker="o", color="black", label="ours, row-normalized")
        ax.plot(b, [p[2] for p in points], marker="s", color="grey", label="ours, raw")
        ours = [(_beta2_axis(r["beta2"]), r["pc1"]) for r in references if r.get("beta2") is not None]
        if ours:
            ours.sort()
            ax.plot(*zip(*ours), marker="o", ls="--", color="black", mfc="white", label="published, row-normalized")
        ax.set_xscale("log")
        ticks = sorted({p[0] for p in points} | {r["beta2"] for r in references if r.get("beta2") is not None})
        ax.set_xticks([_beta2_axis(t) for t in ticks], [plain(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("β₂ (spaced by 1 − β₂, log)")
        ax.set_ylabel("trunk PC1 (share of drift energy)")
        ax.legend(fontsize=8)
        save(fig, "pc1_vs_beta2", caption=(
            "Trunk PC1 against β₂: ours with row-normalized and raw drifts"
            + (", and the published series' PC1 recomputed from their singular values (row-normalized, full "
               "spectrum), dashed" if ours else "") + "; the axis spaces β₂ by 1 − β₂ so that 0.8–0.99 do not crowd."))
    scored = [g for g in groups if g.get("pc1") is not None and g.get("val_loss") is not None]
    if len({g["optimizer"] for g in scored}) > 1:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for g in scored:
            err = [[g["val_loss"] - lo, hi - g["val_loss"]] for lo, hi in [g.get("val_loss_interval") or
                                                                           (g["val_loss"], g["val_loss"])]]
            yerr = [[g["pc1"] - lo, hi - g["pc1"]] for lo, hi in [g.get("pc1_interval") or (g["pc1"], g["pc1"])]]
            ax.errorbar([g["val_loss"]], [g["pc1"]], xerr=np.transpose(err), yerr=np.transpose(yerr), marker="o",
                        capsize=2, color=g["colour"], label=g["label"])
            ax.annotate(g["group"], (g["val_loss"], g["pc1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("final val_loss (nats)")
        ax.set_ylabel("trunk PC1 (row-normalized)")
        save(fig, "pc1_vs_val_loss", caption=(
            "Trunk PC1 against the final validation loss, one marker per configuration; bars: the 95% bootstrap "
            "interval over seeds where a configuration has several."))


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("backbone", "uncentered trajectory PCA: PC1, k95, drift, decomposition, rotation",
                          OPTIONS, compute, default=True, needs=("checkpoints", "evals"), columns=COLUMNS,
                          min_checkpoints=BACKBONE_CHECKPOINTS, terms=TERMS,
                          comparison_figures=comparison_figures))


