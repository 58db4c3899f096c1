"""The contract for bad, damaged and interrupted input: a valid input is accepted and reproducible;
an invalid one is one line, exit code 2, and nothing written; a resumed run is the uninterrupted
run, or a refusal in one line. Property-based where the input space is large (configs, suite
files, manifests, YAML), with filesystem faults injected where this machine cannot make them."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAST
from geobench import analysis, cli, config, hookimpl, shared_direction, suites
from geobench import registry as plugin_registry
from geobench.api import UsageError, params
from geobench.registry import installed, make_registry
from geobench.rundir import RunDir

FIELDS = config.declared_fields()
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("geobench: error: ") and "Traceback" not in text


def refused(capsys, argv: list[str], out: Path) -> str:
    """Run the command line in this process; assert exit 2, one line on stderr and no `out`."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert one_line(captured.err), captured.err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    return captured.err


# --- configs -------------------------------------------------------------------------------------

def _valid_value(spec: params.Param) -> st.SearchStrategy:
    if spec.choices is not None:
        return st.sampled_from(spec.choices)
    kind = spec.value_type
    if kind is bool:
        return st.booleans()
    if kind is int:
        low = int(spec.low) if spec.low is not None else -5
        high = int(spec.high) if spec.high is not None else low + 1000
        return st.integers(low, min(high, low + 1000))
    if kind is float:
        low = spec.low if spec.low is not None else -10.0
        high = spec.high if spec.high is not None else low + 10.0
        return st.floats(low, high, exclude_min=spec.low_open, exclude_max=spec.high_open, allow_nan=False)
    return st.nothing()


def _invalid_values(spec: params.Param) -> list:
    """Values the declaration refuses, generated from the constraint itself."""
    values: list = ["abc", "[1, 2", "{a: 1}"] if spec.value_type in (int, float, bool) else []
    if spec.value_type in (int, float) and spec.low is not None:
        values.append(spec.low - 1)
    if spec.value_type in (int, float) and spec.high is not None:
        values.append(spec.high * 10 + 1)
    if spec.value_type is int:
        values.append(2.5)
    if spec.choices is not None:
        values.append("not-a-choice")
    return values


KEYS = sorted(k for k, s in FIELDS.items() if s.value_type in (int, float, bool) or s.choices is not None)
REFUSABLE = [k for k in KEYS if _invalid_values(FIELDS[k]) and k not in ("preset", "model.family")]


@st.composite
def config_pairs(draw, valid: bool) -> dict:
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True))
    pairs = {key: draw(_valid_value(FIELDS[key])) for key in keys if key not in ("preset", "model.family")}
    if not valid:
        bad = draw(st.sampled_from(REFUSABLE))
        pairs[bad] = draw(st.sampled_from(_invalid_values(FIELDS[bad])))
    return {k: str(v) for k, v in pairs.items()}


@EXAMPLES
@given(config_pairs(valid=True))
def test_a_valid_config_is_accepted_and_resolves_the_same_every_time(pairs):
    try:
        first = config.resolve("adamw", pairs, None, installed(), "tiny")
    except UsageError as exc:  # a combination may be inconsistent (n_head not dividing d_model, ...)
        assert "\n" not in str(exc)
        return
    again = config.resolve("adamw", pairs, None, installed(), "tiny")
    assert first == again
    assert config.build(yaml.safe_load(config.save(first)), installed()) == first  # what a run directory keeps


@EXAMPLES
@given(config_pairs(valid=False))
def test_an_invalid_config_value_is_one_line_naming_the_key(pairs):
    with pytest.raises(UsageError) as raised:
        config.resolve("adamw", pairs, None, installed(), "tiny")
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_pairs(valid=False))
def test_an_invalid_run_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, pairs):
    out = tmp_path / f"out{abs(hash(json.dumps(pairs, sort_keys=True)))}"
    refused(capsys, ["run", "adamw", "preset=tiny", *[f"{k}={v}" for k, v in pairs.items()], "--out", str(out)], out)


@pytest.mark.parametrize("pair, message", [
    ("seed=-1", "train.seed='-1' is out of range"),
    ("steps=99999999999999999999999999999", "train.steps="),
    ("codeword_seed=4294967296", "probe.codeword_seed="),
    ("lambda=[[0,.inf]]", "finite lambda"),
    ("checkpoint_window=[1000,2000,50]", "after the last step train.steps=500"),
    ("metrics=[fisher]", "it needs at least 3 checkpoints, and the schedule writes 2"),
])
def test_what_is_known_before_training_is_refused_before_anything_is_written(tmp_path, capsys, pair, message):
    out = tmp_path / "run"
    extra = ["steps=20"] if pair.startswith("metrics") else []
    assert message in refused(capsys, ["run", "adamw", "preset=tiny", *extra, pair, "--out", str(out)], out)


