"""Scale-out: one writer per run directory, suite executors (local processes, Slurm through
submitit's real submission code, Ray in tests/test_ray.py), and their bad input."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import FAST, geobench_command, kill_every_process, paused_process, run_cli, stopping_after_first_state
from geobench import executors, suites
from geobench.api import UsageError
from geobench.documents import CellOutcome
from geobench.registry import installed
from geobench.rundir import lock_holder, writer_lock

CELL_BASE = dict(pair.split("=", 1) for pair in FAST if not pair.startswith("metrics")) | {"eval_every": 4}


def write_suite(tmp_path, steps=12, **changes):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "pair", "base": CELL_BASE | {"steps": steps},
                                    "grid": {"optimizer": ["adamw", "sgd"]}, "metrics": [], **changes}))
    return path


def wait_for(predicate, process=None, what=""):
    """Wait for an event (a file appearing), failing at once if the process it depends on ended."""
    while not predicate():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the process ended before {what}: {err[-2000:]}")
        time.sleep(0.05)


def steps_of(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_second_writer_of_a_run_directory_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    first = subprocess.Popen(geobench_command() + ["run", "adamw", *FAST, "steps=200", "--out", "dual"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **stopping_after_first_state(tmp_path)})
    evals = tmp_path / "dual" / "evals.jsonl"
    wait_for((tmp_path / "dual" / "state" / "meta.json").exists, first, "its first state save")
    try:  # it stopped itself there, holding the lock, and cannot finish while the second tries
        before = evals.read_text()
        second = run_cli("run", "adamw", *FAST, "steps=200", "resume=true", "--out", "dual", cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"is being written by geobench run (host {os.uname().nodename}, pid {first.pid})" in second.stderr
        assert evals.read_text() == before
        analyze = run_cli("analyze", "dual", "--metric", "backbone", cwd=tmp_path)
        assert analyze.returncode == 2
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert lock_holder(tmp_path / "dual") is None  # the kernel released it with the process
    resumed = run_cli("run", "adamw", *FAST, "steps=200", "resume=true", "--out", "dual", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    steps = steps_of(evals)
    assert steps == sorted(set(steps)) and steps[-1] == 200


def test_the_lock_names_its_holder_and_a_refused_writer_changes_nothing(tmp_path):
    with writer_lock(tmp_path / "held", "test holder"):
        assert "geobench test holder" in lock_holder(tmp_path / "held")
        with pytest.raises(UsageError, match="is being written by geobench test holder"):
            with writer_lock(tmp_path / "held", "second"):
                pass  # pragma: no cover
        result = run_cli("run", "adamw", *FAST, "--out", "held", cwd=tmp_path)
        assert result.returncode == 2 and "is being written by" in result.stderr
        assert [p.name for p in (tmp_path / "held").iterdir()] == [".lock"]
    assert lock_holder(tmp_path / "held") is None
    with pytest.raises(UsageError):
        with writer_lock(tmp_path / "fresh", "failing"):
            raise UsageError("bad input found after the lock")
    assert not (tmp_path / "fresh").exists()  # nothing half-written


def test_a_suite_through_local_processes_survives_a_kill_and_completes_when_run_again(tmp_path):
    suite = write_suite(tmp_path, steps=60, base=CELL_BASE | {"steps": 60, "state_every": 4})
    command = geobench_command() + ["bench", str(suite), "scale=tiny", "executor=local", "--out", "out"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **stopping_after_first_state(tmp_path)})
    state = tmp_path / "out" / "adamw" / "state" / "meta.json"
    wait_for(state.exists, first, "the first cell saved its state")
    kill_every_process(tmp_path)  # the submitter and its cell processes, as a lost node would
    first.communicate()
    status = run_cli("bench", str(suite), "scale=tiny", "--out", "out", "status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()}
    assert states["adamw"] == "interrupted" and states["sgd"] in ("interrupted", "pending"), states

    again = run_cli("bench", str(suite), "scale=tiny", "executor=local", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "adamw: completed" in again.stdout and "sgd: completed" in again.stdout
    report = json.loads((tmp_path / "out" / "adamw" / "report.json").read_text())
    assert report["run"]["resumed_from"] is not None  # continued from the state the killed cell left
    log = (tmp_path / "out" / "logs" / "adamw.log").read_text()
    assert "geobench: completed" in log
    index = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [c["outcome"]["state"] for c in index["cells"]] == ["completed", "completed"]
    assert (tmp_path / "out" / "comparison.md").exists()
    status = run_cli("bench", str(suite), "scale=tiny", "--out", "out", "status", cwd=tmp_path)
    assert [line.split()[1] for line in status.stdout.splitlines()] == ["completed", "completed"]


def test_a_cell_that_cannot_see_the_suite_directory_fails_with_a_clear_line(tmp_path):
    suite = suites.load(str(write_suite(tmp_path)), "tiny", {}, str(tmp_path / "out"), installed())
    job = suites.jobs(suite)[0]
    with pytest.raises(RuntimeError, match="is not visible on host .*: a suite directory must be on a filesystem"):
        executors.run_cell(job)


SLURM = {"executor": {"name": "slurm", "timeout_min": 90, "partition": "gpu", "gpus_per_node": 1,
                      "cpus_per_task": 4, "mem_gb": 32, "array_parallelism": 2,
                      "setup": ["module load cuda"], "sbatch": {"qos": "high"}}}


def test_slurm_options_map_to_submitit_parameters(tmp_path):
    chosen = executors.settings(SLURM["executor"], {"executor.sbatch.account": "lab"}, False)
    assert executors.slurm_parameters(chosen.options, "geobench-x") == {
        "name": "geobench-x", "timeout_min": 90, "gpus_per_node": 1, "cpus_per_task": 4, "tasks_per_node": 1,
        "nodes": 1, "mem_gb": 32.0, "slurm_partition": "gpu", "slurm_array_parallelism": 2,
        "slurm_setup": ["module load cuda"], "slurm_additional_parameters": {"qos": "high", "account": "lab"}}
    assert yaml.safe_load("t: 10:30")["t"] == 630  # what plain YAML 1.1 makes of a time; geobench refuses it
    with pytest.raises(UsageError, match="is ambiguous"):
        suites.load(str(write_suite(tmp_path, executor={"name": "slurm"})), "tiny",
                    {"executor.timeout_min": "10:30"}, str(tmp_path / "o"), installed())
    text = write_suite(tmp_path).read_text() + "executor: {name: slurm, timeout_min: 10:30}\n"
    (tmp_path / "sexagesimal.yaml").write_text(text)
    with pytest.raises(UsageError, match="timeout_min='10:30' is ambiguous"):
        suites.load(str(tmp_path / "sexagesimal.yaml"), "tiny", {}, str(tmp_path / "o"), installed())


def test_a_slurm_submission_is_one_job_array_through_submitits_real_sbatch_code(tmp_path):
    fake = tmp_path / "bin" / "sbatch"  # records the submission, answers like Slurm
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, shutil
        shutil.copy(sys.argv[-1], {str(tmp_path / 'submitted.sh')!r})
        print("Submitted batch job 4242")
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (fake.parent / "srun").symlink_to(fake)  # submitit checks that srun exists; a cell never runs here
    suite = write_suite(tmp_path, **SLURM)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    result = run_cli("bench", str(suite), "scale=tiny", "--out", "out", "--no-wait", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    sbatch = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --time=90", "#SBATCH --partition=gpu", "#SBATCH --qos=high",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=32GB", "module load cuda"):
        assert line in sbatch, line
    records = json.loads((tmp_path / "out" / "submitted.json").read_text())
    assert {label: r["job_id"] for label, r in records.items()} == {"adamw": "4242_0", "sgd": "4242_1"}
    assert not (tmp_path / "out" / "adamw").exists()  # nothing trained here


def test_the_slurm_path_runs_cells_through_submitits_debug_executor(tmp_path):
    suite = suites.load(str(write_suite(tmp_path, **SLURM)), "tiny", {}, str(tmp_path / "out"), installed())
    statuses = suites.run(suite, cluster="debug")
    assert statuses == {"adamw": CellOutcome("completed"), "sgd": CellOutcome("completed")}
    assert (tmp_path / "out" / "comparison.md").exists()


@pytest.mark.parametrize("pairs, message", [
    (["executor=slurmm"], "executor='slurmm' is not known (did you mean 'slurm'?); allowed: inline, local, slurm, ray"),
    (["executor=slurm", "executor.timeout_min=30", "executor.partiton=gpu"],
     "executor 'slurm' has no option 'partiton' (did you mean 'partition'?)"),
    (["executor=slurm"], "executor=slurm needs executor.timeout_min"),
    (["executor=slurm", "executor.timeout_min=0"], "executor.timeout_min='0' is out of range"),
    (["executor=local", "executor.timeout_min=10:30"], "is ambiguous"),
    (["executor=inline", "--no-wait"], "--no-wait needs an engine whose jobs outlive this process"),
    (["executor=slurm", "executor.timeout_min=5"], "there is no sbatch command on this machine"),
    (["fail_fast=maybe"], "fail_fast='maybe' is not a valid bool"),
])
def test_bad_executor_input_is_one_line_exit_2_and_nothing_written(tmp_path, pairs, message):
    result = run_cli("bench", str(write_suite(tmp_path)), "scale=tiny", "--out", "out", *pairs, cwd=tmp_path,
                     env={"PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_unreachable_ray_address_fails_within_seconds(tmp_path):
    pytest.importorskip("ray", reason='Ray is an extra: pip install "geobench[ray]" (tox -e ray)')
    start = time.monotonic()
    result = run_cli("bench", str(write_suite(tmp_path)), "scale=tiny", "--out", "out", "executor=ray",
                     "executor.address=127.0.0.1:9", cwd=tmp_path)
    assert result.returncode == 2 and "no Ray cluster answers there" in result.stderr, result.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_a_failing_cell_stops_the_others_only_with_fail_fast(tmp_path, executor):
    def prepared(fail_fast):
        out = tmp_path / f"{executor}-{fail_fast}"
        suite = suites.load(str(write_suite(tmp_path)), "tiny", {"executor": executor, "fail_fast": str(fail_fast)},
                            str(out), installed())
        out.mkdir()
        (out / "adamw").write_text("a file where the first cell's run directory belongs")  # fails at run time
        return suite

    statuses = suites.run(prepared(True))
    assert list(statuses) == ["adamw"] and statuses["adamw"].state == "failed"
    statuses = suites.run(prepared(False))
    assert statuses["adamw"].state == "failed" and statuses["sgd"] == CellOutcome("completed")


def test_a_timed_out_or_preempted_cell_is_requeued_and_resumes_from_its_state(tmp_path, monkeypatch):
    import submitit

    for key, value in stopping_after_first_state(tmp_path).items():
        monkeypatch.setenv(key, value)  # the cell's process inherits it
    suite = suites.load(str(write_suite(tmp_path, steps=60, base=CELL_BASE | {"steps": 60, "state_every": 4})),
                        "tiny", {}, str(tmp_path / "out"), installed())
    job = suites.jobs(suite)[0]
    executor = submitit.LocalExecutor(folder=tmp_path / "out" / "submitit")
    executor.update_parameters(timeout_min=60)
    handle = executor.submit(executors.CellTask(), job)
    wait_for((tmp_path / "out" / "adamw" / "state" / "meta.json").exists, what="the cell saved its state")
    cell = paused_process(tmp_path)
    os.kill(cell, signal.SIGUSR2)  # what Slurm sends a task before its time limit or a preemption
    os.kill(cell, signal.SIGCONT)
    assert handle.result() == CellOutcome("completed")  # requeued by submitit, the new process continued the run
    report = json.loads((tmp_path / "out" / "adamw" / "report.json").read_text())
    assert report["run"]["resumed_from"] is not None
    assert steps_of(tmp_path / "out" / "adamw" / "evals.jsonl") == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44,
                                                                     48, 52, 56, 60]
