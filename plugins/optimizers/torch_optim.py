"""Any `torch.optim` optimizer by class name: `geobench run torch:Adagrad lr=0.01`.

The hyperparameters are the class's own keyword arguments with a number or flag default, declared
from its signature; torch's own checks of their values are reported as usage errors.
"""

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from geobench.api import OptimizerPlugin, Param, Parameters, TrainingSchedule, UsageError, did_you_mean, hookimpl

NEEDS_CLOSURE = {"LBFGS"}  # step(closure) evaluates the loss several times
HINTS = {"Muon": " (Muon takes the hidden 2-D matrices only: the `muon` plugin gives it those and AdamW the rest)"}


def _classes() -> dict[str, type]:
    return {
        name: cls for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }


def _declared(cls: type) -> dict[str, Param]:
    params = {}
    for name, arg in inspect.signature(cls).parameters.items():
        default = arg.default
        if name == "lr" and isinstance(default, torch.Tensor):
            default = float(default)
        if isinstance(default, (bool, int, float)):
            low = 0 if isinstance(default, (int, float)) and not isinstance(default, bool) and default >= 0 else None
            params[name] = Param(default, f"{cls.__name__}({name}=...)", low=low)
        elif isinstance(default, tuple) and all(isinstance(v, (int, float)) for v in default):
            params[name] = Param(default, f"{cls.__name__}({name}=...)", kind=tuple)
    return params


def variant(class_name: str) -> OptimizerPlugin:
    classes = _classes()
    if class_name not in classes:
        raise UsageError(
            f"torch.optim has no optimizer {class_name!r}{did_you_mean(class_name, classes)}; "
            f"available: {', '.join(sorted(classes))}"
        )
    cls = classes[class_name]

    def build(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
              schedule: TrainingSchedule) -> torch.optim.Optimizer:
        kwargs = {k: v for k, v in hp.items() if k != "weight_decay"}  # the groups carry it
        # a class without weight decay gets one group: some (LBFGS) take no per-group options at all
        groups = (parameters.groups(weight_decay=hp["weight_decay"]) if "weight_decay" in hp
                  else [{"params": parameters.tensors()}])
        try:
            return cls(groups, **kwargs)
        except (ValueError, TypeError, RuntimeError) as exc:
            hint = HINTS.get(class_name, "")
            raise UsageError(f"torch:{class_name} could not be built over the model's parameters with "
                             f"{dict(kwargs)}: {exc}{hint}") from None

    params = _declared(cls)
    return OptimizerPlugin(name=f"torch:{class_name}", help=f"torch.optim.{class_name}", params=params, build=build,
                           closure=class_name in NEEDS_CLOSURE)


def build_unresolved(*, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
                     schedule: TrainingSchedule) -> torch.optim.Optimizer:
    raise UsageError("name a torch.optim class: torch:NAME")


@hookimpl
def geobench_register_optimizers(register):
    register(OptimizerPlugin(name="torch", help="any torch.optim optimizer by class name: torch:NAME",
                             params={}, build=build_unresolved, variants=variant))
