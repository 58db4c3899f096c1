"""Per-block update norms as a geobench metric plugin.

Between consecutive checkpoints s < t of a run, the update of a parameter scope is
Δ = θ_t − θ_s over the scope's parameters; the metric reports ‖Δ‖ / (t − s), the mean update
length per step, divided by ‖θ_t‖ over the same scope when `relative` is on (the default): how
fast each block moves, relative to its size. Scopes: the trunk and every block of the run's model,
from the model family's own parameter layout (so it needs a geobench run, not only checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from geobench.api import MetricContext, MetricPlugin, MetricResult, Param, UsageError, hookimpl

__version__ = "0.1.0"

OPTIONS = {
    "relative": Param(True, "divide each update's length by the norm of the weights after it"),
    "window": Param([], "checkpoints inside [start, end] only (empty: the whole run)", items=int),
}


def scope_norms(weights: Mapping[str, Any], names: list[str]) -> float:
    return math.sqrt(sum(float((weights[n].double() ** 2).sum()) for n in names))


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    trajectory = ctx.trajectory
    steps = trajectory.window(options["window"], minimum=2)
    scopes = {"trunk": trajectory.scope("trunk"),
              **{f"block:{i}": trajectory.scope(f"block:{i}") for i in trajectory.block_indices()}}
    rows = []
    before = trajectory.load_checkpoint(steps[0])
    for previous, step in zip(steps, steps[1:]):
        after = trajectory.load_checkpoint(step)
        row: dict[str, Any] = {"step": step}
        for scope, names in scopes.items():
            delta = {n: after[n].double() - before[n].double() for n in names}
            length = scope_norms(delta, names) / (step - previous)
            row[scope] = length / scope_norms(after, names) if options["relative"] else length
        rows.append(row)
        before = after
    if not any(row["trunk"] > 0 for row in rows):
        raise UsageError(f"the trunk did not move over steps {steps[0]}..{steps[-1]}")
    trunk = [row["trunk"] for row in rows]
    series = {"steps": [row["step"] for row in rows], **{scope: [row[scope] for row in rows] for scope in scopes}}
    return MetricResult(scalars={"trunk_mean": float(np.mean(trunk)), "trunk_last": trunk[-1]},
                        series=series, tables={"updates": rows}, figures=[plot(ctx, series, scopes)],
                        variant=("‖θ_t − θ_s‖ / (t − s) between consecutive checkpoints"
                                 + (", divided by ‖θ_t‖ of the scope" if options["relative"] else "")))


def plot(ctx: MetricContext, series: dict, scopes: Mapping[str, list[str]]) -> str:
    from geobench.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for scope in scopes:
        ax.plot(series["steps"], series[scope], label=scope)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("update length per step (parameter L2 units)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return ctx.figure(fig, "update_norms", caption="‖θ_t − θ_s‖ / (t − s) between consecutive checkpoints, per scope.")


def comparison_figures(*, runs, groups, references, plt, save) -> None:
    """The trunk's update length per step of every run on one axis."""
    if not runs:
        return
    from geobench.figures import Line, draw

    lines = [Line(run.label, run.result.series["steps"], run.result.series["trunk"], colour=run.colour, group=run.group,
                  length=run.steps) for run in runs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    said = draw(ax, lines, ylabel="trunk update length per step (parameter L2 units)")
    save(fig, "update_norms_trunk", caption="The trunk's update length per step between checkpoints, every run"
                                           + "".join(f"; {s}" for s in said) + ".")


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("update_norms", "update length per step of the trunk and of every block, between checkpoints",
                          OPTIONS, compute, needs=("checkpoints", "run"),
                          columns={"update_norm": ("trunk_mean", "trunk update/step")},
                          comparison_figures=comparison_figures,
                          terms={"trunk update/step": "the mean over checkpoint intervals of the trunk's "
                                                      "‖θ_t − θ_s‖ / (t − s) (trunk_mean)"}))
