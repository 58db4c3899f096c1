"""Shared-direction energy and manifest backbone analysis at Qwen3-8B's real shapes.

Writes a manifest of synthetic Hugging Face style checkpoints (bf16 shards, as the hub stores them)
holding repro_pkg's six measured parameters in Qwen3-8B's shapes and names: the MLP down-projection
of layers 7, 14, 21 and 28 ([4096, 12288]) and layer 21's attention q and o projections
([4096, 4096]), 235M values per checkpoint. θ₀ and φ̂ are .npz directories, one file per parameter.
Then, each in a fresh process, side by side:

1. `geobench energy` (streaming one parameter at a time),
2. a naive numpy computation that loads every checkpoint whole into memory (skipped when it would
   not fit in the memory available),
3. `geobench analyze --manifest --metric backbone` (the streaming Gram PCA).

It prints wall time and peak RSS of each, their ratios, and the largest difference between (1) and
(2). Usage: python benchmarks/perf/bench_energy.py [--checkpoints 4] [--scale 1.0] [--dir DIR]
(--scale shrinks every matrix's rows for a quick try).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE = 4096, 12288
NAMES = {**{f"model.layers.{i}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE) for i in (7, 14, 21, 28)},
         "model.layers.21.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
         "model.layers.21.self_attn.o_proj.weight": (HIDDEN, HIDDEN)}


def shapes(scale: float) -> dict[str, tuple[int, int]]:
    return {n: (max(1, int(rows * scale)), cols) for n, (rows, cols) in NAMES.items()}


def write_manifest(root: Path, checkpoints: int, scale: float) -> Path:
    generator = torch.Generator().manual_seed(0)
    sizes = shapes(scale)
    (root / "theta_0").mkdir(parents=True)
    (root / "phi_hat").mkdir()
    entries = []
    for name, shape in sizes.items():
        base = torch.randn(shape, generator=generator)
        np.savez(root / "theta_0" / f"{name}.npz", base.numpy())
        direction = torch.randn(shape, generator=generator)
        np.savez(root / "phi_hat" / f"{name}.npz", (direction / direction.norm()).numpy())
        del base, direction
    for k in range(checkpoints):
        folder = root / "opt" / f"iter_{(k + 1) * 100}"
        folder.mkdir(parents=True)
        weight_map = {}
        for j, (name, shape) in enumerate(sizes.items()):  # one shard per parameter, as an 8B model is sharded
            shard = f"model-{j + 1:05d}-of-{len(sizes):05d}.safetensors"
            base = torch.from_numpy(np.load(root / "theta_0" / f"{name}.npz")["arr_0"])
            value = base + 0.01 * (k + 1) * torch.randn(shape, generator=generator)
            save_file({name: value.to(torch.bfloat16)}, folder / shard)
            weight_map[name] = shard
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        entries.append({"iter": (k + 1) * 100, "hf_path": str(folder.relative_to(root))})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"optimizers": {"opt": {"checkpoints": entries}}}))
    return manifest


def naive(root: Path) -> None:
    """Everything in memory at once: θ₀, φ̂ and every checkpoint as float64 vectors."""
    from safetensors.torch import load_file

    names = sorted(NAMES)
    theta0 = np.concatenate([np.load(root / "theta_0" / f"{n}.npz")["arr_0"].astype(np.float64).ravel() for n in names])
    phi = [np.load(root / "phi_hat" / f"{n}.npz")["arr_0"].astype(np.float64).ravel() for n in names]
    phi = [p / np.linalg.norm(p) for p in phi]  # unit to float64 precision (float32 storage is not exactly unit)
    sizes = [p.size for p in phi]
    manifest = json.loads((root / "manifest.json").read_text())
    thetas = []
    for entry in manifest["optimizers"]["opt"]["checkpoints"]:
        folder = root / entry["hf_path"]
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        loaded = {}
        for shard in set(weight_map.values()):
            loaded.update(load_file(folder / shard))
        thetas.append((entry["iter"], np.concatenate([loaded[n].double().numpy().ravel() for n in names])))
    with open(root / "naive.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["iter", "E_tau", "E_phi"])
        for it, theta in thetas:
            tau = theta - theta0
            parts = np.split(tau, np.cumsum(sizes)[:-1])
            writer.writerow([it, float(tau @ tau), sum(float(t @ p) ** 2 for t, p in zip(parts, phi))])


def child(argv: list[str]) -> tuple[float, float]:
    """Run a command; wall seconds and the peak RSS (GiB) it reports on its last stderr line."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{result.stderr[-2000:]}")
    peak = float(result.stderr.strip().splitlines()[-1].split()[-1])
    return wall, peak


def measured(command: list[str]) -> list[str]:
    """`command` run in a Python that prints its own peak RSS (GiB) last."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('peak_rss_gib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, file=sys.stderr)")
    return [sys.executable, "-c", code, *command]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--naive":
        naive(Path(sys.argv[2]))
        print("peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, file=sys.stderr)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each matrix's rows (1: the real shapes)")
    parser.add_argument("--dir", help="where to write the synthetic manifest (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="geobench-energy-bench-"))
    values = sum(r * c for r, c in shapes(args.scale).values())
    start = time.perf_counter()
    manifest = write_manifest(root, args.checkpoints, args.scale)
    print(f"{args.checkpoints} checkpoints of 6 parameters, {values:,} values each (bf16 shards), θ₀ and φ̂ as npz; "
          f"written in {time.perf_counter() - start:.1f} s to {root}")

    wall, rss = child(measured(["geobench.cli", "energy", "--manifest", str(manifest), "--opt", "opt",
                                "--theta0", str(root / "theta_0"), "--phi-hat", str(root / "phi_hat"),
                                "--out", str(root / "energy.csv")]))
    print(f"geobench energy (streaming)      : {wall:7.1f} s, peak RSS {rss:6.2f} GiB")
    largest = max(r * c for r, c in shapes(args.scale).values())
    print(f"  the largest parameter in float64 is {largest * 8 / 2**30:.2f} GiB; RSS / that = {rss / (largest * 8 / 2**30):.1f}")

    need = (2 + args.checkpoints) * values * 8 / 2**30
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    if need < 0.7 * available:
        naive_wall, naive_rss = child([sys.executable, __file__, "--naive", str(root)])
        print(f"naive numpy (everything loaded)  : {naive_wall:7.1f} s, peak RSS {naive_rss:6.2f} GiB")
        print(f"  ratios naive/streaming: time {naive_wall / wall:.2f}x, memory {naive_rss / rss:.2f}x")
        with open(root / "energy.csv") as a, open(root / "naive.csv") as b:
            ours, theirs = list(csv.DictReader(a)), list(csv.DictReader(b))
        diff = max(abs(float(x[k]) / float(y[k]) - 1) for x, y in zip(ours, theirs) for k in ("E_tau", "E_phi"))
        print(f"  largest relative difference of E_tau, E_phi: {diff:.2e}")
    else:
        print(f"naive numpy skipped: it needs ~{need:.1f} GiB and {available:.1f} GiB are available")

    wall, rss = child(measured(["geobench.cli", "analyze", "--manifest", str(manifest), "--opt", "opt",
                                "--out", str(root / "backbone"), "--metric", "backbone",
                                f"backbone.rotation_window={max(3, args.checkpoints - 1)}"]))
    print(f"geobench analyze --manifest backbone: {wall:7.1f} s, peak RSS {rss:6.2f} GiB")


if __name__ == "__main__":
    main()
