"""The training objective of SPEC §3: LM cross-entropy plus λ times the probe cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (float32); positions with target < 0 get 0."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0), reduction="none")
    return ce.view_as(targets) * (targets >= 0)


def composite_loss(logits: torch.Tensor, targets: torch.Tensor, probe_mask: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """mean CE over non-probe, non-pad targets + λ · mean CE over probe targets (0 if none)."""
    ce = token_losses(logits, targets)
    valid = targets >= 0
    lm = valid & ~probe_mask
    probe = valid & probe_mask
    lm_loss = (ce * lm).sum() / lm.sum().clamp_min(1)
    probe_loss = (ce * probe).sum() / probe.sum().clamp_min(1)
    return lm_loss + lam * probe_loss


def lambda_at(schedule: list, step: int) -> float:
    """λ of the last [from_step, λ] entry whose from_step <= step."""
    return float([lam for start, lam in schedule if start <= step][-1])
