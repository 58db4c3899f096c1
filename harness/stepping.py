"""One optimizer step: the gradient of the step's micro-batches (autograd through the model, or the
optimizer plugin's own gradient rule), clipping, and the update — with a closure that recomputes
the same gradient for optimizers that need one, and a twice-differentiable path for those that
differentiate the gradient again."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from geobench import distributed
from geobench.api import Batch, Config, OptimizerPlugin
from geobench.objective import composite_loss, has_head, head_composite_loss


class HiddenStates(torch.nn.Module):
    """A model's forward up to its output head, as a module (what DDP wraps on the head path)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(inputs)


class Stepper:
    """The gradient and the update of one optimizer step, for a model, its optimizer and the plugin
    that declared how to drive it. `diagnostics` collects what a gradient rule reported per
    micro-batch (the trainer summarizes and clears it at every evaluation)."""

    def __init__(self, *, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 plugin: OptimizerPlugin, device: torch.device, autocast: contextlib.AbstractContextManager,
                 here: distributed.World):
        self.cfg, self.model, self.optimizer, self.plugin = cfg, model, optimizer, plugin
        self.device, self.autocast, self.here = device, autocast, here
        t = cfg.train
        # the chunked head loss (no full logits) has a backward that autograd cannot differentiate again
        rows = t.batch_size * cfg.model.context
        self.headed: Any = model if not plugin.second_order and has_head(model, rows) else None
        body: torch.nn.Module = HiddenStates(self.headed) if self.headed is not None else model
        self.ddp = distributed.wrap(here, body, device)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(self.ddp) if cfg.model.compile else self.ddp
        self.diagnostics: list[dict] = []

    def prepare(self, *, step: int, batches: Sequence[Batch]) -> None:
        """The plugin's per-step hook, before the step's gradient."""
        if self.plugin.prepare_step is not None:
            t = self.cfg.train
            self.plugin.prepare_step(step=step, tokens_per_step=t.batch_size * t.grad_accum * self.cfg.model.context,
                                     model=self.model, optimizer=self.optimizer, batches=batches)

    def gradient(self, batches: Sequence[Batch], lam: float) -> torch.Tensor:
        """Clear `.grad`, accumulate the mean gradient of the composite loss over `batches` into it
        (averaged over the ranks under DDP) and return the mean loss of this rank's batches."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        rule = self.plugin.gradient
        for i, batch in enumerate(batches):
            if rule is not None:  # the optimizer plugin brings its own gradient (EP)
                info = rule(model=self.model, optimizer=self.optimizer, batch=batch, lam=lam,
                            hp=self.cfg.optimizer.params, scale=1 / self.cfg.train.grad_accum)
                total += info["loss"] / self.cfg.train.grad_accum
                self.diagnostics.append(info)
                continue
            with _no_sync(self.ddp, last=i == len(batches) - 1), self._differentiable():
                with self.autocast:
                    features = self.forward(batch.inputs)
                    loss = (head_composite_loss(features, self.headed.output_weight, batch.targets, batch.mask, lam)
                            if self.headed is not None
                            else composite_loss(features, batch.targets, batch.mask, lam)) / len(batches)
                loss.backward(create_graph=self.plugin.second_order)
            total += loss.detach()
        return total

    def update(self, batches: Sequence[Batch], lam: float) -> None:
        """Clip the gradient and step the optimizer (with a closure that recomputes this step's
        loss and gradient on the same micro-batches, when the plugin declares it needs one)."""
        self._clip()
        if not self.plugin.closure:
            self.optimizer.step()
            return

        def closure() -> float:
            loss = self.gradient(batches, lam)
            self._clip()
            return float(distributed.mean(self.here, loss))  # every rank sees the same loss, and so decides alike

        self.optimizer.step(closure)

    def _clip(self) -> None:
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)

    def _differentiable(self) -> contextlib.AbstractContextManager:
        """For second-order optimizers: the math attention kernel, whose backward is itself
        differentiable (the fused CPU and flash kernels' are not)."""
        return sdpa_kernel([SDPBackend.MATH]) if self.plugin.second_order else contextlib.nullcontext()


def _no_sync(ddp: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce waits for the last micro-batch of a step."""
    no_sync = getattr(ddp, "no_sync", None)
    return no_sync() if no_sync is not None and not last else contextlib.nullcontext()


def rule_summary(reports: list[dict]) -> dict[str, float | int | None]:
    """A gradient rule's diagnostics over an evaluation interval: for each flag it reported, how
    many micro-batches raised it (`skipped`: 3); for each number, its mean over the finite values."""
    summary: dict[str, float | int | None] = {"batches": len(reports)}
    for key in dict.fromkeys(k for info in reports for k in info if k != "loss"):
        values = [info[key] for info in reports if key in info]
        if all(isinstance(v, bool) for v in values):
            summary[key] = sum(values)
        elif all(isinstance(v, (int, float)) for v in values):
            finite = [float(v) for v in values if math.isfinite(v)]
            summary[key] = float(np.mean(finite)) if finite else None
    return summary
