"""One run on several processes (torchrun + DDP, gloo on the CPU): the same weights as one process."""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_scale import wait_for

from conftest import FAST, geobench_command, kill_every_process, run_cli, stopping_after_first_state

PAIRS = [p for p in FAST if not p.startswith("steps=")] + ["steps=60", "grad_accum=2", "batch_size=8"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what torchrun gives each process; CPU kernels round by thread count


def checkpoints(run):
    steps = json.loads((run / "checkpoints" / "index.json").read_text())["steps"]
    return {s: load_file(run / "checkpoints" / f"step_{s:06d}.safetensors") for s in steps}


def assert_identical(a, b):
    ours, theirs = checkpoints(a), checkpoints(b)
    assert list(ours) == list(theirs) and len(ours) > 3
    for step, tensors in ours.items():
        for name, tensor in tensors.items():
            assert (tensor == theirs[step][name]).all(), (step, name)


def test_two_processes_write_the_checkpoints_of_one_and_resume_after_a_kill(tmp_path):
    single = run_cli("run", "adamw", *PAIRS, "--out", "single", cwd=tmp_path, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "geobench", "run", "adamw", *PAIRS, "--out", "ddp"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert_identical(tmp_path / "single", tmp_path / "ddp")
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["environment"]["processes"] == 2 and report["run"]["status"] == "completed"
    assert [e["val_loss"] for e in report["evals"]] == [
        e["val_loss"] for e in json.loads((tmp_path / "single" / "report.json").read_text())["evals"]]

    # devices=2 launches the same; killed after its first state save, it resumes to the same weights
    launched = subprocess.Popen(geobench_command() + ["run", "adamw", *PAIRS, "devices=2", "train.device=cpu",
                                                      "--out", "launched"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **stopping_after_first_state(tmp_path)})
    wait_for((tmp_path / "launched" / "state" / "meta.json").exists, launched, "the first state save")
    kill_every_process(tmp_path)
    launched.communicate()
    resumed = run_cli("run", "adamw", *PAIRS, "devices=2", "train.device=cpu", "resume=true", "--out", "launched",
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 processes" in resumed.stdout
    assert json.loads((tmp_path / "launched" / "report.json").read_text())["run"]["resumed_from"] is not None
    assert_identical(tmp_path / "single", tmp_path / "launched")


@pytest.mark.parametrize("pairs, message", [
    (["devices=2"], "devices=2 but 0 GPUs are visible"),
    (["devices=0"], "devices='0' is out of range"),
    (["devices=2", "train.device=cpu", "grad_accum=3"], "grad_accum=3 is not divisible by the 2 processes"),
])
def test_bad_process_counts_are_one_line_and_nothing_runs(tmp_path, pairs, message):
    result = run_cli("run", "adamw", *FAST, *pairs, "--out", "out", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_optimizer_with_its_own_gradient_rule_is_refused_under_ddp(tmp_path):
    result = run_cli("run", "ep", *FAST, "devices=2", "train.device=cpu", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and "brings its own gradient rule" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_data_source_is_one_line_before_any_process_starts(tmp_path):
    result = run_cli("run", "adamw", *PAIRS, "devices=2", "train.device=cpu", "data=no/such/folder", "--out", "out",
                     cwd=tmp_path)
    assert result.returncode == 2 and "data path 'no/such/folder' does not exist" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "processes" not in result.stdout


def test_ctrl_c_stops_every_process_with_one_line_and_exit_130(tmp_path):
    # a terminal's Ctrl-C goes to the whole foreground process group: here, the launcher's
    command = geobench_command() + ["run", "adamw", *PAIRS, "steps=1000000", "devices=2", "train.device=cpu",
                                    "--out", "run"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for((tmp_path / "run" / "state" / "meta.json").exists, launcher, "the first state save")
    os.killpg(launcher.pid, signal.SIGINT)
    stdout, stderr = launcher.communicate(timeout=300)
    said = "\n".join(line for line in (stdout + stderr).replace("\r", "\n").splitlines() if "step/s" not in line)
    assert launcher.returncode == 130, said
    assert "Traceback" not in said and said.count("geobench: interrupted") == 2, said  # during step N; the summary
    assert json.loads((tmp_path / "run" / "report.json").read_text())["run"]["status"] == "interrupted"
