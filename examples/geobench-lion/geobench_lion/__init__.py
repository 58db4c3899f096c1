"""Lion as a geobench optimizer plugin."""

from collections.abc import Mapping
from typing import Any

import torch

from geobench.api import OptimizerPlugin, Param, Parameters, TrainingSchedule, hookimpl

__version__ = "0.1.0"


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


PARAMS = {
    "lr": Param(1e-4, "peak learning rate (Lion wants ~3-10x less than AdamW)", low=0, low_open=True),
    "beta1": Param(0.9, "interpolation for the update direction", low=0, high=1),
    "beta2": Param(0.99, "momentum decay", low=0, high=1),
    "wd": Param(0.1, "decoupled weight decay (matrices and embeddings only)", low=0),
}


def build(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
          schedule: TrainingSchedule) -> torch.optim.Optimizer:
    """The standard groups: weight decay `wd` on matrices and embeddings, none on norms and biases."""
    return Lion(parameters.groups(weight_decay=hp["wd"]), lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]))


@hookimpl
def geobench_register_optimizers(register):
    register(OptimizerPlugin(name="lion-example", help="Lion written out as an example plugin: sign of "
                             "interpolated momentum (Chen et al. 2023)", params=PARAMS, build=build))
