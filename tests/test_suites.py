"""Benchmark suites and comparison reports, through the command line."""

import json
import re

import jsonschema
import numpy as np
import pytest
import yaml

from conftest import FAST, run_cli
from geobench import comparison, report, series

MINI = {
    "name": "mini",
    "description": "two optimizers × two seeds",
    "base": dict(pair.split("=", 1) for pair in FAST if not pair.startswith("metrics")) | {"eval_every": 4},
    "grid": {"optimizer": ["adamw", "sgd"], "seed": [1, 2]},
    "metrics": ["backbone"],
    "metric_options": {"backbone": {"per_block": False}},
    "table": {"heading": "configuration"},
}


def write_suite(tmp_path, **changes):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**MINI, **changes}))
    return path


def test_list_shows_the_builtin_suites():
    result = run_cli("bench", "--list")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["ep-vs-bptt", "optimizer-zoo", "paper-beta2", "paper-main", "paper-reheat", "paper-sgd"]


def test_a_suite_runs_every_cell_skips_done_ones_and_compares(tmp_path):
    suite = write_suite(tmp_path)
    result = run_cli("bench", str(suite), "scale=tiny", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[1/4] adamw-seed=1: running" in result.stdout and "[4/4] sgd-seed=2: completed" in result.stdout
    doc = json.loads((tmp_path / "out" / "comparison.json").read_text())
    jsonschema.validate(doc, report.load_schema("comparison"))
    assert [r["label"] for r in doc["runs"]] == ["adamw-seed=1", "adamw-seed=2", "sgd-seed=1", "sgd-seed=2"]
    groups = {g["group"]: g for g in doc["groups"]}
    assert set(groups) == {"adamw", "sgd"} and groups["adamw"]["runs"] == 2
    pc1 = [r["values"]["pc1"] for r in doc["runs"][:2]]
    assert groups["adamw"]["values"]["pc1"] == pytest.approx(np.mean(pc1))
    lo, hi = groups["adamw"]["intervals"]["pc1"]
    assert min(pc1) - 1e-12 <= lo <= hi <= max(pc1) + 1e-12
    html = (tmp_path / "out" / "comparison.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    page = (tmp_path / "out" / "comparison.md").read_text()
    assert re.search(r"^\| adamw \| optimizer=adamw, .* \| completed \| 2 \|", page, re.M)  # its settings, its 2 seeds
    assert doc["headline"][0].startswith("4 runs of 2 configurations differing in optimizer, ")
    assert doc["headline"][0].endswith(", 2 seeds each. All completed (12 steps).")
    index = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [c["outcome"]["state"] for c in index["cells"]] == ["completed"] * 4
    assert index["table"] == {"heading": "configuration"} and [c["group"] for c in index["cells"]][:2] == ["adamw"] * 2

    again = run_cli("bench", str(suite), "scale=tiny", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already completed, skipped") == 4

    compared = run_cli("report", str(tmp_path / "out" / "adamw-seed=1"), str(tmp_path / "out" / "sgd-seed=1"),
                     "--out", "side", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    side = json.loads((tmp_path / "side" / "comparison.json").read_text())
    assert len(side["runs"]) == 2 and side["table"] == {"heading": "configuration"}

    rebuilt = run_cli("report", "out", cwd=tmp_path)  # from suite.json alone
    assert rebuilt.returncode == 0, rebuilt.stderr
    again_doc = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert again_doc["title"] == doc["title"] and again_doc["groups"] == doc["groups"]


def test_a_diverging_cell_is_recorded_and_the_suite_goes_on(tmp_path):
    suite = write_suite(tmp_path, grid=[{"label": "boom", "optimizer": "sgd", "lr": 1e6, "wd": 0, "grad_clip": 0},
                                        {"label": "fine", "optimizer": "adamw"}], metrics=[], metric_options={})
    result = run_cli("bench", str(suite), "scale=tiny", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cells = {c["label"]: c["outcome"] for c in json.loads((tmp_path / "out" / "suite.json").read_text())["cells"]}
    assert cells["boom"]["state"] == "diverged" and cells["boom"]["detail"].startswith("at step ")
    assert cells["fine"]["state"] == "completed"
    doc = json.loads((tmp_path / "out" / "comparison.json").read_text())
    step = cells["boom"]["detail"].removeprefix("at step ").split()[0]
    assert f"boom diverged at step {step}; the others completed." in doc["headline"][0]
    assert re.search(rf"^\| boom \| .* \| diverged at step {step} \| 1 \|", (tmp_path / "out" / "comparison.md").read_text(),
                     re.M)


@pytest.mark.parametrize("changes, message", [
    ({"grdi": {}}, "unknown key 'grdi' (did you mean 'grid'?)"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {"optimizer": []}}, "the grid is empty"),
    ({"grid": [{"optimizer": "adamx"}]}, "unknown optimizer 'adamx'"),
    ({"metrics": ["backbone", "swiching"]}, "unknown metric 'swiching'"),
    ({"metrics": ["reheat"], "metric_options": {"reheat": {"from_steps": [7]}}},
     "reheat.from_steps: the run will have no checkpoint at step 7"),
    ({"table": "wide"}, "table must be a mapping of heading, label_by, order_by"),
    ({"table": {"heading": "x", "labelby": "beta2"}}, "table has unknown key 'labelby' (did you mean 'label_by'?)"),
    ({"base": {"stepz": 3}}, "unknown key 'stepz'"),
])
def test_bad_suites_fail_before_anything_runs(tmp_path, changes, message):
    suite = write_suite(tmp_path, **changes)
    result = run_cli("bench", str(suite), "scale=tiny", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_suite_directory_in_use_is_refused(tmp_path):
    from geobench.rundir import writer_lock

    suite = write_suite(tmp_path, grid={"optimizer": ["adamw"]}, metrics=[], metric_options={})
    with writer_lock(tmp_path / "out", "bench"):
        result = run_cli("bench", str(suite), "scale=tiny", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and "is being written by geobench bench" in result.stderr, result.stderr
    result = run_cli("bench", str(suite), "scale=tiny", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_builtin_tiny_suite_paper_reheat(tmp_path):
    result = run_cli("bench", "paper-reheat", "scale=tiny", "--out", "reheat", cwd=tmp_path,
                     timeout=1800)  # a hang guard: minutes on a loaded 2-core machine
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "reheat" / "comparison.json").read_text())
    assert doc["table"]["heading"] == "configuration" and doc["runs"][0]["values"]["gain"] > 0
    assert (tmp_path / "reheat" / "figures" / "reheat_curves.png").exists()
    cell = json.loads((tmp_path / "reheat" / "adamw" / "report.json").read_text())
    rows = cell["metrics"]["reheat"]["tables"]["reheat"]
    assert [r["lr"] for r in rows] == [1e-3, 6e-4, 3e-4]
    assert all(r["gain"] > 0 for r in rows), rows  # the paper's contrast: every lr re-enters


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["paper-main", "paper-beta2", "paper-sgd", "ep-vs-bptt", "optimizer-zoo"])
def test_builtin_tiny_suites(tmp_path, suite):
    result = run_cli("bench", suite, "scale=tiny", "--out", "out", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "out" / "comparison.json").read_text())
    jsonschema.validate(doc, report.load_schema("comparison"))
    runs = {r["label"]: {**r, **r["values"]} for r in doc["runs"]}
    if suite == "paper-beta2":  # the paper's contrasts (docs/science.md#published-figures), at tiny scale
        zero = runs.pop("adamw-beta2=0.0")
        assert zero["status"] == "diverged" and zero["steps"] == 2000  # trained on to the end, as the source did
        assert zero["drift"] > 100 * max(r["drift"] for r in runs.values())
        b99, b95, b90, b80 = (runs[f"adamw-beta2={b}"] for b in ("0.99", "0.95", "0.9", "0.8"))
        # the reference run's contrasts, with margins (reports/reference/README.md); PC1 at β₂ = 0.99
        # and 0.95 ties at this scale (the sign of the gap changes with the seed), so the ordered fall
        # is asserted from 0.95 down
        assert b80["pc1"] < b90["pc1"] < b95["pc1"] and b80["pc1"] < b99["pc1"] - 0.05
        assert b80["k95"] > b99["k95"]
        assert b99["best_p_ood"] > b95["best_p_ood"] > b90["best_p_ood"] and zero["best_p_ood"] < 0.1
        assert b99["best_p_ood"] > b80["best_p_ood"] + 0.3
        assert [r["name"] for r in doc["references"]][:1] == ["mini_gpt-beta2-0.99"]
    if suite == "optimizer-zoo":  # every optimizer ranked, its geometry measured, the energy along AdamW's drift
        assert doc["table"]["order_by"] == "val_loss" and len(doc["groups"]) == 14
        assert all(g["runs"] == 2 for g in doc["groups"])
        assert runs["adamw-seed=42"]["cos_eff"] == pytest.approx(1.0)  # φ̂ is this run's own drift
        assert 0 < runs["adamw-seed=271"]["cos_eff"] < 1
        assert (tmp_path / "out" / "figures" / "pc1_vs_val_loss.png").exists()
    if suite == "paper-sgd":  # AdamW leaves the line, plain SGD and SGD + momentum stay on it
        assert runs["A-adamw"]["pc1"] < 0.98 and runs["A-adamw"]["k95"] > 1
        for label in ("B-sgd", "C-sgd-momentum"):
            assert runs[label]["pc1"] >= 0.98 and runs[label]["k95"] == 1, runs[label]
            assert runs["A-adamw"]["best_p_ood"] > runs[label]["best_p_ood"]


def test_bootstrap_interval_brackets_the_mean():
    rng = np.random.default_rng(0)
    values = [0.70, 0.72, 0.69]
    lo, hi = series.bootstrap_interval(values, rng)
    assert min(values) - 1e-9 <= lo <= np.mean(values) <= hi <= max(values) + 1e-9
    assert series.bootstrap_interval([0.5, 0.5], rng) == (0.5, 0.5)


def test_the_beta2_suite_checkpoints_where_the_published_series_has_rows(tmp_path):
    from geobench import published, suites
    from geobench.registry import installed
    from geobench.schedule import is_checkpoint_step

    suite = suites.load("paper-beta2", "paper", {}, str(tmp_path / "b2"), installed())
    cfg = suite.cells[0].cfg
    assert (cfg.train.steps, cfg.probe.p_probe, cfg.train.eval_every, cfg.train.early_stop) == (4000, 0.2, 200, False)
    steps = [s for s in range(1, cfg.train.steps + 1) if is_checkpoint_step(s, cfg)]
    assert steps == published.load("mini_gpt-beta2-0.99").steps


def test_published_figures_name_columns_of_their_table(tmp_path):
    from geobench import suites
    from geobench.registry import installed

    for name in suites.builtin():
        suite = suites.load(name, "paper", {}, str(tmp_path / name), installed())
        for group, values in suite.published.items():
            assert set(values) <= set(comparison.columns(installed())), (name, group)
            assert group in {c.group for c in suite.cells}, (name, group)


def test_cells_that_differ_only_in_their_seed_form_one_group_however_the_grid_names_it(tmp_path):
    from geobench import suites
    from geobench.registry import installed

    for key in ("seed", "train.seed"):
        suite = suites.load(str(write_suite(tmp_path, grid={"optimizer": ["adamw", "sgd"], key: [1, 2]})), "tiny", {},
                            str(tmp_path / key), installed())
        assert [c.group for c in suite.cells] == ["adamw", "adamw", "sgd", "sgd"], key
