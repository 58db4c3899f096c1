"""The plugin as a user meets it: installed with pip, found by `geobench plugins`, trained with
through `geobench run`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from geobench_lion import Lion

FAST = ["preset=tiny", "steps=8", "train_stories=200", "val_stories=30", "eval_examples=8", "n_codewords=32",
        "eval_every=4", "checkpoint_every=4", "batch_size=4", "val_batches=1", "val_batch_size=4", "warmup=2"]


def geobench(*args, cwd=None):
    script = Path(sys.executable).parent / "geobench"
    command = [str(script) if script.exists() else shutil.which("geobench")]
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_lion_matches_its_formula():
    rng = np.random.default_rng(0)
    theta, m = rng.normal(size=5), np.zeros(5)
    p = torch.nn.Parameter(torch.tensor(theta))
    opt = Lion([p], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(3):
        g = rng.normal(size=5)
        p.grad = torch.tensor(g)
        opt.step()
        theta = theta * (1 - 0.01 * 0.1) - 0.01 * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-12)


def test_listed_by_geobench_plugins_with_its_package():
    listing = json.loads(geobench("plugins", "--json").stdout)
    assert listing["optimizers"]["lion-example"]["source"] == "geobench-lion 0.1.0"
    assert listing["optimizers"]["lion-example"]["params"]["lr"]["default"] == 1e-4


def test_trains_through_the_cli(tmp_path):
    result = geobench("run", "lion-example", "lr=3e-4", *FAST, "--out", "lion-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "lion-run" / "report.json").read_text())
    optimizer = report["optimizer"]
    assert (optimizer["name"], optimizer["source"]) == ("lion-example", "geobench-lion 0.1.0")
    assert optimizer["params"] == {"lr": 3e-4, "beta1": 0.9, "beta2": 0.99, "wd": 0.1}
    assert optimizer["schedule"]["owner"] == "harness" and optimizer["state_floats_per_parameter"] == 1.0
    assert [g["roles"] for g in optimizer["groups"]] == [["embedding", "matrix"], ["norm"]]
    assert report["run"]["status"] == "completed"
    bad = geobench("run", "lion-example", "beta1=2", *FAST, cwd=tmp_path)
    assert bad.returncode == 2 and "beta1='2' is out of range" in bad.stderr
