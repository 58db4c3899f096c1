"""Update–backbone alignment (docs/science.md#alignment): C(t) = ⟨u, v_b⟩/‖u‖ for the update u over one checkpoint
interval, and the control cos(g, v_b) of per-batch gradients (isotropic floor ~1/√D)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench.api import BACKBONE_CHECKPOINTS, SCOPE, MetricPlugin, MetricResult, Param, UsageError, hookimpl

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "scope": SCOPE,
    "window": Param([], "checkpoint steps [start, end] (empty: the whole run)", items=int),
    "backbone": Param("rownorm", "v_b of the row-normalized or the raw PCA (the source: raw)", choices=("rownorm", "raw")),
    "per_block": Param(False, "also C(t) per transformer block against that block's own v_b (the source's "
                              "published 0.15-0.32)"),
    "interval": Param(0, "steps of the update u_s = θ_s − θ_(s−interval), at every checkpoint s that has one that "
                         "many steps earlier (0: each consecutive checkpoint interval; the source's β₂ table: 200)", low=0),
    "control_batches": Param(16, "per-batch gradients for the control at each control checkpoint (0: skip it)", low=0),
    "control_step": Param(None, "checkpoint of the gradient control (none: see control_checkpoints)", kind=int,
                          nullable=True, low=1),
    "control_checkpoints": Param(1, "with control_step -1: this many checkpoints spread over the run, the last "
                                    "included (the source: 11)", low=1),
    "control_steps": Param([], "checkpoints of the gradient control, given (empty: control_step / control_checkpoints; "
                               "the source: 1, 800, 1800, ..., 9800)", items=int),
    "control_scope": Param(None, "parameters of the gradient control and its v_b (none: scope; the source: block:0)",
                           kind=str, nullable=True, pattern=SCOPE.pattern),
}


def update_pairs(steps: list[int], interval: int) -> list[tuple[int, int]]:
    """(earlier, later) checkpoint indices of the updates: consecutive checkpoints (interval 0), or
    every checkpoint s with one exactly `interval` steps before it."""
    if not interval:
        return [(i - 1, i) for i in range(1, len(steps))]
    index = {s: i for i, s in enumerate(steps)}
    return [(index[s - interval], i) for i, s in enumerate(steps) if s - interval in index]


def update_cosines(bb, v_b: np.ndarray, interval: int = 0) -> tuple[list[int], np.ndarray]:
    """The steps s and C(s) = ⟨u_s, v_b⟩/‖u_s‖ of the updates `update_pairs` gives."""
    gram, T = bb.gram, len(bb.gram.steps)
    steps, cosines = [], []
    for earlier, later in update_pairs(bb.gram.steps, interval):
        u = np.zeros(T)
        u[later], u[earlier] = 1.0, -1.0
        norm = gram.norm(u)
        steps.append(bb.gram.steps[later])
        cosines.append(gram.inner(u, v_b) / norm if norm > 0 else 0.0)
    if not cosines:
        raise UsageError(f"no checkpoint of the window has one {interval} steps before it (alignment.interval)")
    return steps, np.array(cosines)


def backbone_direction(bb, variant: str) -> np.ndarray:
    return (bb.pca if variant == "rownorm" else bb.pca_raw).directions[0]


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    window = tuple(options["window"])
    bb = ctx.trajectory.backbone(options["scope"], window)
    steps, signed = update_cosines(bb, backbone_direction(bb, options["backbone"]), options["interval"])
    scalars = {"mean_abs_cos": float(np.abs(signed).mean()), "min_abs_cos": float(np.abs(signed).min()),
               "max_abs_cos": float(np.abs(signed).max()), "mean_signed_cos": float(signed.mean())}
    series = {"steps": steps, "cos": signed.tolist(), "abs_cos": np.abs(signed).tolist()}
    tables = {}
    if options["per_block"]:
        rows = []
        for i in ctx.trajectory.block_indices():
            block = ctx.trajectory.backbone(f"block:{i}", window)
            c = np.abs(update_cosines(block, backbone_direction(block, options["backbone"]), options["interval"])[1])
            rows.append({"block": i, "mean_abs_cos": float(c.mean()), "min_abs_cos": float(c.min()),
                         "max_abs_cos": float(c.max())})
        tables["per_block"] = rows
        scalars.update(block_mean_abs_cos=float(np.mean([r["mean_abs_cos"] for r in rows])),
                       block_min_abs_cos=float(min(r["mean_abs_cos"] for r in rows)),
                       block_max_abs_cos=float(max(r["mean_abs_cos"] for r in rows)))
    control_scope = options["control_scope"] or options["scope"]
    if options["control_batches"]:
        control_bb = bb if control_scope == options["scope"] else ctx.trajectory.backbone(control_scope, window)
        at = (ctx.trajectory.spread(options["control_steps"], len(options["control_steps"])) if options["control_steps"]
              else [options["control_step"]] if options["control_step"] is not None
              else ctx.trajectory.spread([], options["control_checkpoints"]))
        control = [c for step in at for c in gradient_control(ctx, control_bb, step, options["control_batches"],
                                                              backbone_direction(control_bb, options["backbone"]))]
        series["control_cos"] = control
        dimension = sum(np.prod(ctx.trajectory.parameter_shapes[n]) for n in control_bb.gram.names)
        scalars.update(control_mean_abs_cos=float(np.mean(np.abs(control))),
                       control_max_abs_cos=float(np.max(np.abs(control))),
                       isotropic_floor=float(1 / np.sqrt(dimension)), control_step=at[-1], control_checkpoints=len(at))
    variant = (("C(s) of u_s = θ_s − θ_(s−1 checkpoint)" if not options["interval"] else
                f"C(s) of u_s = θ_s − θ_(s−{options['interval']}) at the {len(steps)} checkpoints that have one")
               + f" against the {'row-normalized' if options['backbone'] == 'rownorm' else 'raw'} v_b of the "
               f"{options['scope']} PCA" + ("; per_block: each block (LayerNorms included) against its own v_b"
                                            if options["per_block"] else "")
               + (f"; control: {options['control_batches']} per-batch gradients at each of "
                  f"{len(at)} checkpoint(s) ({', '.join(map(str, at))}), "
                  f"{control_scope} scope" if options["control_batches"] else ""))
    return MetricResult(scalars=scalars, series=series, tables=tables, figures=[plot(ctx, series)], variant=variant)


def gradient_control(ctx, bb, step: int, n: int, direction: np.ndarray) -> list[float]:
    """cos(g, v_b) for `n` per-batch gradients of the composite loss at checkpoint `step`."""
    names = bb.gram.names
    v_b = ctx.setup.flatten(ctx.trajectory.materialize(bb.gram, direction), names)
    v_b = v_b / v_b.norm()
    return [float(torch.dot(g, v_b) / g.norm().clamp_min(1e-30)) for g in ctx.setup.batch_gradients(step, names, n)]


def plot(ctx, series) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(series["steps"], series["abs_cos"], marker="o", ms=3, label="|cos(u, v_b)| per interval")
    if "control_cos" in series:
        ax.axhline(np.mean(np.abs(series["control_cos"])), color="red", ls="--", label="mean |cos(g, v_b)|, per batch")
    ax.set_xlabel("step")
    ax.set_ylabel("|cos(u, v_b)|")
    ax.legend()
    fig.tight_layout()
    return ctx.figure(fig, "alignment", caption=(
        "How much of each update u = θ(t) − θ(t − Δ) lies along the backbone v_b, per checkpoint interval"
        + ("; dashed: the same cosine for single-batch gradients, the control" if "control_cos" in series else "")
        + "."))


TERMS = {
    "mean abs cos(u, v_b)": "the mean over checkpoint intervals of |⟨u, v_b⟩| / ‖u‖, u the update over one interval "
                            "and v_b the backbone (mean_abs_cos)",
    "gradient control": "the mean |cos(g, v_b)| of single-batch gradients of the composite loss; its isotropic floor "
                        "is about 1/√D (control_mean_abs_cos, isotropic_floor)",
}


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("alignment", "update-backbone alignment C(t) and the per-batch gradient control",
                          OPTIONS, compute, default=True, needs=("checkpoints", "model", "data", "gradients"),
                          min_checkpoints=BACKBONE_CHECKPOINTS,
                          columns={"mean_abs_cos": ("mean_abs_cos", "mean abs cos(u, v_b)"),
                                   "block_mean_abs_cos": ("block_mean_abs_cos", "mean abs cos(u, v_b), per block"),
                                   "control_mean_abs_cos": ("control_mean_abs_cos", "gradient control")},
                          terms=TERMS))
