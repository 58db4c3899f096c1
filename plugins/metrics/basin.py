"""Basin tests (docs/science.md#basin-depth).

B1, recovery: from a peak or a trough checkpoint, a fresh AdamW (lr 1e-3, λ = 8, constant lr)
trains up to 1000 steps; how many steps until p_ood ≥ 0.6.
B6, depth: perturb every trunk matrix by σ·rms(W)·Z (Z standard normal) for σ in a grid, relax 300
steps with a fresh AdamW (constant lr 6e-4, λ = 4, batch 64); D_σ = mean p_ood after relaxing, over
`repeats` perturbation seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench import series as series_math
from geobench.api import MetricPlugin, MetricResult, Param, hookimpl
from geobench.schedule import check_checkpoint_steps

if TYPE_CHECKING:
    from geobench.api import Config, MetricContext, Plugins


OPTIONS = {
    "recovery_from": Param([], "checkpoints for B1 (empty: the best-p_ood checkpoint and the lowest after it)", items=int),
    "recovery_steps": Param(1000, "B1 training steps", low=1),
    "recovery_lr": Param(1e-3, "B1 AdamW learning rate", low=0, low_open=True),
    "recovery_lam": Param(8.0, "B1 probe-loss weight λ", low=0),
    "recovery_grad_accum": Param(0, "micro-batches per B1 step (0: the run's; the source's B1: 1, 64 sequences)", low=0),
    "depth_from": Param(None, "checkpoint for B6 (none: the last)", kind=int, nullable=True, low=1),
    "sigmas": Param([0.0, 0.01, 0.03, 0.1, 0.3], "B6 perturbation scales σ", items=float),
    "relax_steps": Param(300, "B6 relaxation steps", low=1),
    "relax_lr": Param(6e-4, "B6 AdamW learning rate", low=0, low_open=True),
    "relax_lam": Param(4.0, "B6 probe-loss weight λ", low=0),
    "relax_batch": Param(64, "B6 batch size", low=1),
    "repeats": Param(1, "B6 perturbation seeds per σ", low=1),
    "eval_every": Param(50, "evaluate every N steps", low=1),
    "threshold": Param(0.6, "p_ood that counts as recovered", low=0, high=1),
}


def constant_adamw(steps: int, lr: float, lam: float, eval_every: int) -> dict:
    return {"optimizer.name": "adamw", "optimizer.params.lr": lr, "train.steps": steps, "train.warmup": 0,
            "train.lr_floor": 1.0, "train.lambda_schedule": [[0, lam]], "train.eval_every": eval_every,
            "train.checkpoint_every": steps, "train.state_every": steps, "train.checkpoint_window": []}


def perturbation(sigma: float, seed: int, names: list[str]):
    """W ← W + σ · rms(W) · Z on every matrix of `names` (the trunk)."""
    def apply(model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        generator = torch.Generator().manual_seed(seed)
        for name in names:
            w = params[name]
            noise = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
            w.add_(sigma * w.pow(2).mean().sqrt() * noise)
    return apply


def default_recovery_points(ctx) -> list[int]:
    p = series_math.p_ood_at(ctx.evals, ctx.trajectory.checkpoint_steps())
    if not p:
        return [ctx.trajectory.checkpoint_steps()[-1]]
    best = max(p, key=lambda s: p[s])
    after = {s: v for s, v in p.items() if s > best}
    return [best] + ([min(after, key=lambda s: after[s])] if after else [])


def check(*, config: Config, options: Mapping[str, Any], reg: Plugins) -> None:
    check_checkpoint_steps(config, options["recovery_from"], "basin.recovery_from")
    if options["depth_from"] is not None:
        check_checkpoint_steps(config, [options["depth_from"]], "basin.depth_from")


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    t = options["threshold"]
    recovery = []
    b1 = constant_adamw(options["recovery_steps"], options["recovery_lr"], options["recovery_lam"], options["eval_every"])
    if options["recovery_grad_accum"]:
        b1["train.grad_accum"] = options["recovery_grad_accum"]
    for step in options["recovery_from"] or default_recovery_points(ctx):
        evals = ctx.retrain(step=step, name=f"b1-from{step}", overrides=b1)
        reached = next((e.step for e in evals if e.p_ood is not None and e.p_ood >= t), None)
        recovery.append({"from_step": step, "start_p_ood": evals[0].p_ood, "steps_to_threshold": reached,
                         "best_p_ood": max(e.p_ood if e.p_ood is not None else 0.0 for e in evals)})
    step = ctx.trajectory.checkpoint_steps()[-1] if options["depth_from"] is None else options["depth_from"]
    relax = constant_adamw(options["relax_steps"], options["relax_lr"], options["relax_lam"], options["relax_steps"])
    relax["train.batch_size"], relax["train.grad_accum"] = options["relax_batch"], 1
    depth, trunk = [], ctx.trajectory.scope("trunk")
    for sigma in options["sigmas"]:
        finals = []
        for seed in range(options["repeats"]):
            evals = ctx.retrain(step=step, name=f"b6-from{step}-sigma{sigma:g}-seed{seed}", overrides=relax,
                               perturb=perturbation(sigma, seed, trunk))
            final = evals[-1].p_ood
            finals.append(final if final is not None else float("nan"))
        depth.append({"sigma": sigma, "depth": float(np.mean(finals)), "p_ood_after": finals})
    scalars = {"depth_at_largest_sigma": depth[-1]["depth"],
               "recovered": sum(r["steps_to_threshold"] is not None for r in recovery), "recovery_runs": len(recovery)}
    result = MetricResult(scalars=scalars, tables={"b1_recovery": recovery, "b6_depth": depth})
    least = min(depth, key=lambda row: row["sigma"], default=None)
    if least and not least["depth"] >= series_math.PROBE_LEARNED:  # also NaN
        result.no_signal = (f"no basin: p_ood after relaxing the smallest perturbation (σ = {least['sigma']:g}) "
                               f"is {least['depth']:.3g} < {series_math.PROBE_LEARNED:g}; there is no learned probe to "
                               "perturb")
    return result


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("basin", "B1 recovery steps from peak/trough checkpoints and B6 basin depth",
                          OPTIONS, compute, needs=("checkpoints", "evals", "model", "data", "training"), check=check,
                          columns={"basin_depth": ("depth_at_largest_sigma", "B6 depth at the largest σ")},
                          terms={"B1 recovery": "steps until p_ood ≥ the threshold when a fresh AdamW trains on from a "
                                                "peak or trough checkpoint (steps_to_threshold)",
                                 "B6 depth at the largest σ": "mean p_ood after relaxing trunk weights perturbed by "
                                                              "σ · rms(W) · Z, at the largest σ (D_σ)"}))
