"""The training objective of SPEC §3: LM cross-entropy plus λ times the probe cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (float32); positions with target < 0 get 0."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0), reduction="none")
    return ce.view_as(targets) * (targets >= 0)


def composite_loss(logits: torch.Tensor, targets: torch.Tensor, probe_mask: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """mean CE over non-probe, non-pad targets + λ · mean CE over probe targets (0 if none)."""
    lm_loss, probe_loss = lm_and_probe_losses(logits, targets, probe_mask)
    return lm_loss + lam * probe_loss


def lambda_at(schedule: list, step: int) -> float:
    """λ of the last [from_step, λ] entry whose from_step <= step."""
    return float([lam for start, lam in schedule if start <= step][-1])


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    """d loss / d params, flattened in the order given, float32."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


def lm_and_probe_losses(logits: torch.Tensor, targets: torch.Tensor, probe_mask: torch.Tensor):
    """(mean CE over non-probe non-pad targets, mean CE over probe targets) — the two terms of the
    composite loss, for metrics that look at them apart (interference)."""
    ce = token_losses(logits, targets)
    valid = targets >= 0
    lm, probe = valid & ~probe_mask, valid & probe_mask
    return (ce * lm).sum() / lm.sum().clamp_min(1), (ce * probe).sum() / probe.sum().clamp_min(1)
