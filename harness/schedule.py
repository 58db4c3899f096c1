"""The training schedule (docs/protocol.md): the learning-rate factor of each step and the steps at
which a run evaluates, checkpoints and saves its state."""

from __future__ import annotations

import math

from geobench.config import Config, checkpoint_windows


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then a cosine from 1 toward 0 over the remaining
    steps, CLAMPED at `floor` (flat from the step where the cosine reaches it, ≈ 83% of the decay for
    a floor of 0.1) — not an interpolation that lands on the floor at the last step."""
    if step <= warmup:
        return step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return max(0.5 * (1 + math.cos(math.pi * min(progress, 1.0))), floor)


def is_eval_step(step: int, cfg: Config) -> bool:
    return step == 1 or step % cfg.train.eval_every == 0 or step == cfg.train.steps


def is_checkpoint_step(step: int, cfg: Config) -> bool:
    t = cfg.train
    in_window = any(start <= step <= end and (step - start) % every == 0
                    for start, end, every in checkpoint_windows(t.checkpoint_window))
    return step == 1 or step % t.checkpoint_every == 0 or step == t.steps or in_window


def is_state_step(step: int, cfg: Config) -> bool:
    return step % cfg.train.state_every == 0 or step == cfg.train.steps


def is_boundary(step: int, cfg: Config) -> bool:
    """A step after which the run writes something (the host must have read every loss by then)."""
    return is_eval_step(step, cfg) or is_checkpoint_step(step, cfg) or is_state_step(step, cfg)


def first_scheduled(cfg: Config, kind: str, limit: int) -> list[int]:
    """The first `limit` steps (all, when fewer) at which a run of `cfg` writes a `kind`
    ("checkpoint" or "eval"), without walking every step of a long run: each source of such steps
    (step 1, the last step, multiples of the interval, the extra windows) contributes at most its
    first `limit`, which is enough to find the first `limit` of their union."""
    t = cfg.train
    every = t.checkpoint_every if kind == "checkpoint" else t.eval_every
    found = {1, t.steps, *range(every, min(t.steps, every * limit) + 1, every)}
    if kind == "checkpoint":
        for start, end, step in checkpoint_windows(t.checkpoint_window):
            found.update(range(start, min(end, t.steps, start + step * limit) + 1, step))
    return sorted(s for s in found if 1 <= s <= t.steps)[:limit]
