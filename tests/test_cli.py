"""The command line as a user calls it: the installed `geobench` script in a subprocess."""

import json
import math
import os
import signal
import subprocess
import time

import jsonschema
import pytest
import torch
import yaml

from conftest import FAST, geobench_command, run_cli, stopping_after_first_state
from geobench import report
from geobench.rundir import RunDir


def test_plugins_lists_builtins_with_source_and_hyperparameters():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "adamw" in result.stdout and "[geobench 0.1.0]" in result.stdout
    assert "beta2 = 0.95  (float >= 0 and < 1)" in result.stdout
    listing = json.loads(run_cli("plugins", "--json").stdout)
    assert set(listing["optimizers"]) >= {"adamw", "sgd", "torch"}
    assert listing["optimizers"]["sgd"]["params"]["wd_mode"]["allowed"] == "one of l2, decoupled"
    assert "gpt" in listing["models"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("cli")
    result = run_cli("run", "adamw", "beta2=0.9", *FAST, cwd=where)
    return where, result


def test_run_writes_a_complete_run_directory(finished_run):
    where, result = finished_run
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("geobench: preset tiny (as asked); device cpu") and "'beta2': 0.9" in first
    assert "corpus embedded synthetic stories" in result.stdout and "tokenizer byte-level BPE" in result.stdout
    run = RunDir(where / "runs" / "adamw-beta2=0.9")
    for name in ("config.yaml", "evals.jsonl", "report.json", "report.md", "tokenizer.json", "codewords.json",
                 "figures/training.png", "checkpoints/index.json", "state/meta.json"):
        assert (run.path / name).exists(), name
    doc = json.loads(run.report_json.read_text())
    report.validate(doc)
    assert doc["run"]["status"] == "completed" and doc["run"]["last_step"] == 12
    assert doc["corpus"]["kind"] == "embedded" and doc["tokenizer"]["kind"] == "bpe"
    assert doc["optimizer"]["params"]["beta2"] == 0.9
    assert doc["environment"]["device"].startswith("cpu")
    assert [e["step"] for e in doc["evals"]] == [1, 6, 12]
    assert doc["throughput"]["tokens"] == 12 * 8 * 128
    assert run.checkpoint_steps() == [1, 4, 8, 12]
    assert len(json.loads((run.path / "codewords.json").read_text())) == 32
    assert "## Final evaluation" in run.report_md.read_text()
    assert "<h2>Final evaluation</h2>" in (run.path / "report.html").read_text()
    before_training = result.stdout.split("geobench: run directory")[0]
    assert "warning" not in before_training  # FAST's schedule is consistent


def test_a_schedule_left_behind_by_overrides_warns_in_one_line_each(tmp_path):
    result = run_cli("run", "adamw", *FAST, "steps=5", "--out", "short", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    before_training = result.stdout.split("geobench: run directory")[0]  # (after it: the probe-not-learned one)
    warnings = [line for line in before_training.splitlines() if line.startswith("geobench: warning:")]
    assert len(warnings) == 2, warnings
    assert any("the λ switch at step 6 comes after the last step (train.steps=5)" in w for w in warnings)
    assert any("2 evaluations (train.eval_every=6, train.steps=5): too few for a curve" in w for w in warnings)
    assert not any("warmup" in w for w in warnings)  # warmup 3 < 5 steps


def test_the_saved_config_reproduces_the_run(finished_run):
    where, _ = finished_run
    (original,) = (where / "runs").iterdir()
    result = run_cli("run", "--config", str(original / "config.yaml"), "--out", "again", cwd=where)
    assert result.returncode == 0, result.stderr
    a, b = RunDir(original).load_checkpoint(12), RunDir(where / "again").load_checkpoint(12)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("args, message", [
    (["adamw", "beta2=1.5"], "beta2='1.5' is out of range"),
    (["adamw", "lr=-1"], "lr='-1' is out of range"),
    (["adamw", "steps=many"], "train.steps='many' is not a valid int"),
    (["adamww"], "unknown optimizer 'adamww' (did you mean 'adamw'?)"),
    (["adamw", "betta2=0.9"], "unknown key 'betta2' (did you mean 'beta2'?)"),
    (["adamw", "data=./no/such/folder"], "data path './no/such/folder' does not exist"),
    (["adamw", "--config", "bad.yaml"], "malformed YAML in config file 'bad.yaml'"),
    (["adamw", "metrics=backbon"], "unknown metric 'backbon'"),
    (["sgd", "nesterov=true"], "nesterov=true needs momentum > 0"),
    (["torch:Adam", "lr=0.01", "foo=1"], "unknown key 'foo'"),
    (["adamw", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, message):
    (tmp_path / "bad.yaml").write_text("train: {steps: [1\n")
    result = run_cli("run", args[0], *FAST, *args[1:], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("geobench: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_existing_run_directory_needs_resume(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = run_cli("run", "adamw", *FAST, "--out", "taken", cwd=tmp_path)
    assert result.returncode == 2 and "exists and is not empty; continue it with resume=true" in result.stderr
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]


def test_divergence_is_a_result_with_a_report(tmp_path):
    # diverge_factor=0: only a non-finite loss counts (with the default, step 1's huge val_loss is the first sign)
    result = run_cli("run", "sgd", "lr=1e6", "wd=0", "grad_clip=0", "diverge_factor=0", *FAST, "--out", "boom",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "boom" / "report.json").read_text())
    assert doc["run"]["status"] == "diverged"
    assert doc["run"]["diverged_at"] == doc["run"]["last_step"] + 1 <= 12
    assert "diverged at step" in result.stdout and "(non-finite loss)" in (tmp_path / "boom" / "report.md").read_text()
    assert doc["run"]["last_step"] in RunDir(tmp_path / "boom").checkpoint_steps()


def test_a_finite_blow_up_is_marked_diverged_and_training_goes_on(tmp_path):
    # a factor below 1 makes the criterion fire at the first evaluation (step 1): the anchor is the
    # val_loss before the first update, written to baseline.json
    result = run_cli("run", "adamw", *FAST, "diverge_factor=0.1", "--out", "marked", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "marked" / "report.json").read_text())
    baseline = json.loads((tmp_path / "marked" / "baseline.json").read_text())
    assert baseline["step"] == 0 and doc["run"]["baseline_val_loss"] == baseline["val_loss"]
    assert doc["run"]["status"] == "diverged" and doc["run"]["diverged_at"] == 1 and doc["run"]["last_step"] == 12
    assert "train.diverge_factor" in doc["run"]["divergence"] and "diverged at step 1" in result.stdout
    assert [e["step"] for e in doc["evals"]] == [1, 6, 12]
    stopped = run_cli("run", "adamw", *FAST, "diverge_factor=0.1", "stop_on_diverge=true", "--out", "stopped",
                      cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    doc = json.loads((tmp_path / "stopped" / "report.json").read_text())
    assert (doc["run"]["status"], doc["run"]["last_step"]) == ("diverged", 1)
    assert 1 in RunDir(tmp_path / "stopped").checkpoint_steps()


def test_a_run_broken_by_its_first_update_is_diverged(tmp_path):
    # AdamW at lr 3 without warmup: every weight moves by ~3 in step 1, the loss is finite and huge from
    # then on; judged against its own step-1 loss it would never look diverged
    result = run_cli("run", "adamw", *FAST, "lr=3", "warmup=0", "--out", "broken", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "broken" / "report.json").read_text())
    assert all(math.isfinite(e["val_loss"]) for e in doc["evals"])
    assert (doc["run"]["status"], doc["run"]["diverged_at"]) == ("diverged", 1), doc["evals"]


def test_early_stop_is_opt_in(tmp_path):
    result = run_cli("run", "adamw", *FAST, "early_stop=true", "early_stop_p_ood=0", "early_stop_evals=2",
                     "--out", "early", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "early" / "report.json").read_text())
    assert doc["run"]["status"] == "completed" and doc["run"]["stopped_early_at"] == doc["run"]["last_step"] == 6
    assert RunDir(tmp_path / "early").checkpoint_steps()[-1] == 6
    assert "stopped early at step 6" in (tmp_path / "early" / "report.md").read_text()


SLOW_ENOUGH = ["steps=80", "state_every=10", "checkpoint_every=20", "eval_every=40", "batch_size=16"]


def wait_for_state(run: RunDir, process: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        meta = run.state / "meta.json"
        if meta.exists():
            try:
                return json.loads(meta.read_text())["step"]
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    raise AssertionError("the run never saved its state")


def test_resume_after_kill_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    args = ["run", "adamw", *FAST, *SLOW_ENOUGH]
    assert run_cli(*args, "--out", "whole", cwd=tmp_path).returncode == 0

    victim = subprocess.Popen(geobench_command() + args + ["--out", "killed"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **stopping_after_first_state(tmp_path)})
    killed_at = wait_for_state(RunDir(tmp_path / "killed"), victim)
    victim.kill()
    victim.wait()
    assert killed_at < 80, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "report.json").exists()

    resumed = run_cli(*args, "resume=true", "--out", "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert doc["run"]["status"] == "completed" and doc["run"]["resumed_from"] >= killed_at
    whole, again = RunDir(tmp_path / "whole"), RunDir(tmp_path / "killed")
    assert whole.checkpoint_steps() == again.checkpoint_steps()
    for step in whole.checkpoint_steps():
        a, b = whole.load_checkpoint(step), again.load_checkpoint(step)
        assert all(torch.equal(a[n], b[n]) for n in a), step
    assert [e.val_loss for e in whole.read_evals()] == [e.val_loss for e in again.read_evals()]


def test_ctrl_c_saves_state_and_reports_interrupted(tmp_path):
    # so many steps that the run cannot finish before the signal, however loaded the machine
    # (finishing a resumed run is tested by the SIGKILL test above)
    args = ["run", "adamw", *FAST, *SLOW_ENOUGH, "steps=1000000", "--out", "stopped"]
    process = subprocess.Popen(geobench_command() + args, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_state(RunDir(tmp_path / "stopped"), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    doc = json.loads((tmp_path / "stopped" / "report.json").read_text())
    assert doc["run"]["status"] == "interrupted"
    meta = yaml.safe_load((tmp_path / "stopped" / "state" / "meta.json").read_text())
    assert meta["step"] == doc["run"]["last_step"]
    changed = run_cli(*args, "resume=true", "seed=7", cwd=tmp_path)
    assert changed.returncode == 2 and "config differs" in changed.stderr and "train.seed" in changed.stderr


def test_default_metrics_run_at_the_end_and_analyze_recomputes(tmp_path):
    aligned = [*FAST, "steps=16", "eval_every=2", "checkpoint_every=2", "metrics=backbone,alignment,switching,energy"]
    result = run_cli("run", "adamw", *aligned, "--out", "measured", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = RunDir(tmp_path / "measured")
    doc = json.loads(run.report_json.read_text())
    report.validate(doc)
    assert {k: v["status"] for k, v in doc["metrics"].items()} == dict.fromkeys(
        ["backbone", "alignment", "switching", "energy"], "ok")
    # the metric phase says what it is doing, metric by metric, and the report keeps each one's time
    assert "geobench: metric 1/4 backbone: computing" in result.stdout
    assert "geobench: metric 4/4 energy: ok in " in result.stdout
    assert all(v["seconds"] >= 0 for v in doc["metrics"].values())
    assert (run.path / "energy.csv").exists() and (run.path / "figures" / "backbone_spectrum.png").exists()
    assert "## Metric `backbone`" in run.report_md.read_text()

    again = run_cli("analyze", str(run.path), "--metric", "backbone", "backbone.scope=all", "backbone.per_block=false")
    assert again.returncode == 0, again.stderr
    assert "geobench: backbone: ok; pc1" in again.stdout
    updated = json.loads(run.report_json.read_text())
    assert updated["metrics"]["backbone"]["options"]["scope"] == "all"
    assert updated["metrics"]["backbone"]["scalars"]["dimension"] > doc["metrics"]["backbone"]["scalars"]["dimension"]
    assert updated["metrics"]["alignment"] == doc["metrics"]["alignment"]  # untouched


@pytest.mark.parametrize("args, message", [
    (["--metric", "backbone", "backbone.scop=all"], "metric 'backbone' has no option 'scop' (did you mean 'scope'?)"),
    (["--metric", "backbone", "backbone.window=[5000,6000]"], "holds 0 checkpoints"),
    (["--metric", "backbone", "backbone.scope=block:9"], "scope='block:9' matches no parameter"),
    (["--metric", "backbone", "switching.seed=1"], "names metric 'switching', which is not being computed"),
    (["--metric", "nope"], "unknown metric 'nope'"),
])
def test_analyze_bad_input(finished_run, args, message):
    where, _ = finished_run
    run = where / "runs" / "adamw-beta2=0.9"
    before = (run / "report.json").read_text()
    result = run_cli("analyze", str(run), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / "report.json").read_text() == before


def test_analyze_needs_a_run_directory(tmp_path):
    result = run_cli("analyze", str(tmp_path), "--metric", "backbone")
    assert result.returncode == 2 and "is not a geobench run directory" in result.stderr


def test_a_failing_metric_is_recorded_and_the_others_still_run(tmp_path):
    # a backbone window with two checkpoints, which only the metric itself can tell (too few in the whole
    # run is refused before training); switching's window holds one evaluation: a result with no signal
    result = run_cli("run", "adamw", *FAST, "metrics=switching,backbone", "backbone.window=[1,5]",
                     "switching.window=[1,5]", "--out", "partly", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # as analyze: the report is written, a metric failed
    assert "geobench: metrics failed: backbone (see the report)" in result.stdout
    doc = json.loads((tmp_path / "partly" / "report.json").read_text())
    assert doc["metrics"]["backbone"]["status"] == "failed"
    assert "holds 2 checkpoints" in doc["metrics"]["backbone"]["error"]
    switching = doc["metrics"]["switching"]
    assert switching["status"] == "ok" and switching["no_signal"].startswith("no switching to detect: 1 evaluation")


def test_report_places_published_series_beside_a_run(finished_run, tmp_path):
    where, _ = finished_run
    run = where / "runs" / "adamw-beta2=0.9"
    result = run_cli("report", str(run), "--published", "mini_gpt-s42", "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    jsonschema.validate(doc, report.load_schema("comparison"))
    assert [r["label"] for r in doc["runs"]] == ["adamw-beta2=0.9"]
    (ref,) = doc["references"]
    assert ref["name"] == "mini_gpt-s42" and ref["pc1_top10"] == pytest.approx(0.71432209151769)
    assert ref["switching"]["pairs"][0] == [1800, 2000]
    assert {"figures/p_ood_all.png", "figures/val_loss_all.png"} <= set(doc["figures"])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Published reference series" in text and "## How each column was computed" in text


def test_report_of_the_published_side_alone(tmp_path):
    result = run_cli("report", "--published", "mini_gpt-s42", "--out", "pub", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "pub" / "comparison.json").read_text())
    jsonschema.validate(doc, report.load_schema("comparison"))
    assert doc["runs"] == [] and len(doc["references"]) == 1
    switching = doc["references"][0]["switching"]
    assert all(isinstance(s, int) for s in switching["peaks"] + switching["troughs"])
    assert switching["peaks"][:3] == [1800, 2400, 2800] and switching["troughs"][:3] == [2000, 2600, 3200]
    for bad, message in ((["--published", "mini_gpt-s7"], "unknown published series 'mini_gpt-s7'"),
                         ([], "name runs or suites to compare, or --published series")):
        refused = run_cli("report", *bad, "--out", "nothing", cwd=tmp_path)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
        assert not (tmp_path / "nothing").exists()
