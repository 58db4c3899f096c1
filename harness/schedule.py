"""The training schedule (docs/science.md#training-protocol): the learning-rate factor of each step
and the steps at which a run evaluates, checkpoints and saves its state."""

from __future__ import annotations

import math

from geobench.api import Config, UsageError

__all__ = [
    "check_checkpoint_steps",
    "checkpoint_windows",
    "first_scheduled",
    "inconsistencies",
    "is_boundary",
    "is_checkpoint_step",
    "is_eval_step",
    "is_state_step",
    "lr_factor",
]


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


def checkpoint_windows(value: list) -> list[list[int]]:
    """`train.checkpoint_window` as a list of [start, end, every] triples (one triple is a list of one)."""
    windows = value if value and all(isinstance(w, (list, tuple)) for w in value) else [value] if value else []
    for window in windows:
        if (len(window) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in window)
                or window[0] > window[1]):
            raise UsageError(f"train.checkpoint_window={value!r} must be [start, end, every] positive integers "
                             "with start <= end, or a list of such triples")
    return [list(w) for w in windows]


def check_checkpoint_steps(cfg: Config, steps: list[int], option: str) -> None:
    """For a metric's `check`: every step in `steps` will be a checkpoint of a run of `cfg`."""
    for step in steps:
        if not 1 <= step <= cfg.train.steps or not is_checkpoint_step(step, cfg):
            raise UsageError(f"{option}: the run will have no checkpoint at step {step} "
                             f"({cfg.train.steps} steps, a checkpoint every {cfg.train.checkpoint_every})")


def inconsistencies(cfg: Config) -> list[str]:
    """What in the schedule of `cfg` cannot be what its user meant (overrides that shortened a run
    and left its warmup, λ switch or evaluations behind), in words; empty when nothing is off."""
    t, found = cfg.train, []
    if t.warmup >= t.steps:
        found.append(f"train.warmup={t.warmup} >= train.steps={t.steps}: the learning rate never leaves its warmup")
    late = [step for step, _ in t.lambda_schedule[1:] if step > t.steps]
    if late:
        found.append(f"the λ switch at step {late[0]} comes after the last step (train.steps={t.steps})")
    evals = first_scheduled(cfg, "eval", 3)
    if len(evals) < 3:
        found.append(f"{len(evals)} evaluation{'s' if len(evals) != 1 else ''} (train.eval_every={t.eval_every}, "
                     f"train.steps={t.steps}): too few for a curve")
    return found
