"""Training and validation batches.

Every training sequence is a pure function of (seed, its global index), so the data position of a
run is just its step: a resumed run sees exactly the batches an uninterrupted run would. Stories
are visited in a fresh seeded permutation each epoch; one random window of context+1 tokens per
story, EOS appended to the story, the targets after that EOS ignored.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from geobench.data.probe import IGNORE, ProbeTask
from geobench.data.tokenizer import TokenizedStories


def _to_sample(seq: np.ndarray, length: int, eos: int, probe_at: int = -1, masked: int = 1,
               pad: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """A token sequence of at most length+1 → (inputs, targets, probe mask), EOS padded; targets at
    padding (past the sequence, or where `pad` marks it) are ignored. The mask covers the targets
    of the `masked` tokens ending at `probe_at`."""
    inputs = np.full(length, eos, dtype=np.int64)
    targets = np.full(length, IGNORE, dtype=np.int64)
    mask = np.zeros(length, dtype=bool)
    n = min(len(seq), length + 1) - 1
    inputs[:n], targets[:n] = seq[:n], seq[1:n + 1]
    if pad is not None:
        targets[:n][pad[1:n + 1]] = IGNORE
    if probe_at > 0:
        mask[max(probe_at - masked, 0):probe_at] = True
    return inputs, targets, mask


class TrainStream:
    def __init__(self, stories: TokenizedStories, probe: ProbeTask, context: int, batch_size: int,
                 grad_accum: int, p_probe: float, seed: int, eos: int):
        self.stories, self.probe = stories, probe
        self.context, self.batch_size, self.grad_accum = context, batch_size, grad_accum
        self.p_probe, self.seed, self.eos = p_probe, seed, eos
        self._epoch, self._permutation = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        """The story order of an epoch: a seeded permutation, the latest one kept."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.stories))
        return self._permutation

    def sequence(self, index: int) -> tuple[np.ndarray, ...]:
        epoch, position = divmod(index, len(self.stories))
        story = np.append(self.stories.story(int(self._order(epoch)[position])), self.eos).astype(np.int64)
        rng = np.random.default_rng([self.seed, 1, index])
        length = self.context + 1
        if rng.random() < self.p_probe:
            probe = self.probe.inject(story, length, rng)
            if probe is not None:
                seq, pad, probe_at, masked = probe
                return _to_sample(seq, self.context, self.eos, probe_at, masked, pad)
        start = int(rng.integers(0, len(story) - length + 1)) if len(story) > length else 0
        return _to_sample(story[start:start + length], self.context, self.eos)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Micro-batch `micro` of optimizer step `step` (steps count from 1)."""
        first = ((step - 1) * self.grad_accum + micro) * self.batch_size
        samples = [self.sequence(first + b) for b in range(self.batch_size)]
        return tuple(torch.from_numpy(np.stack(column)) for column in zip(*samples))  # type: ignore[return-value]


class Prefetcher:
    """The micro-batches (all, or this rank's `micros`) of steps `first`..`last` of a stream, built
    ahead of the training step by a background thread (and pinned for a fast host-to-device copy when `pin` is set; with
    `threaded=False`, on the caller's thread as it asks for them). The batches are
    exactly `stream.batch(step, micro)`: a pure function of the step, so resume stays exact. At most
    `depth` batches wait in memory; `close()` stops the thread."""

    def __init__(self, stream: TrainStream, first: int, last: int, depth: int = 4, pin: bool = False,
                 threaded: bool = True, micros: Sequence[int] | None = None):
        self.stream, self.pin, self.threaded = stream, pin, threaded
        self.steps, self.micros = range(first, last + 1), range(stream.grad_accum) if micros is None else micros
        self.ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="geobench-prefetch", daemon=True)
        if threaded:
            self.thread.start()

    def keys(self) -> Iterator[tuple[int, int]]:
        """(step, micro-batch) in training order, generated as they are asked for (a run may be long)."""
        return ((step, micro) for step in self.steps for micro in self.micros)

    def _fill(self) -> None:
        for key in self.keys():
            try:
                batch = self.stream.batch(*key)
                item: tuple = (key, tuple(x.pin_memory() for x in batch) if self.pin else batch)
            except BaseException as exc:  # handed to the consumer, raised there
                item = (key, exc)
            while not self.stop.is_set():
                try:
                    self.ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set() or isinstance(item[1], BaseException):
                return

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.threaded:
            yield from (self.stream.batch(*key) for key in self.keys())
            return
        for key in self.keys():
            got, batch = self.ready.get()
            if isinstance(batch, BaseException):
                raise batch
            assert got == key, (got, key)
            yield batch

    def close(self) -> None:
        self.stop.set()
        if self.threaded:
            self.thread.join()


def validation_batches(stories: TokenizedStories, context: int, n_batches: int, batch_size: int,
                       eos: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first window of each validation story (cycling if there are too few), no probes."""
    samples = [
        _to_sample(np.append(stories.story(i % len(stories)), eos), context, eos)[:2]
        for i in range(n_batches * batch_size)
    ]
    return [
        tuple(torch.from_numpy(np.stack(col)) for col in zip(*samples[b * batch_size:(b + 1) * batch_size]))  # type: ignore[misc]
        for b in range(n_batches)
    ]
