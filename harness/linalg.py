"""Shared kernels for trajectory geometry.

A trajectory over a parameter scope is the set of rows Δ_t = θ_t − θ_anchor (t over checkpoints).
It is never materialized: `TrajectoryGram.build` streams each parameter, in row chunks, from the
memory-mapped checkpoint files and accumulates the T×T Gram matrix G = Δ Δᵀ in float64. Every
direction the metrics use (backbone, other PCs, update and switch directions, windows anchored
elsewhere, row-normalized variants) is a linear combination of the rows, v = Σ_t c_t Δ_t, so all
their inner products are cᵀ G c′ and need no second pass; only a direction that must meet a
gradient is materialized (`TrajectoryGram.materialize`), one more streaming pass.

Peak memory of a pass: T × `chunk_elements` float64 values (default 2^22 elements: 32 MiB per
checkpoint row chunk, e.g. 1.6 GiB for 51 checkpoints) plus the T×T Gram.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from geobench.api import UsageError
from geobench.checkpoints import CheckpointReader

__all__ = ["PCA", "TrajectoryGram", "materialize", "pca"]

CHUNK_ELEMENTS = 2**22


def _row_chunks(shape: Sequence[int], chunk_elements: int, n_rows_out: int) -> list[slice]:
    """Row slices of a tensor such that n_rows_out × slice size stays under `chunk_elements`."""
    rows = shape[0] if shape else 1
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, chunk_elements // max(1, per_row * n_rows_out))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]




class _Handles:
    """Open safetensors files, one handle per file, for the checkpoints of one streaming pass.
    A checkpoint is a path (one .safetensors file) or a `CheckpointReader` (shards: each parameter
    is read from the file that holds it)."""

    def __init__(self, stack: contextlib.ExitStack, checkpoints: Sequence[Checkpoint]):
        self.stack = stack
        self.open: dict[Path, Any] = {}
        self.readers = [c if isinstance(c, CheckpointReader) else CheckpointReader(c) for c in checkpoints]

    def __call__(self, i: int, name: str):
        path = self.readers[i].where(name)
        if path not in self.open:
            self.open[path] = self.stack.enter_context(safe_open(str(path), framework="pt"))
        return self.open[path]

    def shape(self, name: str) -> list[int]:
        """The shape of parameter `name`, the same in every checkpoint (else a UsageError naming the file)."""
        shapes = [self(i, name).get_slice(name).get_shape() for i in range(len(self.readers))]
        for i, shape in enumerate(shapes):
            if shape != shapes[-1]:
                raise UsageError(f"{str(self.readers[i].where(name))!r}: parameter {name!r} has shape {tuple(shape)}, "
                                 f"{tuple(shapes[-1])} in {str(self.readers[-1].where(name))!r}")
        return shapes[-1]

    def _read(self, i: int, name: str, rows: slice, scalar: bool, device: torch.device) -> torch.Tensor:
        try:
            tensor = self(i, name).get_slice(name)
            part = (tensor[:] if scalar else tensor[rows]).reshape(-1).to(device=device, dtype=torch.float64)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise UsageError(f"cannot read parameter {name!r} from {str(self.readers[i].where(name))!r}: {exc}") from None
        if not bool(torch.isfinite(part).all()):
            raise UsageError(f"{str(self.readers[i].where(name))!r}: parameter {name!r} holds non-finite values")
        return part

    def rows(self, name: str, rows: slice, scalar: bool, device: torch.device) -> torch.Tensor:
        """Rows `rows` of parameter `name` of every checkpoint minus those of the last one (the anchor)."""
        *others, anchor = (self._read(i, name, rows, scalar, device) for i in range(len(self.readers)))
        return torch.stack(others) - anchor


Checkpoint = Path | CheckpointReader


@dataclasses.dataclass
class TrajectoryGram:
    steps: list[int]
    names: list[str]
    anchor: int
    gram: np.ndarray  # (T, T) float64, rows Δ_t = θ_t − θ_anchor

    @classmethod
    def build(cls, paths: Sequence[Checkpoint], steps: Sequence[int], names: Sequence[str], anchor_path: Checkpoint,
              anchor: int, device: torch.device | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> TrajectoryGram:
        device = device or torch.device("cpu")
        gram = torch.zeros(len(paths), len(paths), dtype=torch.float64, device=device)
        with contextlib.ExitStack() as stack:
            handles = _Handles(stack, [*paths, anchor_path])
            for name in names:
                shape = handles.shape(name)
                for rows in _row_chunks(shape, chunk_elements, len(paths) + 1):
                    block = handles.rows(name, rows, not shape, device)
                    gram += block @ block.T
        return cls(list(steps), list(names), anchor, gram.cpu().numpy())

    def index(self, step: int) -> int:
        return self.steps.index(step)

    def inner(self, a: np.ndarray, b: np.ndarray) -> float:
        """⟨Σ a_t Δ_t, Σ b_t Δ_t⟩."""
        return float(a @ self.gram @ b)

    def norm(self, a: np.ndarray) -> float:
        return max(self.inner(a, a), 0.0) ** 0.5

    def row(self, step: int) -> np.ndarray:
        """The coefficients of Δ_step itself."""
        e = np.zeros(len(self.steps))
        e[self.index(step)] = 1.0
        return e


def materialize(names: Sequence[str], paths: Sequence[Checkpoint], anchor_path: Checkpoint, coefficients: np.ndarray,
                chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """The direction Σ c_t Δ_t (Δ_t = checkpoint t − the anchor) as float32 tensors, one per
    parameter of `names`, streamed from the checkpoints."""
    c = torch.from_numpy(coefficients)
    out = {}
    with contextlib.ExitStack() as stack:
        handles = _Handles(stack, [*paths, anchor_path])
        for name in names:
            shape = handles.shape(name)
            parts = [c @ handles.rows(name, rows, not shape, torch.device("cpu"))
                     for rows in _row_chunks(shape, chunk_elements, len(paths) + 1)]
            out[name] = torch.cat(parts).reshape(shape).to(torch.float32)
    return out


@dataclasses.dataclass
class PCA:
    """Uncentered PCA of the rows R = A Δ (A: combination matrix), from the Gram alone."""

    ratios: np.ndarray        # ρ_k = σ_k² / Σ_j σ_j², full spectrum, descending
    sigma: np.ndarray         # singular values
    left: np.ndarray          # (n_rows, k) left singular vectors (the rows' coordinates)
    directions: np.ndarray    # (k, T): right singular vector k = Σ_t directions[k, t] Δ_t

    def k_for(self, fraction: float) -> int:
        """Smallest k whose cumulative ratio reaches `fraction`."""
        return int(np.searchsorted(np.cumsum(self.ratios), fraction - 1e-12) + 1)


def pca(gram: TrajectoryGram, combination: np.ndarray, normalize_rows: bool = False,
        sign_row: int = -1) -> PCA:
    """SVD without centering of the rows combination @ Δ (optionally each row scaled to unit norm).

    The sign of each direction is chosen so that ⟨row `sign_row`, v_k⟩ > 0 (the backbone points
    along the final drift)."""
    A = np.asarray(combination, dtype=np.float64)
    M = A @ gram.gram @ A.T
    if normalize_rows:
        norms = np.sqrt(np.clip(np.diag(M), 1e-300, None))
        A = A / norms[:, None]
        M = M / np.outer(norms, norms)
    M = (M + M.T) / 2
    values, vectors = np.linalg.eigh(M)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    total = values.sum()
    keep = values > total * 1e-14 if total > 0 else np.zeros_like(values, dtype=bool)
    sigma = np.sqrt(values[keep])
    left = vectors[:, keep]
    directions = (A.T @ left / sigma).T if keep.any() else np.zeros((0, A.shape[1]))
    projections = (A @ gram.gram @ directions.T)[sign_row] if keep.any() else np.zeros(0)
    flip = np.where(projections < 0, -1.0, 1.0)
    return PCA(values[keep] / total if total > 0 else values[keep], sigma, left * flip, directions * flip[:, None])
