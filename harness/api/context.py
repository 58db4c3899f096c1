"""What a metric receives: a `MetricContext`, built by the host from what the metric declared.

Every metric gets the trajectory view (its checkpoints: readers, scopes, Gram matrices, the
backbone), the run's config (None for checkpoints geobench did not write) and a place for its
figures and files. Only a metric that declared the need gets more:

- `evals` ("evals"): the run's evaluation history;
- `setup` ("model", "data" or "gradients"): the trained model family with the run's data and
  evaluation sets, to load a checkpoint into and take gradients or evaluations through;
- `retrain` ("training"): training from a checkpoint into a derived run directory.

Reaching for an undeclared part raises `UndeclaredNeed` — in the conformance test, before a user
ever sees it — so that the host's applicability check (which reads the declaration) is never
wrong about what a metric will use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from geobench.api.batch import Batch
    from geobench.api.config import Config
    from geobench.api.documents import EvalRecord


BACKBONE_CHECKPOINTS = 3  # Θ₀ and two more: a trajectory PCA of fewer has no second direction


class UndeclaredNeed(RuntimeError):
    """A metric used a part of the context its plugin did not declare in `needs`."""


class CheckpointSource(Protocol):
    """One checkpoint, read tensor by tensor."""

    @property
    def path(self) -> Path: ...

    def names(self) -> list[str]: ...

    def where(self, name: str) -> Path:
        """The file that holds `name` (a checkpoint may be sharded)."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...


class PCAView(Protocol):
    """An uncentered PCA of trajectory rows: `directions` (k × rows, unit vectors in the span of the
    trajectory, as coefficient rows over the Gram's checkpoints), `sigma` (singular values),
    `ratios` (explained variance ratios)."""

    @property
    def directions(self) -> np.ndarray: ...

    @property
    def sigma(self) -> np.ndarray: ...

    @property
    def ratios(self) -> np.ndarray: ...

    def k_for(self, fraction: float) -> int: ...


class GramView(Protocol):
    """Δ_t = θ_t − θ_anchor over `steps`, restricted to the parameters `names`, and their inner
    products `gram` (steps × steps)."""

    @property
    def steps(self) -> Sequence[int]: ...

    @property
    def names(self) -> Sequence[str]: ...

    @property
    def anchor(self) -> int: ...

    @property
    def gram(self) -> np.ndarray: ...

    def inner(self, u: np.ndarray, v: np.ndarray) -> float: ...


class BackboneView(Protocol):
    """The row-normalized (`pca`) and raw (`pca_raw`) trajectory PCA of a scope; `v_b`, the
    backbone, is the first row-normalized direction, signed so that ⟨Δθ_final, v_b⟩ > 0."""

    @property
    def gram(self) -> GramView: ...

    @property
    def pca(self) -> PCAView: ...

    @property
    def pca_raw(self) -> PCAView: ...

    @property
    def v_b(self) -> np.ndarray: ...


class TrajectoryView(Protocol):
    """The checkpoints of one run, streamed parameter by parameter."""

    @property
    def name(self) -> str:
        """How messages name the run (its directory)."""
        ...

    @property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]: ...

    @property
    def device(self) -> torch.device: ...

    def checkpoint_steps(self) -> list[int]: ...

    def reader(self, step: int) -> CheckpointSource: ...

    def load_checkpoint(self, step: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]: ...

    def scope(self, scope: str) -> list[str]:
        """Parameter names of `trunk`, `all` or `block:I`."""
        ...

    def block_indices(self) -> list[int]: ...

    def window(self, window: Sequence[int], minimum: int = 2) -> list[int]:
        """Checkpoint steps inside [start, end] (all for an empty window); at least `minimum`."""
        ...

    def spread(self, steps: Sequence[int], count: int, first: int = 0) -> list[int]:
        """`steps` checked, or up to `count` checkpoints at or after `first`, spread over the run."""
        ...

    def gram(self, scope: str, steps: tuple[int, ...], anchor: int) -> GramView: ...

    def backbone(self, scope: str = "trunk", window: Sequence[int] = (), every: int = 0) -> BackboneView: ...

    def materialize(self, gram: GramView, coefficients: np.ndarray) -> dict[str, torch.Tensor]:
        """Σ_t c_t Δ_t as tensors, per parameter of the Gram's scope."""
        ...


class EvaluationSets(Protocol):
    """The run's fixed evaluation sets: validation batches (inputs, targets) and the OOD probe set."""

    @property
    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def probe_ood(self) -> Any:
        """inputs, targets and mask arrays, one row per example."""
        ...

    @property
    def batch_size(self) -> int: ...

    def ood_correct(self, model: torch.nn.Module) -> np.ndarray:
        """Per-example exact match on the OOD probe set."""
        ...


class TrainedSetup(Protocol):
    """The run's model family, data stream and evaluation sets, rebuilt from its config (or the
    ones that trained it, right after training)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def evaluator(self) -> EvaluationSets: ...

    @property
    def autocast(self) -> contextlib.AbstractContextManager: ...

    def model_at(self, step: int) -> torch.nn.Module:
        """The model with the weights of checkpoint `step`, in eval mode."""
        ...

    def batches(self, n: int, first: int = 0) -> Iterator[Batch]:
        """`n` training-distribution batches the run never trained on (its stream continued)."""
        ...

    def batch_gradients(self, step: int, names: Sequence[str], n: int,
                        lam: float | None = None) -> Iterator[torch.Tensor]:
        """Flat gradients of the composite loss (λ given, or the schedule's at `step`) at checkpoint
        `step` over the parameters `names`, one per batch of `batches(n)`."""
        ...

    def flatten(self, tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor: ...


class Retrain(Protocol):
    def __call__(self, *, step: int, name: str, overrides: dict[str, Any],
                 perturb: Callable[[torch.nn.Module], None] | None = None) -> list[EvalRecord]:
        """Train from checkpoint `step` with a fresh optimizer under the run's config changed by
        `overrides` (dotted keys), into `<run>/derived/<name>/`; `perturb(model)` may change the
        weights first. The evaluations, the first (step 0) before any update; a diverged derived run
        ends with a record marked `diverged`."""
        ...


class MetricContext(Protocol):
    @property
    def trajectory(self) -> TrajectoryView: ...

    @property
    def config(self) -> Config | None:
        """The run's config; None for checkpoints geobench did not write (a manifest)."""
        ...

    @property
    def directory(self) -> Path:
        """Where this analysis writes: the run directory, or a manifest analysis's --out."""
        ...

    def run_config(self) -> Config:
        """`config`, for a metric that cannot do without it: declare the need "run" (or one that
        implies a geobench run) so that the host refuses a manifest's trajectory up front."""
        ...

    @property
    def evals(self) -> list[EvalRecord]: ...

    @property
    def setup(self) -> TrainedSetup: ...

    @property
    def retrain(self) -> Retrain: ...

    def figure(self, fig: Any, name: str, *, caption: str = "") -> str:
        """Save a matplotlib figure under the run's figures/; its path relative to the run. The
        `caption` (what the figure shows, in a sentence) goes under it on the report's page."""
        ...

    def write_file(self, name: str, text: str) -> str:
        """Write a result file beside the report (atomically); its path relative to the run."""
        ...

    def open_run(self, path: str | Path) -> TrajectoryView:
        """The checkpoints of another geobench run (a reference), read-only (needs "run")."""
        ...
