"""What the trainer feeds a model: one micro-batch."""

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One micro-batch: token ids (B, T), next-token targets (B, T; IGNORE where no loss is taken)
    and the probe mask (B, T; True at the probe's answer position)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
