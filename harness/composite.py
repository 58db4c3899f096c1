"""Several optimizers stepped as one, for optimizer plugins that give parameter roles to different
optimizers (Muon for the hidden matrices, AdamW for the rest)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Composite"]


class Composite(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one: Muon for the hidden matrices and
    AdamW for the rest. `param_groups` is the concatenation of the parts' groups (the same dicts,
    so an lr written into one reaches its part); the state dict holds each part's under its name."""

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer]):
        self.parts = dict(parts)
        params = [p for part in self.parts.values() for group in part.param_groups for p in group["params"]]
        super().__init__(params, {})
        self._share_parts()

    def _share_parts(self) -> None:
        """Point at the parts' groups and state (again after a load, which replaces them in the parts)."""
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]
        self.state = collections.ChainMap(*(part.state for part in self.parts.values()))  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state_dict["parts"][name])
        self._share_parts()

    def part_of(self, group: dict) -> torch.optim.Optimizer:
        return next(part for part in self.parts.values() if any(group is g for g in part.param_groups))
