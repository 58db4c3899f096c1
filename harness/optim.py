"""What the harness does with an optimizer besides stepping it: building it over the model's roled
parameters (a `Composite` of several over disjoint roles included), the check of a
harness-scheduled optimizer, eval mode, and what the report records of it (its groups, the
libraries behind it, the size of its state)."""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib.metadata
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from geobench.api import OptimizerPlugin, Parameters, TrainingSchedule, UsageError
from geobench.composite import Composite


def parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    return list(optimizer.parts.values()) if isinstance(optimizer, Composite) else [optimizer]


def has_eval_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer (or a part of it) keeps weights that differ between its train and eval
    modes (Schedule-Free: train mode holds y, where gradients are taken; eval mode x, the average)."""
    return any(callable(getattr(part, "eval", None)) and callable(getattr(part, "train", None))
               for part in parts(optimizer))


def set_mode(optimizer: torch.optim.Optimizer, *, train: bool) -> None:
    for part in parts(optimizer):
        switch = getattr(part, "train" if train else "eval", None)
        if callable(switch):
            switch()


@contextlib.contextmanager
def eval_mode(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The model holds the optimizer's eval-mode weights inside the block (no-op for optimizers
    without modes); training resumes in train mode after it."""
    set_mode(optimizer, train=False)
    try:
        yield
    finally:
        set_mode(optimizer, train=True)


def build(plugin: OptimizerPlugin, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
          schedule: TrainingSchedule) -> torch.optim.Optimizer:
    """The plugin's optimizer over `parameters`, checked: every parameter in exactly one group, and
    for a harness-scheduled optimizer an `lr` in every group (recorded as the group's `peak_lr`)."""
    optimizer = plugin.build(parameters=parameters, hp=hp, device=device, schedule=schedule)
    grouped = collections.Counter(id(p) for group in optimizer.param_groups for p in group["params"])
    wrong = [(p.name, grouped[id(p.tensor)]) for p in parameters if grouped[id(p.tensor)] != 1]
    if wrong:
        raise UsageError(f"optimizer {plugin.name!r} must put every parameter in exactly one group; "
                         f"{wrong[0][0]} is in {wrong[0][1]}")
    if plugin.schedule == "harness":
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr):
                raise UsageError(f"optimizer {plugin.name!r} is scheduled by the harness but a parameter group of "
                                 f"{type(part_of(optimizer, group)).__name__} has no numeric 'lr' (got {lr!r}); "
                                 "give every group an lr, or declare schedule='self'")
            group["peak_lr"] = float(lr)
    return optimizer


def part_of(optimizer: torch.optim.Optimizer, group: dict) -> torch.optim.Optimizer:
    return optimizer.part_of(group) if isinstance(optimizer, Composite) else optimizer


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """The harness's schedule: every group's lr is its peak × factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def check_lr_zero_moves_nothing(plugin: OptimizerPlugin, model: torch.nn.Module, parameters_of: Callable[
        [torch.nn.Module], Parameters], hp: Mapping[str, Any], device: torch.device, schedule: TrainingSchedule) -> None:
    """A harness-scheduled optimizer must follow the lr the harness writes: on a throwaway copy of
    the model, one step at the peak lr (its state initialized), then one at lr = 0, which must leave
    every weight as it was. Optimizers that keep their own step size (Rprop, ASGD) fail here instead
    of silently ignoring the schedule."""
    twin = copy.deepcopy(model)
    parameters = parameters_of(twin)
    optimizer = build(plugin, parameters, hp, device, schedule)
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(p.tensor.shape, generator=generator).to(device, p.tensor.dtype) for p in parameters]

    def closure() -> float:  # a quadratic bowl around random targets: every optimizer has a gradient to take
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = torch.stack([((p.tensor - t) ** 2).sum() for p, t in zip(parameters, targets)]).sum() / 2
            loss.backward(create_graph=plugin.second_order)
        return float(loss.detach())

    for factor in (1.0, 0.0):
        set_lr(optimizer, factor)
        closure()
        before = [p.tensor.detach().clone() for p in parameters]
        try:
            optimizer.step(closure) if plugin.closure else optimizer.step()
        except ZeroDivisionError:  # a line search dividing by its zero step (L-BFGS); the weights are judged below
            if factor:
                raise
    moved = [p.name for p, b in zip(parameters, before) if not torch.equal(p.tensor.detach(), b)]
    if moved:
        raise UsageError(f"optimizer {plugin.name!r} moved {moved[0]} in a step at lr = 0: it does not follow the lr "
                         "the harness schedules (warmup + cosine), which it would silently ignore; a plugin for it "
                         "must declare schedule='self'")


def _floats(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() if value.is_floating_point() or value.is_complex() else 0
    if isinstance(value, Mapping):
        return sum(_floats(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_floats(v) for v in value)
    return 0


def state_floats_per_parameter(optimizer: torch.optim.Optimizer, n_parameters: int) -> float:
    """Floating-point numbers the optimizer keeps in its state per model parameter (AdamW: 2)."""
    held = sum(_floats(dict(part.state)) for part in parts(optimizer))
    return held / max(n_parameters, 1)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return None


def name_pattern(names: list[str]) -> str:
    """Parameter names with block indices folded: `blocks.*.attn.qkv.weight, wte.weight`."""
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def assignment(optimizer: torch.optim.Optimizer, parameters: Parameters) -> list[dict[str, Any]]:
    """Each parameter group: the optimizer class stepping it, its hyperparameters, its parameters
    (count of values, the roles and the names' pattern)."""
    by_id = {id(p.tensor): p for p in parameters}
    groups = []
    for group in optimizer.param_groups:
        members = [by_id[id(t)] for t in group["params"] if id(t) in by_id]
        part = part_of(optimizer, group)
        hyper = {"lr": _plain(group.get("peak_lr", group.get("lr")))}  # the peak, for a harness-scheduled one
        hyper |= {k: v for k, v in ((k, _plain(v)) for k, v in group.items() if k not in ("params", "lr", "peak_lr"))
                  if v is not None}
        groups.append({"optimizer": f"{type(part).__module__}.{type(part).__qualname__}",
                       "hyperparameters": hyper,
                       "parameters": sum(p.tensor.numel() for p in members),
                       "roles": sorted({p.role for p in members}),
                       "names": name_pattern([p.name for p in members])})
    return groups


def libraries(plugin: OptimizerPlugin) -> dict[str, str]:
    """torch and the distributions the plugin requires, with their installed versions."""
    out = {"torch": str(torch.__version__)}
    for dist in plugin.requires:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def describe(plugin: OptimizerPlugin, optimizer: torch.optim.Optimizer, parameters: Parameters) -> dict[str, Any]:
    """What the report records of the optimizer beyond its name and hyperparameters."""
    n = sum(p.tensor.numel() for p in parameters)
    return {
        "libraries": libraries(plugin),
        "schedule": {"owner": plugin.schedule, "lr": plugin.lr_meaning if plugin.schedule == "harness" else None},
        "trajectory": ("eval-mode weights: the optimizer's train() and eval() weights differ; evaluations, "
                       "checkpoints and states hold the eval-mode ones, gradients are taken at the train-mode ones"
                       if has_eval_mode(optimizer) else "the weights the optimizer steps"),
        "closure": plugin.closure,
        "second_order": plugin.second_order,
        "deterministic": plugin.deterministic,
        "state_floats_per_parameter": state_floats_per_parameter(optimizer, n),
        "groups": assignment(optimizer, parameters),
    }
