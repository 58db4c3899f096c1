"""The metric plugin as a user meets it: installed with pip, listed by `geobench plugins`, computed at
the end of `geobench run` and by `geobench analyze`, and shown in a `geobench report` comparison."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

FAST = ["preset=tiny", "steps=8", "train_stories=200", "val_stories=30", "eval_examples=8", "n_codewords=32",
        "eval_every=4", "checkpoint_every=2", "batch_size=4", "val_batches=1", "val_batch_size=4", "warmup=2"]


def geobench(*args, cwd=None):
    script = Path(sys.executable).parent / "geobench"
    command = [str(script) if script.exists() else shutil.which("geobench")]
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_listed_with_its_package():
    listing = json.loads(geobench("plugins", "--json").stdout)
    assert listing["metrics"]["update_norms"]["source"] == "geobench-update-norms 0.1.0"
    assert listing["metrics"]["update_norms"]["needs"] == ["checkpoints", "run"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        result = geobench("run", "adamw", f"lr={lr}", *FAST, "metrics=[backbone,update_norms]", "--out", name, cwd=where)
        assert result.returncode == 0, result.stderr
    return where


def test_update_lengths_match_numpy(runs):
    run = runs / "a"
    result = json.loads((run / "report.json").read_text())["metrics"]["update_norms"]
    assert result["status"] == "ok"
    steps = json.loads((run / "checkpoints" / "index.json").read_text())["steps"]
    weights = {s: load_file(run / "checkpoints" / f"step_{s:06d}.safetensors") for s in steps}
    trunk = [n for n in weights[steps[0]] if n.startswith("blocks.") and n.endswith(
        ("attn.qkv.weight", "attn.proj.weight", "mlp.up.weight", "mlp.down.weight"))]
    block1 = [n for n in weights[steps[0]] if n.startswith("blocks.1.")]
    for row, (s, t) in zip(result["tables"]["updates"], zip(steps, steps[1:])):
        for scope, names in (("trunk", trunk), ("block:1", block1)):
            delta = np.sqrt(sum(((weights[t][n].astype(np.float64) - weights[s][n]) ** 2).sum() for n in names))
            norm = np.sqrt(sum((weights[t][n].astype(np.float64) ** 2).sum() for n in names))
            assert row["step"] == t and row[scope] == pytest.approx(delta / (t - s) / norm, rel=1e-9)
    assert result["scalars"]["trunk_last"] == result["tables"]["updates"][-1]["trunk"]


def test_a_comparison_shows_its_column_and_figure(runs):
    result = geobench("report", str(runs / "a"), str(runs / "b"), "--out", str(runs / "cmp"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((runs / "cmp" / "comparison.json").read_text())
    assert "update_norm" in doc["columns"] and doc["metric_of"]["update_norm"] == "update_norms"
    assert all(row["values"]["update_norm"] > 0 for row in doc["runs"])
    assert "figures/update_norms_trunk.png" in doc["figures"]
    assert "| trunk update/step |" in (runs / "cmp" / "comparison.md").read_text().replace(" | ", " |\n| ")


def test_works_on_the_eqformer_and_refuses_a_bad_option(tmp_path):
    ep = ["model.d_model=32", "model.n_head=2", "model.d_ff=64", "model.relax_steps=10", "nudge_steps=4"]
    result = geobench("run", "ep", *FAST, *ep, "metrics=[update_norms]", "--out", "ep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "ep" / "report.json").read_text())["metrics"]["update_norms"]["tables"]["updates"]
    assert set(rows[0]) == {"step", "trunk", "block:0"}
    bad = geobench("run", "adamw", *FAST, "metrics=[update_norms]", "update_norms.relative=maybe", cwd=tmp_path)
    assert bad.returncode == 2 and "update_norms.relative='maybe' is not a valid bool" in bad.stderr
