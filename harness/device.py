"""Where tensors live: the one place that picks the torch device and its autocast."""

from __future__ import annotations

import contextlib

import torch

from geobench import distributed
from geobench.api import UsageError


def pick_device(name: str = "auto") -> torch.device:
    """The device of train.device; on CUDA, the GPU of this process (its local rank under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device("cuda", distributed.world().local_rank) if name == "cuda" else torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
