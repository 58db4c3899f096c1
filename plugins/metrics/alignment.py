"""Update–backbone alignment (SPEC §4): C(t) = ⟨u, v_b⟩/‖u‖ for the update u over one checkpoint
interval, and the control cos(g, v_b) of per-batch gradients (isotropic floor ~1/√D)."""

from __future__ import annotations

import numpy as np
import torch

from geobench import Param, hookimpl
from geobench.registry import MetricPlugin

OPTIONS = {
    "scope": Param("trunk", "parameters: trunk, all or block:I"),
    "window": Param([], "checkpoint steps [start, end] (empty: the whole run)"),
    "control_batches": Param(16, "per-batch gradients for the control (0: skip it)", low=0),
    "control_step": Param(-1, "checkpoint of the gradient control (-1: the last)"),
}


def compute(ctx, options: dict) -> dict:
    bb = ctx.backbone(options["scope"], tuple(options["window"]))
    gram, steps = bb.gram, bb.gram.steps
    cosines = []
    for i in range(1, len(steps)):
        u = np.zeros(len(steps))
        u[i], u[i - 1] = 1.0, -1.0
        norm = gram.norm(u)
        cosines.append(gram.inner(u, bb.v_b) / norm if norm > 0 else 0.0)
    signed = np.array(cosines)
    scalars = {"mean_abs_cos": float(np.abs(signed).mean()), "min_abs_cos": float(np.abs(signed).min()),
               "max_abs_cos": float(np.abs(signed).max()), "mean_signed_cos": float(signed.mean())}
    series = {"steps": steps[1:], "cos": signed.tolist(), "abs_cos": np.abs(signed).tolist()}
    if options["control_batches"]:
        step = steps[-1] if options["control_step"] < 0 else options["control_step"]
        control = gradient_control(ctx, bb, step, options["control_batches"])
        series["control_cos"] = control
        scalars.update(control_mean_abs_cos=float(np.mean(np.abs(control))),
                       control_max_abs_cos=float(np.max(np.abs(control))),
                       isotropic_floor=float(1 / np.sqrt(sum(np.prod(ctx.parameter_shapes[n]) for n in gram.names))),
                       control_step=step)
    return {"scalars": scalars, "series": series, "figures": [plot(ctx, series)]}


def gradient_control(ctx, bb, step: int, n: int) -> list[float]:
    """cos(g, v_b) for `n` per-batch gradients of the composite loss at checkpoint `step`."""
    names = bb.gram.names
    v_b = ctx.flatten(ctx.materialize(bb.gram, bb.v_b), names)
    v_b = v_b / v_b.norm()
    return [float(torch.dot(g, v_b) / g.norm().clamp_min(1e-30)) for g in ctx.batch_gradients(step, names, n)]


def plot(ctx, series) -> str:
    from geobench.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(series["steps"], series["abs_cos"], marker="o", ms=3, label="|cos(u, v_b)| per interval")
    if "control_cos" in series:
        ax.axhline(np.mean(np.abs(series["control_cos"])), color="red", ls="--", label="mean |cos(g, v_b)|, per batch")
    ax.set_xlabel("step")
    ax.set_ylabel("|cosine|")
    ax.legend()
    fig.tight_layout()
    return ctx.figure(fig, "alignment")


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("alignment", "update-backbone alignment C(t) and the per-batch gradient control",
                          OPTIONS, compute, needs=("checkpoints", "model", "data")))
