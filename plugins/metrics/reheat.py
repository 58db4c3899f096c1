"""Reheating (docs/science.md#reheating): from a checkpoint, a FRESH optimizer of the run's kind (or a named one)
trains again with λ raised, warmup and cosine decay, for each learning rate of a grid; how high
does p_ood climb, when, and what is the re-entry gain G = max p_ood − p_ood at the start (by
default the start evaluation is included, so G ≥ 0; `peak=after_start` leaves it out)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from geobench import series as series_math
from geobench.api import MetricPlugin, MetricResult, Param, UsageError, hookimpl
from geobench.schedule import check_checkpoint_steps

if TYPE_CHECKING:
    from geobench.api import Config, EvalRecord, MetricContext, Plugins


OPTIONS = {
    "from_steps": Param([], "checkpoints to reheat (empty: the last)", items=int),
    "lrs": Param([1e-3, 6e-4, 3e-4], "learning-rate grid", items=float),
    "lam": Param(4.0, "probe-loss weight λ during the reheat", low=0),
    "steps": Param(2000, "reheat steps", low=1),
    "warmup": Param(200, "linear warmup steps", low=0),
    "eval_every": Param(200, "evaluate every N steps (and at steps 0 and 1)", low=1),
    "optimizer": Param(None, "optimizer plugin (none: the run's own, with its hyperparameters)", kind=str,
                       nullable=True),
    "threshold": Param(0.6, "report the first step with p_ood at or above this", low=0, high=1),
    "grad_accum": Param(0, "micro-batches per reheat step (0: the run's; the source's β₂ reheats used 1)", low=0),
    "p_probe": Param(None, "probe rate of the reheat's training data (none: the run's; the source's β₂ reheats: 0.10 "
                           "after training at 0.20)", kind=float, nullable=True, low=0, high=1),
    "peak": Param("with_start", "the peak p_ood over every evaluation of the reheat, the start included ('with_start': "
                                "G >= 0), or over those after it ('after_start': G < 0 when the reheat only lowers "
                                "p_ood, as the source's β₂ table)", choices=("with_start", "after_start")),
}


def check(*, config: Config, options: Mapping[str, Any], reg: Plugins) -> None:
    check_checkpoint_steps(config, options["from_steps"], "reheat.from_steps")
    if options["optimizer"] is not None:
        try:
            reg.optimizer(options["optimizer"])
        except UsageError as exc:
            raise UsageError(f"reheat.optimizer: {exc}") from None


def summarize(evals: list[EvalRecord], threshold: float, peak_over: str = "with_start") -> dict:
    """Peak, its step, the first step reaching the threshold, the final value and G = peak − start of
    a p_ood curve whose first point is the start; the peak over the whole curve ("with_start") or
    over the points after the start ("after_start")."""
    curve = [(e.step, e.p_ood) for e in evals if e.p_ood is not None and np.isfinite(e.p_ood)]
    steps, p = zip(*curve)
    first = 1 if peak_over == "after_start" and len(p) > 1 else 0
    peak = first + int(np.argmax(p[first:]))
    reached = next((s for s, v in curve if v >= threshold), None)
    return {"start_p_ood": p[0], "peak_p_ood": p[peak], "peak_step": steps[peak], "first_step_at_threshold": reached,
            "final_p_ood": p[-1], "gain": p[peak] - p[0], "diverged": any(e.diverged for e in evals)}


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    rows, curves = [], []
    for step in options["from_steps"] or [ctx.trajectory.checkpoint_steps()[-1]]:
        rows_step, curves_step = reheat_from(ctx, step, options)
        rows += rows_step
        curves += curves_step
    best = max(rows, key=lambda r: r["peak_p_ood"])
    scalars = {"best_from_step": best["from_step"], "best_lr": best["lr"], "best_peak_p_ood": best["peak_p_ood"],
               "best_gain": best["gain"]}
    t = ctx.run_config().train
    variant = (f"a fresh {options['optimizer'] or ctx.run_config().optimizer.name} per lr, λ = {options['lam']:g}, "
               f"{options['steps']} steps, warmup {options['warmup']} then the cosine clamped at "
               f"{t.lr_floor:g} of the peak, {t.batch_size} × {options['grad_accum'] or t.grad_accum} sequences per step, "
               f"p_probe {options['p_probe'] if options['p_probe'] is not None else ctx.run_config().probe.p_probe:g}; "
               "G = max p_ood − p_ood at the start ("
               + ("the start evaluation included)" if options["peak"] == "with_start" else "the max over the evaluations "
                  "after the start)"))
    result = MetricResult(scalars=scalars, tables={"reheat": rows, "curves": curves}, figures=[plot(ctx, curves)],
                          variant=variant)
    if best["peak_p_ood"] < series_math.PROBE_LEARNED:
        result.no_signal = (f"no re-entry: p_ood stayed below {series_math.PROBE_LEARNED:g} in every reheat "
                               f"(best peak {best['peak_p_ood']:.3g}); the run has no learned probe to return to")
    return result


def reheat_from(ctx: MetricContext, step: int, options: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    rows, curves = [], []
    for lr in options["lrs"]:
        overrides = {"train.steps": options["steps"], "train.warmup": options["warmup"],
                     "train.lambda_schedule": [[0, options["lam"]]], "train.eval_every": options["eval_every"],
                     "train.checkpoint_every": options["steps"], "train.state_every": options["steps"],
                     "train.checkpoint_window": [], "optimizer.params.lr": lr}
        if options["optimizer"]:
            overrides["optimizer.name"] = options["optimizer"]
        if options["grad_accum"]:
            overrides["train.grad_accum"] = options["grad_accum"]
        if options["p_probe"] is not None:
            overrides["probe.p_probe"] = options["p_probe"]
        evals = ctx.retrain(step=step, name=f"reheat-from{step}-lr{lr:g}", overrides=overrides)
        curves += [{"from_step": step, "lr": lr, "step": e.step, "p_ood": e.p_ood} for e in evals if e.p_ood is not None]
        rows.append({"from_step": step, "lr": lr, **summarize(evals, options["threshold"], options["peak"])})
    return rows, curves


def plot(ctx, curves: list[dict]) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for start, lr in dict.fromkeys((c["from_step"], c["lr"]) for c in curves):
        points = [c for c in curves if c["lr"] == lr and c["from_step"] == start]
        ax.plot([c["step"] for c in points], [c["p_ood"] for c in points], marker="o", ms=3,
                label=f"from {start}, lr {lr:g}")
    ax.set_xlabel("step of the reheat run")
    ax.set_ylabel("p_ood (probe exact match, OOD gaps)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    return ctx.figure(fig, "reheat", caption=(
        "p_ood while a fresh optimizer trains on from each checkpoint at each learning rate; the first point is the "
        "checkpoint's own p_ood (the reheat start)."))


def comparison_figures(*, runs, groups, references, plt, save) -> None:
    """Every reheat curve of every run on one axis: a colour per run, a line style per learning rate."""
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = ("-", "--", ":", "-.")
    lrs = list(dict.fromkeys(c["lr"] for run in runs for c in run.result.tables["curves"]))
    for run in runs:
        curves = run.result.tables["curves"]
        for start, lr in dict.fromkeys((c.get("from_step"), c["lr"]) for c in curves):
            points = [c for c in curves if c.get("from_step") == start and c["lr"] == lr]
            ax.plot([c["step"] for c in points], [c["p_ood"] for c in points], color=run.colour,
                    ls=styles[lrs.index(lr) % len(styles)], marker="o", ms=2, markevery=[0],
                    label=f"{run.label}, from step {start}, lr {lr:g}")
    ax.set_xlabel("step of the reheat run")
    ax.set_ylabel("p_ood (probe exact match, OOD gaps)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    save(fig, "reheat_curves", caption=(
        "p_ood while a fresh optimizer trains on from a checkpoint of each run (a colour per run, a line style per "
        "learning rate); the marked first point is the checkpoint's own p_ood, where G is measured from."))


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("reheat", "re-train from a checkpoint with a fresh optimizer: peak p_ood and gain G per lr",
                          OPTIONS, compute, needs=("checkpoints", "model", "data", "training"), check=check,
                          columns={"gain": ("best_gain", "G (best lr)")}, comparison_figures=comparison_figures,
                          terms={"G (best lr)": "the re-entry gain G, the highest p_ood while a fresh optimizer trains "
                                                "on from the checkpoint minus p_ood at the start (so G ≥ 0), at the "
                                                "learning rate where it is largest (best_gain); the reheat figure and "
                                                "each run's report give every learning rate's",
                                 "peak p_ood": "the highest p_ood of a reheat run, at the step given beside it"}))
