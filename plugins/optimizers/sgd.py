"""SGD with optional (Nesterov) momentum and weight decay as L2 or decoupled.

Covers the controls of docs/science.md#optimizer-controls: B = `sgd lr=1e-3 wd=0.5`, C = `sgd lr=1e-2 momentum=0.9 wd=0.05`,
C′ = `sgd lr=1e-2 momentum=0.9 nesterov=true wd=0.5 wd_mode=decoupled`.
"""

from collections.abc import Mapping
from typing import Any

import torch

from geobench.api import OptimizerPlugin, Param, Parameters, TrainingSchedule, UsageError, hookimpl

PARAMS = {
    "lr": Param(1e-3, "peak learning rate", low=0, low_open=True),
    "momentum": Param(0.0, "momentum coefficient", low=0, high=1, high_open=True),
    "nesterov": Param(False, "Nesterov momentum (needs momentum > 0)"),
    "wd": Param(0.5, "weight decay (matrices and embeddings only)", low=0),
    "wd_mode": Param("l2", "l2: added to the gradient; decoupled: θ ← (1 − lr_t·wd)θ after the step",
                     choices=("l2", "decoupled")),
}


class DecoupledSGD(torch.optim.SGD):
    """SGD whose weight decay shrinks the weights after the step by the scheduled lr: θ ← (1 − lr_t·wd)θ.
    A group's `weight_decay` becomes its `decoupled_wd`; SGD itself then adds none to the gradient."""

    def __init__(self, groups: list[dict], **kwargs: Any):
        for group in groups:
            group["decoupled_wd"], group["weight_decay"] = group.pop("weight_decay", 0.0), 0.0
        super().__init__(groups, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group["decoupled_wd"]:
                torch._foreach_mul_(group["params"], 1.0 - group["lr"] * group["decoupled_wd"])
        return loss


def build(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
          schedule: TrainingSchedule) -> torch.optim.Optimizer:
    if hp["nesterov"] and hp["momentum"] == 0:
        raise UsageError("nesterov=true needs momentum > 0")
    common = {"lr": hp["lr"], "momentum": hp["momentum"], "nesterov": hp["nesterov"]}
    groups = parameters.groups(weight_decay=hp["wd"])
    if hp["wd_mode"] == "decoupled":
        return DecoupledSGD(groups, **common)
    return torch.optim.SGD(groups, **common)


@hookimpl
def geobench_register_optimizers(register):
    register(OptimizerPlugin(name="sgd", help="SGD, (Nesterov) momentum, L2 or decoupled weight decay",
                             params=PARAMS, build=build))
