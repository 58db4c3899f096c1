"""AdamW with decoupled weight decay (no decay on LayerNorm weights and biases).

`geobench run adamw beta2=0.9` is the β₂ variant of the sweep of docs/science.md#the-beta2-sweep; beta2=0 is allowed and is
expected to diverge.
"""

from collections.abc import Mapping
from typing import Any

import torch

from geobench.api import OptimizerPlugin, Param, Parameters, TrainingSchedule, hookimpl

PARAMS = {
    "lr": Param(1e-3, "peak learning rate", low=0, low_open=True),
    "beta1": Param(0.9, "first-moment decay", low=0, high=1, high_open=True),
    "beta2": Param(0.95, "second-moment decay", low=0, high=1, high_open=True),
    "eps": Param(1e-8, "denominator epsilon", low=0, low_open=True),
    "wd": Param(0.5, "decoupled weight decay (matrices and embeddings only)", low=0),
}


def build(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
          schedule: TrainingSchedule) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameters.groups(weight_decay=hp["wd"]),
        lr=hp["lr"],
        betas=(hp["beta1"], hp["beta2"]),
        eps=hp["eps"],
        fused=device.type == "cuda",
    )


@hookimpl
def geobench_register_optimizers(register):
    register(OptimizerPlugin(name="adamw", help="AdamW, decoupled weight decay", params=PARAMS, build=build))
