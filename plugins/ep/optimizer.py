"""Equilibrium propagation as an optimizer plugin: it trains the `eqformer` family with its own
gradient rule (EP, or the BPTT and implicit-differentiation controls), after which AdamW applies
the update.

    geobench run ep                                   # symmetric EP, β = 0.05
    geobench run ep estimator=holo n_points=2 beta=0.02
    geobench run ep estimator=bptt                    # the exact-gradient control

Stability control: the validity gate skips a batch whose free phase did not converge below `gate`;
`jac_reg` adds a Hutchinson penalty on the block's Jacobian at the fixed point; with `jac_target` > 0
a controller scales that weight up while the free residual is above the target and down below it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from geobench.api import Batch, OptimizerPlugin, Param, Parameters, TrainingSchedule, hookimpl
from geobench.objective import composite_loss
from geobench.plugins.ep import relaxation as ep

PARAMS = {
    "estimator": Param("symmetric", "gradient rule", choices=ep.ESTIMATORS),
    "beta": Param(0.05, "nudge strength |β|", low=0, low_open=True),
    "n_points": Param(4, "holomorphic estimator: nudges on the circle of radius |β|", low=2),
    "nudge_steps": Param(15, "relaxation steps of each nudged phase", low=1),
    "implicit_steps": Param(60, "implicit estimator: iterations of the adjoint fixed point", low=1),
    "gate": Param(0.05, "skip a batch whose free-phase residual is above this (validity gate)", low=0, low_open=True),
    "max_skips": Param(20, "this many skipped batches in a row: the relaxation diverged, stop the run", low=1),
    "jac_reg": Param(0.0, "weight of the Jacobian penalty E‖Jᵀv‖² (0: off)", low=0),
    "jac_target": Param(0.0, "free residual the controller steers toward by scaling jac_reg (0: fixed weight)", low=0),
    "lr": Param(1e-3, "AdamW peak learning rate", low=0, low_open=True),
    "beta1": Param(0.9, "AdamW first-moment decay", low=0, high=1, high_open=True),
    "beta2": Param(0.95, "AdamW second-moment decay", low=0, high=1, high_open=True),
    "wd": Param(0.1, "AdamW decoupled weight decay", low=0),
}


def build(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
          schedule: TrainingSchedule) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(parameters.groups(weight_decay=hp["wd"]), lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]))
    optimizer.param_groups[0]["jac_weight"] = hp["jac_reg"]  # the controller's state, saved with the optimizer
    return optimizer


def gradient(*, model: Any, optimizer: torch.optim.Optimizer, batch: Batch, lam: float,
             hp: Mapping[str, Any], scale: float) -> dict[str, Any]:
    inputs, targets, mask = batch
    group = optimizer.param_groups[0]
    e, h, residual = ep.free_phase(model, inputs)
    if not math.isfinite(residual):
        return {"loss": math.nan, "free_residual": residual, "skipped": True}
    if residual > hp["gate"]:
        group["skipped_in_a_row"] = group.get("skipped_in_a_row", 0) + 1
        if group["skipped_in_a_row"] >= hp["max_skips"]:  # the relaxation no longer converges: a divergence
            return {"loss": math.nan, "free_residual": residual, "skipped": True}
        with torch.no_grad():
            loss = float(composite_loss(model.readout(h), targets, mask, lam))
        return {"loss": loss, "free_residual": residual, "skipped": True}
    group["skipped_in_a_row"] = 0
    if group["jac_weight"] > 0:
        ep.jacobian_penalty(model, e.detach(), h, group["jac_weight"] * scale)
        if hp["jac_target"] > 0:
            group["jac_weight"] *= 1.05 if residual > hp["jac_target"] else 1 / 1.05
    if hp["estimator"] == "bptt":
        info = ep.bptt_gradient(model, batch=batch, lam=lam, scale=scale)
    elif hp["estimator"] == "implicit":
        info = ep.implicit_gradient(model, e=e, h=h, batch=batch, lam=lam, steps=hp["implicit_steps"], scale=scale)
    else:
        info = ep.ep_gradient(model, e=e, h=h, batch=batch, lam=lam, estimator=hp["estimator"], beta=hp["beta"],
                              n_points=hp["n_points"], nudge_steps=hp["nudge_steps"], scale=scale)
    return {**info, "free_residual": residual, "skipped": False}


@hookimpl
def geobench_register_optimizers(register):
    register(OptimizerPlugin(name="ep", help="equilibrium propagation on the eqformer (estimators: "
                             + ", ".join(ep.ESTIMATORS) + "), then AdamW", params=PARAMS, build=build,
                             family="eqformer", gradient=gradient, metrics=("ep",)))
