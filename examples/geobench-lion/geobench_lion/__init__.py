"""Lion as a geobench optimizer plugin."""

from collections.abc import Mapping
from typing import Any

import torch

from geobench import Param, hookimpl
from geobench.registry import OptimizerPlugin

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


def build(*, groups: list[dict], hp: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """`groups` arrive with their weight decay set from `wd` (none on LayerNorm weights and biases)."""
    return Lion(groups, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]))


@hookimpl
def geobench_register_optimizers(register):
    register(OptimizerPlugin(name="lion", help="Lion: sign of interpolated momentum (Chen et al. 2023)",
                             params=PARAMS, build=build, weight_decay="wd"))
