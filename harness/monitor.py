"""What the training loop watches: the step losses (read by the host in batches on a GPU), the
divergence criterion, the early stop, and Ctrl-C."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from geobench.api import EvalRecord

NOISE = 1e-3  # relative margin of the divergence criterion
SYNC_EVERY_CUDA = 8  # on CUDA the host reads the step losses this often (and at every eval, checkpoint, state save)


class LossReader:
    """Step losses kept on the device and read by the host in batches, so that a GPU step need not
    wait for the host: every step on a CPU; on CUDA every `SYNC_EVERY_CUDA` steps and at every
    boundary (evaluation, checkpoint, state save). A non-finite loss is therefore found at most
    `every − 1` steps after the step that produced it, and that step is recorded exactly."""

    def __init__(self, every: int):
        self.every = every
        self.pending: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss.detach().reshape(()), lr))

    def due(self, boundary: bool) -> bool:
        return boundary or len(self.pending) >= self.every

    def read(self) -> list[tuple[int, float, float]]:
        if not self.pending:
            return []
        values = torch.stack([loss for _, loss, _ in self.pending]).tolist()  # the one host sync
        read = [(step, value, lr) for (step, _, lr), value in zip(self.pending, values)]
        self.pending = []
        return read


@dataclasses.dataclass
class DivergenceMonitor:
    """The declared divergence criterion: a non-finite loss, or an evaluated val_loss above
    `factor` × `baseline`, the val_loss of the model before its first update (for a derived run,
    its source run's). Anchored where nothing has been learned yet, a run broken from its first
    update is diverged too; the paper's β₂ = 0 run read 1.5e3 at step 200 against 10.8 at start.
    A val_loss within NOISE of the anchor is not judged above it: after a first step at a warmup's
    tiny lr it can sit a hair above the untrained model's by chance."""

    factor: float
    baseline: float | None
    derived: bool = False
    diverged_at: int | None = None
    divergence: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def observe(self, record: EvalRecord) -> bool:
        """Judge an evaluation record; True when it is the one that marks the run diverged."""
        value = record.val_loss
        if self.diverged or self.factor <= 0 or self.baseline is None or value is None:
            return False
        if math.isfinite(value) and value <= self.factor * self.baseline * (1 + NOISE):
            return False
        self.diverged_at = record.step
        self.divergence = (f"val_loss {value:.4g} > {self.factor:g} × the val_loss before the first update "
                           f"{self.baseline:.4g}{' of the source run' if self.derived else ''} (train.diverge_factor)")
        return True

    def non_finite(self, step: int) -> None:
        if not self.diverged:  # the first criterion that fired is the one recorded
            self.diverged_at, self.divergence = step, "non-finite loss"


def early_stop_reached(evals: list[EvalRecord], threshold: float, count: int) -> bool:
    """The source's early stop: p_ood >= threshold at the last `count` evaluations in a row."""
    recent = [e.p_ood for e in evals[-count:]]
    return len(recent) == count and all(p is not None and p >= threshold for p in recent)


@contextlib.contextmanager
def ctrl_c_at_step_end() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) while training sets an event that the loop reads at the end of a step, where
    the weights, the optimizer and the writer thread are consistent; a second Ctrl-C interrupts at
    once. An interrupt raised anywhere in a step could land inside a half-applied optimizer update
    or a queue operation shared with the writer thread."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def ask(signum: int, frame: Any) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)
