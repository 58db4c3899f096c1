"""Backbone analysis at paper scale: the streaming Gram PCA against scikit-learn on the materialized
trajectory, side by side in one run.

    python benchmarks/perf/bench_backbone.py                 # 51 checkpoints of the full trunk (25.2M)
    python benchmarks/perf/bench_backbone.py --fraction 0.25 # a quarter of each trunk matrix's rows

Writes synthetic checkpoints shaped like the paper model's trunk (8 blocks of qkv, proj, up, down; a
random-walk trajectory with a planted drift) to a temporary directory, then times
(1) `TrajectoryGram.build` + `pca` (row-normalized and raw) streaming from the files, and
(2) scikit-learn's TruncatedSVD on the materialized T×D float64 matrix (uncentered, like the spec),
whose ratios use the full-spectrum denominator ‖X‖_F². Prints the time ratio (goal ≥ 10×), the
largest difference of the PC ratios (goal < 1e-6), and wall time and peak memory of the streaming
analysis. Step (2) is skipped when the matrix would not fit in memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from geobench.linalg import TrajectoryGram, pca

PAPER_TRUNK = {"attn.qkv": (1536, 512), "attn.proj": (512, 512), "mlp.up": (2048, 512), "mlp.down": (512, 2048)}


def write_checkpoints(folder: Path, n: int, fraction: float, seed: int) -> tuple[list[Path], list[str]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"blocks.{b}.{k}.weight": (max(1, int(r * fraction)), c)
              for b in range(8) for k, (r, c) in PAPER_TRUNK.items()}
    theta = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
    drift = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    paths = []
    for t in range(n):
        for name in theta:  # a planted backbone plus a random walk
            theta[name] += 1e-3 * drift[name] + 2e-3 * torch.randn(shapes[name], generator=gen)
        paths.append(folder / f"step_{t:06d}.safetensors")
        save_file(theta, paths[-1])
    return paths, list(shapes)


def peak_rss_gib() -> float:
    """Peak resident memory; it includes the pages of the memory-mapped checkpoint files, which are
    file-backed and reclaimable, so it overstates what the analysis allocates."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def anonymous_gib() -> float:
    """Memory the process allocated itself (not file-backed), now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=51)
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of each trunk matrix's rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths, names = write_checkpoints(Path(tmp), args.checkpoints, args.fraction, args.seed)
        T = len(paths)
        start = time.perf_counter()
        gram = TrajectoryGram.build(paths[1:], list(range(1, T)), names, paths[0], 0,
                                    device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        raw = pca(gram, np.eye(T - 1))
        rownorm = pca(gram, np.eye(T - 1), normalize_rows=True)
        streaming = time.perf_counter() - start
        print(f"{T} checkpoints; streaming Gram PCA: {streaming:.2f} s, peak RSS {peak_rss_gib():.2f} GiB "
              f"(with mapped checkpoint pages), anonymous memory after it {anonymous_gib():.2f} GiB; "
              f"PC1 raw {raw.ratios[0]:.4f}, row-normalized {rownorm.ratios[0]:.4f}")

        with safe_open(str(paths[0]), framework="pt") as fh:
            D = sum(int(np.prod(fh.get_slice(n).get_shape())) for n in names)
        needed = (T - 1) * D * 8 * 3  # the float64 matrix plus the working copies of the SVD
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if needed > available:
            print(f"D = {D:,}: the materialized {T - 1}×D float64 matrix needs ~{needed / 2**30:.1f} GiB, "
                  f"{available / 2**30:.1f} GiB free; scikit-learn comparison skipped (use --fraction)")
            return
        from sklearn.decomposition import TruncatedSVD

        start = time.perf_counter()
        X = np.stack([np.concatenate([safe_open(str(p), framework="np").get_tensor(n).ravel() for n in names])
                      for p in paths]).astype(np.float64)
        X = X[1:] - X[0]
        svd = TruncatedSVD(n_components=T - 2, algorithm="arpack").fit(X)
        sk_ratios = svd.singular_values_**2 / (X**2).sum()
        materialized = time.perf_counter() - start
        diff = np.abs(sk_ratios - raw.ratios[: T - 2]).max()
        print(f"D = {D:,}; scikit-learn TruncatedSVD on the materialized matrix: {materialized:.2f} s")
        print(f"speed-up streaming vs materialized: {materialized / streaming:.1f}x (goal >= 10x); "
              f"max |Δ PC ratio| = {diff:.2e} (goal < 1e-6); peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
