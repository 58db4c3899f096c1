"""Shared-direction energy: hand-computed sums, Hugging Face style sharded checkpoints through a
manifest, bad manifests, and the invariants."""

import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import hf_checkpoint, run_cli
from geobench.api import UsageError
from geobench.checkpoints import CheckpointReader
from geobench.shared_direction import COLUMNS, energy_rows, manifest_energy


def test_hand_computed_energy(tmp_path):
    origin = {"w": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([1.0, 1.0, 1.0])}
    final = {"w": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([1.0, 1.0, 3.0])}   # φ̂_w = (0.6, 0.8), φ̂_b = e3
    middle = {"w": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([2.0, 1.0, 2.0])}  # τ_w = (1, 0), τ_b = (1, 0, 1)
    paths = {}
    for name, tensors in (("origin", origin), ("middle", middle), ("final", final)):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, paths[name])
    readers = {k: CheckpointReader(v) for k, v in paths.items()}
    rows = energy_rows("adamw", [(0, readers["origin"]), (5, readers["middle"]), (10, readers["final"])],
                       readers["origin"], lambda n: readers["final"].get(n) - readers["origin"].get(n), ["w", "b"])
    mid = rows[1]
    assert mid["E_tau"] == pytest.approx(1 + 2)
    assert mid["E_phi"] == pytest.approx(0.6**2 + 1.0**2)
    assert mid["E_perp"] == pytest.approx(3 - 1.36)
    assert mid["p_phi"] == pytest.approx(1.36 / 3) and mid["cos_eff"] == pytest.approx(np.sqrt(1.36 / 3))
    assert rows[2]["cos_eff"] == pytest.approx(1.0) and rows[2]["E_tau"] == pytest.approx(25 + 4)
    assert list(rows[0]) == COLUMNS and mid["n_params"] == 2


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"layer.0.w": (4, 3), "layer.1.w": (3, 3), "norm.b": (3,)}
    start = {n: rng.normal(size=s) for n, s in shapes.items()}
    runs = {}
    for opt, scale in (("adamw", 1.0), ("sgd", 0.3)):
        entries = []
        for it in (0, 100, 200):
            tensors = {n: torch.from_numpy(start[n] + scale * it / 100 + rng.normal(size=shapes[n]) * 0.01).float()
                       for n in shapes}
            hf_checkpoint(tmp_path / opt / f"iter_{it}", tensors)
            entries.append({"iter": it, "hf_path": f"{opt}/iter_{it}"})
        runs[opt] = {"checkpoints": entries[::-1]}  # any order: sorted by iter
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"optimizers": runs}))
    return path


def test_manifest_of_sharded_checkpoints_matches_numpy(manifest, tmp_path):
    rows = manifest_energy(manifest, "sgd", "adamw", r"\.w$").rows
    assert [r["iter"] for r in rows] == [0, 100, 200] and rows[0]["n_params"] == 2

    def load(opt, it):
        reader = CheckpointReader(tmp_path / opt / f"iter_{it}")
        return {n: reader.get(n).numpy() for n in ("layer.0.w", "layer.1.w")}

    origin, end = load("adamw", 0), load("adamw", 200)
    for row in rows:
        theta = load("sgd", row["iter"])
        tau = {n: theta[n] - origin[n] for n in theta}
        phi = {n: (end[n] - origin[n]) / np.linalg.norm(end[n] - origin[n]) for n in theta}
        assert row["E_tau"] == pytest.approx(sum((t**2).sum() for t in tau.values()), rel=1e-9)
        assert row["E_phi"] == pytest.approx(sum(((tau[n] * phi[n]).sum()) ** 2 for n in tau), rel=1e-9)

    result = run_cli("energy", "--manifest", str(manifest), "--opt", "sgd", "--ref", "adamw", "--out", str(tmp_path / "t.csv"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "t.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == COLUMNS and len(table) == 3 and table[0]["opt"] == "sgd"


def test_bad_manifests_are_one_line_errors(manifest, tmp_path):
    (tmp_path / "adamw" / "iter_100" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UsageError, match="shard 'model-00002-of-00002.safetensors' listed in .* is missing"):
        manifest_energy(manifest, "adamw", None, ".")
    with pytest.raises(UsageError, match="manifest has no optimizer 'lion'; it lists adamw, sgd"):
        manifest_energy(manifest, "lion", None, ".")
    with pytest.raises(UsageError, match="manifest has no optimizer 'lion'"):
        manifest_energy(manifest, "sgd,lion", None, ".")
    save_file({"layer.0.w": torch.zeros(5, 5), "layer.1.w": torch.zeros(3, 3), "norm.b": torch.zeros(3)},
              tmp_path / "sgd" / "iter_100" / "model-00001-of-00002.safetensors")
    shape = r"'layer.0.w' has shape \(5, 5\) at iter 100 of 'sgd' \('.*model-00001-of-00002.safetensors'\) but \(4, 3\)"
    with pytest.raises(UsageError, match=shape):
        manifest_energy(manifest, "sgd", None, ".")
    broken = tmp_path / "broken.json"
    broken.write_text('{"optimizers": {"x": {"ckpts": []}}}')
    result = run_cli("energy", "--manifest", str(broken), "--opt", "x", "--out", str(tmp_path / "o.csv"))
    assert result.returncode == 2 and "does not have the form" in result.stderr and not (tmp_path / "o.csv").exists()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_energy_invariants(seed, n_params):
    rng = np.random.default_rng(seed)

    class Memory:
        def __init__(self, tensors):
            self.tensors = tensors

        def get(self, name):
            return self.tensors[name]

    names = [f"p{i}" for i in range(n_params)]
    shapes = {n: tuple(rng.integers(1, 5, size=rng.integers(1, 3))) for n in names}
    make = lambda: Memory({n: torch.from_numpy(rng.normal(size=shapes[n])) for n in names})  # noqa: E731
    origin, end = make(), make()
    checkpoints = [(i, make()) for i in range(3)]
    rows = energy_rows("x", checkpoints, origin, lambda n: end.get(n) - origin.get(n), names)
    for row, (_, theta) in zip(rows, checkpoints):
        # independently, in numpy: the perpendicular energy from the residual vectors τ − α φ̂ themselves
        tau = {n: (theta.get(n) - origin.get(n)).numpy().ravel() for n in names}
        phi = {n: (end.get(n) - origin.get(n)).numpy().ravel() for n in names}
        phi = {n: v / np.linalg.norm(v) for n, v in phi.items()}
        alpha = {n: tau[n] @ phi[n] for n in names}
        e_tau = sum(t @ t for t in tau.values())
        e_perp = sum(np.sum((tau[n] - alpha[n] * phi[n]) ** 2) for n in names)
        assert row["E_tau"] == pytest.approx(e_tau, rel=1e-9)
        assert row["E_phi"] == pytest.approx(sum(a**2 for a in alpha.values()), rel=1e-9)
        assert row["E_perp"] == pytest.approx(e_perp, rel=1e-9, abs=1e-12)
        assert row["p_phi"] == pytest.approx(1 - e_perp / e_tau, rel=1e-9, abs=1e-12)
        assert row["cos_eff"] == pytest.approx(np.sqrt(max(1 - e_perp / e_tau, 0.0)), rel=1e-7, abs=1e-9)
