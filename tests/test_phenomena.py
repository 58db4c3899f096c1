"""The phenomena geobench exists to show, asserted on a tiny CPU run where they are present: the
probe is learned, the drift has a backbone the updates align with, a reheat re-enters, the switch
detector finds planted switches through the real metric, β₂ = 0 diverges; and a run without them
says so in words instead of tables of zeros."""

import json
import shutil

import pytest

from conftest import FAST, run_cli
from geobench import report

# the card's run, `geobench run adamw beta2=0.9` on CPU: the tiny preset (p_probe 0.5, λ 2 → 4 at 200)
LEARNED = ["preset=tiny", "beta2=0.9", "metrics=[backbone,alignment]"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("phenomena") / "learned"
    result = run_cli("run", "adamw", *LEARNED, "--out", str(run), timeout=900)
    assert result.returncode == 0, result.stderr
    return run, result.stdout, json.loads((run / "report.json").read_text())


def test_the_probe_is_learned_and_the_console_does_not_warn(learned_run):
    _, stdout, doc = learned_run
    assert max(e["p_ood"] for e in doc["evals"]) >= 0.5
    assert max(e["p_in"] for e in doc["evals"]) >= 0.8
    assert doc["evals"][0]["p_ood"] < 0.1  # learned during the run, not before it
    assert "warning" not in stdout


def test_the_drift_has_a_backbone_and_the_updates_align_with_it(learned_run):
    _, _, doc = learned_run
    backbone = doc["metrics"]["backbone"]["scalars"]
    assert backbone["pc1"] >= 0.6  # row-normalized, trunk
    alignment = doc["metrics"]["alignment"]["scalars"]
    assert alignment["mean_abs_cos"] > 5 * alignment["control_mean_abs_cos"]


def test_a_reheat_from_before_the_onset_re_enters_the_basin(learned_run):
    run, _, doc = learned_run
    before = max(e["step"] for e in doc["evals"] if e["p_ood"] < 0.1 and e["step"] % 25 == 0)
    result = run_cli("analyze", str(run), "--metric", "reheat", f"reheat.from_steps=[{before}]", "reheat.lrs=[6e-4]",
                     "reheat.steps=50", "reheat.warmup=5", "reheat.eval_every=10")
    assert result.returncode == 0, result.stderr
    row = json.loads((run / "report.json").read_text())["metrics"]["reheat"]["tables"]["reheat"][0]
    assert row["start_p_ood"] < 0.1 and row["gain"] >= 0.1
    assert row["diverged"] is False  # judged against the source run's step-1 val_loss, not the reheat's own


def test_switching_finds_planted_switches_through_the_metric(learned_run, tmp_path):
    run, _, doc = learned_run
    planted = tmp_path / "planted"
    shutil.copytree(run, planted)
    # a p_ood series with two clear switches at checkpoint steps: peaks at 150 and 350, troughs at 250 and 450
    shape = {1: 0.0, 50: 0.05, 100: 0.2, 150: 0.7, 200: 0.5, 250: 0.3, 300: 0.6, 350: 0.8, 400: 0.5, 450: 0.3,
             500: 0.4}
    evals = [dict(e, p_ood=shape[e["step"]]) for e in doc["evals"]]
    (planted / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    result = run_cli("analyze", str(planted), "--metric", "switching", "switching.resamples=5")
    assert result.returncode == 0, result.stderr
    switching = json.loads((planted / "report.json").read_text())["metrics"]["switching"]
    rows = switching["tables"]["switches"]
    assert [(r["peak"], r["trough"]) for r in rows] == [(150, 250), (350, 450)]
    assert all(0 <= r["abs_cos_vb"] <= 1 and 0 <= r["e2_6"] <= 1 for r in rows)
    assert "no_signal" not in switching


def test_beta2_zero_diverges_with_finite_losses_and_a_huge_drift(learned_run, tmp_path):
    _, _, healthy = learned_run
    result = run_cli("run", "adamw", "preset=tiny", "beta2=0", "steps=30", "eval_every=10", "checkpoint_every=10",
                     "metrics=[backbone]", "--out", str(tmp_path / "zero"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert doc["run"]["status"] == "diverged" and doc["run"]["last_step"] == 30  # trained on, as the source did
    assert doc["run"]["diverged_at"] in (10, 20, 30) and "train.diverge_factor" in doc["run"]["divergence"]
    assert all(e["val_loss"] < float("inf") for e in doc["evals"])
    assert doc["metrics"]["backbone"]["scalars"]["drift"] > 10 * healthy["metrics"]["backbone"]["scalars"]["drift"]


def test_a_run_without_a_learned_probe_says_so(tmp_path):
    result = run_cli("run", "adamw", *FAST, "metrics=[switching]", "switching.resamples=3", "--out", str(tmp_path / "flat"))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("geobench: warning: best p_ood") and "the probe was not learned" in last
    doc = json.loads((tmp_path / "flat" / "report.json").read_text())
    report.validate(doc)
    assert doc["metrics"]["switching"]["options"]["resamples"] == 3  # a metric option given to `run`
    assert doc["metrics"]["switching"]["no_signal"].startswith("no switching: best p_ood")
    text = (tmp_path / "flat" / "report.md").read_text()
    assert "**No signal:** no switching: best p_ood" in text and "**switches**" not in text


def test_run_refuses_an_unknown_metric_option_before_writing(tmp_path):
    result = run_cli("run", "adamw", *FAST, "metrics=[switching]", "switching.resampels=3", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "metric 'switching' has no option 'resampels'" in result.stderr and "resamples" in result.stderr
    assert not (tmp_path / "bad").exists()