# --- YAML ----------------------------------------------------------------------------------------

@EXAMPLES
@given(st.lists(st.sampled_from(["steps", "seed", "warmup", "train"]), min_size=2, max_size=5))
def test_a_repeated_yaml_key_is_refused_with_its_line(keys):
    text = "".join(f"{k}: {i}\n" for i, k in enumerate(keys))
    if len(set(keys)) == len(keys):
        assert params.load_yaml(text) == {k: i for i, k in enumerate(keys)}
        return
    with pytest.raises(UsageError, match="duplicate key") as raised:
        params.parse_yaml_text(text, "config file 'x.yaml'")
    assert "at line" in str(raised.value)


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    rows += [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcde", "bcdef")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\ntrain:\n  lambda_schedule: *f\n")
    err = refused(capsys, ["run", "adamw", "--config", str(bomb), "--out", str(tmp_path / "out")], tmp_path / "out")
    assert "expands to more than" in err and len(err) < 300


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(UsageError) as raised:
        config.resolve("adamw", {"steps": "x" * 10_000}, None, installed(), "tiny")
    assert len(str(raised.value)) < 200 and "10,002 characters" in str(raised.value)


# --- output paths and filesystem faults -----------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "f").write_text("x") and d / "f", "is a file, not a directory"),
    (lambda d: (d / "f").write_text("x") and d / "f" / "sub", "which is not a directory"),
    (lambda d: os.symlink(d / "nowhere", d / "link") or d / "link", "is a broken symbolic link"),
])
def test_an_output_path_that_cannot_be_a_directory_is_one_line(tmp_path, capsys, make, message):
    out = make(tmp_path)
    code = cli.main(["run", "adamw", *FAST, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and message in err, err


def test_an_empty_out_is_refused(capsys, tmp_path):
    assert "--out must name a path" in refused(capsys, ["run", "adamw", *FAST, "--out", ""], tmp_path / "none")


def test_a_directory_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # read-only parent (root ignores the mode bits)
    err = refused(capsys, ["run", "adamw", *FAST, "--out", str(tmp_path / "ro" / "run")], tmp_path / "ro")
    assert "Permission denied" in err


@pytest.mark.parametrize("fail_at", [1, 4, 9])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch, fail_at):
    calls = []
    real_fsync = os.fsync

    def fsync(fd):  # the n-th synced write finds the disk full
        calls.append(fd)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    code = cli.main(["run", "adamw", *FAST, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err
    assert "Traceback" not in err and err.count("geobench: error") == 1
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name == "state.new"]


# --- damaged run directories ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("guarantees") / "run"
    assert cli.main(["run", "adamw", *FAST, "metrics=[backbone]", "backbone.per_block=false", "--out", str(where)]) == 0
    return RunDir(where)


def copy_of(run: RunDir, tmp_path: Path) -> RunDir:
    import shutil

    shutil.copytree(run.path, tmp_path / "copy")
    return RunDir(tmp_path / "copy")


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.config.write_text("train: [unclosed\n"), "malformed YAML in run configuration"),
    (lambda r: r.report_json.write_text(r.report_json.read_text()[:50]), "is not valid JSON"),
    (lambda r: (r.checkpoints / "index.json").write_text("{"), "checkpoint index"),
    (lambda r: r.evals.write_text("{}\n" + r.evals.read_text()), "line 1 is not an evaluation record"),
])
def test_a_damaged_run_directory_is_one_line_naming_the_file(small_run, tmp_path, capsys, damage, message):
    run = copy_of(small_run, tmp_path)
    damage(run)
    before = run.report_json.read_text()
    assert cli.main(["analyze", str(run.path), "--metric", "backbone", "backbone.per_block=false"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and message in err, err
    assert run.report_json.read_text() == before


def test_a_non_finite_checkpoint_is_named(small_run, tmp_path, capsys):
    run = copy_of(small_run, tmp_path)
    step = run.checkpoint_steps()[1]
    weights = {k: v.clone() for k, v in run.load_checkpoint(step).items()}
    next(iter(weights.values()))[0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, run.checkpoint_path(step))
    assert cli.main(["analyze", str(run.path), "--metric", "backbone", "backbone.per_block=false"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and f"step_{step:06d}.safetensors" in err and "non-finite" in err


def test_a_torn_last_evaluation_line_is_left_out(small_run, tmp_path):
    run = copy_of(small_run, tmp_path)
    records = run.read_evals()
    run.evals.write_text(run.evals.read_text() + '{"step": 99, "val_lo')
    assert run.read_evals() == records


def test_a_failed_analysis_keeps_the_earlier_result(small_run, tmp_path, capsys, monkeypatch):
    run = copy_of(small_run, tmp_path)
    earlier = json.loads(run.report_json.read_text())["metrics"]["backbone"]
    assert earlier["status"] == "ok"

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the metric")

    monkeypatch.setattr(analysis, "pca", broken)  # the trajectory PCA every backbone measurement starts from
    assert cli.main(["analyze", str(run.path), "--metric", "backbone", "backbone.per_block=false"]) == 1
    out = capsys.readouterr().out
    assert "backbone: failed (RuntimeError: a bug in the metric); the report keeps its earlier result" in out
    assert json.loads(run.report_json.read_text())["metrics"]["backbone"] == earlier


# --- resume ------------------------------------------------------------------------------------

class CtrlC:
    """Presses Ctrl-C (a real SIGINT to this process) `times` times when the hook `where` fires at `step`."""

    def __init__(self, where: str, step: int, times: int):
        self.where, self.step, self.times = where, step, times

    def _press(self, where: str, step: int) -> None:
        if (where, step) == (self.where, self.step) and self.times:
            presses, self.times = self.times, 0
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    @hookimpl
    def geobench_on_step(self, run, step, loss, lr):
        self._press("step", step)

    @hookimpl
    def geobench_on_eval(self, run, step, record):
        self._press("eval", step)


def comparable(run: RunDir) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]]]:
    evals = [dataclasses.replace(e, train_seconds=None) for e in run.read_evals()]
    return evals, {s: run.load_checkpoint(s) for s in run.checkpoint_steps()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    where = tmp_path_factory.mktemp("whole") / "run"
    assert cli.main(["run", "adamw", *FAST, "--out", str(where)]) == 0
    return comparable(RunDir(where))


@pytest.mark.parametrize("where, step, times", [
    ("step", 5, 1),   # one Ctrl-C: the state is saved at the end of step 5
    ("step", 9, 2),   # twice inside a step: no state there, the last saved one continues
    ("eval", 1, 2),   # twice inside the step-1 evaluation's writes: Θ₀ and the baseline are redone
    ("eval", 6, 2),   # twice after the step-6 evaluation, before its checkpoint
])
def test_a_resumed_run_is_the_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, where, step, times):
    out = tmp_path / "run"
    monkeypatch.setattr(plugin_registry, "installed", lambda: make_registry((CtrlC(where, step, times),)))
    assert cli.main(["run", "adamw", *FAST, "--out", str(out)]) == 130
    monkeypatch.setattr(plugin_registry, "installed", installed)
    assert cli.main(["run", "adamw", *FAST, "resume=true", "--out", str(out)]) == 0
    evals, checkpoints = comparable(RunDir(out))
    whole_evals, whole_checkpoints = uninterrupted
    assert evals == whole_evals  # train_loss included
    assert checkpoints.keys() == whole_checkpoints.keys()
    for s, weights in whole_checkpoints.items():
        assert all(torch.equal(weights[n], checkpoints[s][n]) for n in weights), s


def test_resume_refuses_a_state_whose_earlier_writes_are_missing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(plugin_registry, "installed", lambda: make_registry((CtrlC("step", 9, 1),)))
    assert cli.main(["run", "adamw", *FAST, "--out", str(out)]) == 130
    monkeypatch.setattr(plugin_registry, "installed", installed)
    capsys.readouterr()
    run = RunDir(out)
    run.checkpoint_path(1).unlink()
    (run.checkpoints / "index.json").write_text(json.dumps({"steps": [s for s in run.checkpoint_steps() if s != 1]}))
    assert cli.main(["run", "adamw", *FAST, "resume=true", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "checkpoint 1" in err and "cannot resume" in err


# --- suites ----------------------------------------------------------------------------------------

LABELS = st.one_of(st.sampled_from(["a", "b", "adamw-lr=1e-3", "x.y"]),
                   st.sampled_from(["../up", "a/b", "..", ".hidden", "", "a b"]))


@st.composite
def suite_files(draw) -> dict:
    cells = [{"optimizer": "adamw", "label": draw(LABELS), "seed": draw(st.integers(0, 3))}
             for _ in range(draw(st.integers(1, 3)))]
    suite = {"name": draw(st.sampled_from(["good", "bad/name", "ok-2"])), "base": {"steps": 12, **{
        k: v for k, v in (p.split("=", 1) for p in FAST if p.startswith(("eval_every", "checkpoint_every")))}},
        "grid": cells, "metrics": ["backbone"]}
    suite["metric_options"] = draw(st.sampled_from([{}, {"backbone": {"per_block": False}}, {"backbon": {"scope": "all"}},
                                                    {"backbone": {"window": ["abc", "def"]}}, ["backbone"]]))
    return suite


def _expected_problem(suite: dict) -> str | None:
    import re

    labels = [c["label"] for c in suite["grid"]]
    if not re.fullmatch(r"[A-Za-z0-9_=,+-][A-Za-z0-9_.=,+-]*", suite["name"]):
        return "name"
    for label in labels:
        if label and not re.fullmatch(r"[A-Za-z0-9_=,+-][A-Za-z0-9_.=,+-]*", label):
            return "label"
    return None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suite_files())
def test_a_suite_file_is_checked_completely_before_a_cell_runs(tmp_path_factory, suite):
    where = tmp_path_factory.mktemp("suite")
    path = where / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    problem = _expected_problem(suite)
    labels = [c["label"] for c in suite["grid"] if c["label"]]
    clean = (problem is None and len(set(labels)) == len(labels) and len(labels) == len(suite["grid"])
             and suite["metric_options"] in ({}, {"backbone": {"per_block": False}}))
    try:
        loaded = suites.load(str(path), "tiny", {}, str(where / "out"), installed())
    except UsageError as exc:
        assert "\n" not in str(exc)
        assert not clean or len(labels) < len(suite["grid"]), exc  # generated labels may collide
        if problem and suite["metric_options"] in ({}, {"backbone": {"per_block": False}}):
            assert f"{problem} " in str(exc)
    else:
        assert clean or len(labels) < len(suite["grid"]), suite
        assert all(c.out.path.parent == where / "out" for c in loaded.cells)
        assert len({c.label for c in loaded.cells}) == len(loaded.cells)
    assert not (where / "out").exists()


# --- manifests and energy --------------------------------------------------------------------------

ITERS = st.one_of(st.integers(0, 100), st.integers(-5, -1), st.booleans(), st.floats(0, 10), st.text(max_size=3))


@EXAMPLES
@given(st.one_of(
    st.fixed_dictionaries({"optimizers": st.dictionaries(st.sampled_from(["a", "b"]), st.fixed_dictionaries(
        {"checkpoints": st.lists(st.fixed_dictionaries({"iter": ITERS, "hf_path": st.just("c")}), max_size=3)}),
        max_size=2)}),
    st.fixed_dictionaries({"optimizers": st.one_of(st.lists(st.integers()), st.integers(), st.none())}),
    st.lists(st.integers())))
def test_a_manifest_is_read_or_refused_in_one_line(tmp_path_factory, manifest):
    path = tmp_path_factory.mktemp("manifest") / "m.json"
    path.write_text(json.dumps(manifest))
    try:
        runs = shared_direction.read_manifest(path)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    for checkpoints in runs.values():
        iters = [it for it, _ in checkpoints]
        assert checkpoints and iters == sorted(set(iters)) and all(type(it) is int and it >= 0 for it in iters)
    raw = [c["iter"] for entry in manifest["optimizers"].values() for c in entry["checkpoints"]]
    assert all(not isinstance(it, bool) and isinstance(it, (int, float)) and it == int(it) >= 0 for it in raw)


def test_an_all_zero_direction_is_refused(tmp_path):
    from safetensors.torch import save_file

    from geobench.checkpoints import CheckpointReader

    save_file({"w": torch.ones(3)}, tmp_path / "origin.safetensors")
    save_file({"w": torch.full((3,), 2.0)}, tmp_path / "later.safetensors")
    origin, later = CheckpointReader(tmp_path / "origin.safetensors"), CheckpointReader(tmp_path / "later.safetensors")
    notices = []
    with pytest.raises(UsageError, match="φ̂ is zero for every one of the 1 parameters"):
        shared_direction.measure({"a": [(1, later)]}, origin, lambda name: torch.zeros(3), ["w"], notice=notices.append)
    assert notices == ["φ̂ of 'w' has norm 0; no direction: it adds nothing to E_phi"]
