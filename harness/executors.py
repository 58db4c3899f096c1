"""Where a suite's cells run: in this process (`inline`), each in a process of its own on this
machine (`local`, submitit's LocalExecutor), as one Slurm job array (`slurm`, submitit), or as Ray
tasks (`ray`). The engines schedule; geobench only hands them cells.

A cell is one run, described completely by a `CellJob` (its resolved config, its run directory and
its metric options) and executed by `run_cell` wherever the engine puts it. The run directory is
the only hand-off: a cell that is requeued, re-submitted or re-run continues from the training
state found there, and its writer lock (trajectory.writer_lock) keeps a second copy of the same
cell from writing beside it. The suite directory must therefore be on a filesystem every worker
sees; a worker that cannot see it fails the cell with a line that says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable

from geobench import formatting
from geobench.api import Config, Param, UsageError, did_you_mean
from geobench.documents import CellOutcome
from geobench.files import atomic_write_json, atomic_write_text, read_json
from geobench.registry import Registry
from geobench.rundir import RunDir, lock_holder
from geobench.runner import MetricPlan

A_WEEK = 7 * 24 * 60

OPTIONS: dict[str, dict[str, Param]] = {
    "inline": {},
    "local": {
        "timeout_min": Param(A_WEEK, "minutes a cell may run before it is stopped (and requeued from its state)",
                             kind=int, low=1),
        "parallel": Param(0, "cells at once; 0: one per visible GPU, or 1 without a GPU", kind=int, low=0),
    },
    "slurm": {
        "timeout_min": Param(None, "REQUIRED: whole minutes per cell (sbatch --time); a timed-out cell is requeued "
                                   "and resumes from its state", kind=int, low=1),
        "gpus_per_node": Param(1, "GPUs per cell", kind=int, low=0),
        "cpus_per_task": Param(8, "CPU cores per cell", kind=int, low=1),
        "mem_gb": Param(0.0, "memory per cell in GB; 0: the partition's default", kind=float, low=0),
        "partition": Param("", "Slurm partition; empty: the cluster's default", kind=str),
        "array_parallelism": Param(256, "cells of the job array running at once", kind=int, low=1),
        "setup": Param([], "shell lines run before each cell (module load ..., source venv/bin/activate)", kind=list),
        "sbatch": Param({}, "other sbatch options, passed through: sbatch.qos=high, sbatch.account=lab", kind=dict),
    },
    "ray": {
        "address": Param("", "an existing Ray cluster (host:port, ray://host:port or auto); empty: a local Ray",
                         kind=str),
        "cpus_per_task": Param(1, "CPU cores Ray reserves per cell", kind=int, low=1),
    },
}
WAITS_DETACHED = ("slurm",)  # engines whose jobs outlive the submitting process (--no-wait)
SLURM_NOT_DONE = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
                  "COMPLETING")


@dataclasses.dataclass(frozen=True)
class Settings:
    name: str = "inline"
    options: dict = dataclasses.field(default_factory=dict)
    fail_fast: bool = False


def settings(from_suite: Any, pairs: dict[str, str], fail_fast: Any) -> Settings:
    """The executor and its validated options: the suite file's `executor:` (a name, or a mapping
    with `name` and options) below the command line's `executor=NAME` and `executor.OPTION=value`."""
    suite_name, suite_options = "inline", {}
    if isinstance(from_suite, str):
        suite_name = from_suite
    elif isinstance(from_suite, dict):
        suite_options = dict(from_suite)
        suite_name = str(suite_options.pop("name", "inline"))
    elif from_suite is not None:
        raise UsageError(f"executor: {from_suite!r} must be a name or a mapping with a name and options")
    name = pairs.pop("executor", suite_name)
    if name not in OPTIONS:
        raise UsageError(f"executor={name!r} is not known{did_you_mean(name, OPTIONS)}; allowed: {', '.join(OPTIONS)}")
    raw = suite_options if name == suite_name else {}
    for key in [k for k in pairs if k.startswith("executor.")]:
        option, value = key.removeprefix("executor."), pairs.pop(key)
        if option.startswith("sbatch."):
            raw.setdefault("sbatch", {})[option.removeprefix("sbatch.")] = value
        else:
            raw[option] = value
    declared = OPTIONS[name]
    options = {}
    for option, value in raw.items():
        if option not in declared:
            allowed = ", ".join(declared) or "none"
            raise UsageError(f"executor {name!r} has no option {option!r}{did_you_mean(option, declared)}; "
                             f"allowed: {allowed}")
        options[option] = _check_option(name, option, value, declared[option])
    for option, param in declared.items():
        if option not in options:
            if param.default is None:
                raise UsageError(f"executor={name} needs executor.{option}: {param.help}")
            options[option] = copy.deepcopy(param.default)
    if name == "ray":
        if importlib.util.find_spec("ray") is None:
            raise UsageError('executor=ray needs Ray, which is not installed: pip install "geobench[ray]"')
        _reachable(options["address"])
    return Settings(name, options, bool(Param(False).check("fail_fast", fail_fast)))


def _check_option(executor: str, option: str, value: Any, param: Param) -> Any:
    key = f"executor.{option}"
    if option == "timeout_min" and isinstance(value, str) and ":" in value:
        raise UsageError(f"{key}={value!r} is ambiguous (Slurm reads MM:SS, people read HH:MM): give whole "
                         f"minutes, e.g. {key}=90")
    if param.kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"{key}={value!r} must be a mapping of option names to values")
        bad = [k for k in value if not k.replace("_", "-").replace("-", "").isalnum()]
        if bad:
            raise UsageError(f"{key} has a malformed option name {bad[0]!r}")
        return {k.replace("-", "_"): v for k, v in value.items()}
    if param.kind is list and isinstance(value, str):
        return [value]
    return param.check(key, value)


@dataclasses.dataclass(frozen=True)
class CellJob:
    """One cell, everything a worker needs to run it."""

    label: str
    suite_dir: str  # absolute
    run_dir: str  # absolute
    cfg: Config
    plan: MetricPlan
    preset_reason: str
    threads: int = 0  # torch's CPU threads for the cell; 0: torch's default (all cores)

    @property
    def log(self) -> Path:
        return Path(self.suite_dir) / "logs" / f"{self.label}.log"

    @property
    def error(self) -> Path:
        return Path(self.suite_dir) / "logs" / f"{self.label}.error"


def run_cell(job: CellJob, *, reg: Registry | None = None, to_log: bool = True) -> CellOutcome:
    """Run one cell (in a worker, or inline); returns how it ended. Continues from the state in the
    run directory when there is one. A failure is also written beside the cell's log, so that
    `geobench bench … status` can show it whatever ran the cell. `reg` is the suite's registry
    when the cell runs in the suite's process; a worker elsewhere has the installed plugins."""
    import torch

    from geobench import registry, runner

    if not Path(job.suite_dir).is_dir():
        raise RuntimeError(f"suite directory {job.suite_dir!r} is not visible on host {socket.gethostname()}: "
                           "a suite directory must be on a filesystem every worker shares")
    job.error.parent.mkdir(parents=True, exist_ok=True)
    job.error.unlink(missing_ok=True)
    with _output_to(job.log) if to_log else contextlib.nullcontext():
        try:
            if job.threads:
                torch.set_num_threads(job.threads)
            reg = reg or registry.installed()
            out = RunDir(job.run_dir)
            with out.lock("suite cell"):
                cfg = copy.deepcopy(job.cfg)
                cfg.train.resume = not out.is_empty()
                runner.check(cfg, out, reg)  # the run directory, as this worker finds it
                doc = runner.execute(cfg, out, reg, job.preset_reason, job.plan)
            if doc is None:
                raise RuntimeError("the cell's run wrote no report")
            return CellOutcome(doc.run.status, f"at step {doc.run.diverged_at}" if doc.run.diverged_at else "")
        except BaseException as exc:
            atomic_write_text(job.error, f"{type(exc).__name__}: {exc}".splitlines()[0] + "\n")
            raise


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    with open(path, "a", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def cell_state(job: CellJob) -> CellOutcome:
    """Where a cell stands, read from its run directory, its lock, its error file and the engine's
    record of the submission: finished (completed, diverged), running, queued, failed, interrupted
    (it started and stopped; it continues from its state) or pending (it never started)."""
    out = RunDir(job.run_dir)
    if out.report_json.exists():
        report = out.read_report()
        run = getattr(report, "run", None)
        if run is not None and run.status != "interrupted":
            return CellOutcome(run.status, f"at step {run.diverged_at}" if run.diverged_at else "")
    holder = lock_holder(out.path)
    if holder is not None:
        return CellOutcome("running", holder)
    if job.error.exists():
        return CellOutcome("failed", f"{job.error.read_text().strip()} (log {job.log})")
    queued = _queued(job)
    if queued:
        return CellOutcome("queued", queued)
    if out.path.is_dir() and not out.is_empty():  # it started: a killed or interrupted cell
        return CellOutcome("interrupted", f"continues from its state when the suite runs again (log {job.log})")
    return CellOutcome("pending")


def _submissions(suite_dir: str) -> Path:
    return Path(suite_dir) / "submitted.json"


def _queued(job: CellJob) -> str:
    """A Slurm job of this cell that is waiting or starting (not yet holding the cell's lock)."""
    record = _read_json(_submissions(job.suite_dir)).get(job.label)
    if not record or record["executor"] != "slurm":
        return ""
    state = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"]).state
    return f"Slurm job {record['job_id']} {state}" if state in SLURM_NOT_DONE else ""


def _read_json(path: Path) -> dict:
    return read_json(path, "suite record") if path.exists() else {}


def check_no_wait(chosen: Settings) -> None:
    if chosen.name not in WAITS_DETACHED:
        raise UsageError(f"--no-wait needs an engine whose jobs outlive this process ({', '.join(WAITS_DETACHED)}); "
                         f"executor={chosen.name} runs the cells only while geobench waits for them")


def execute(jobs: list[CellJob], chosen: Settings, *, reg: Registry, wait: bool, say: Callable[[str], None],
            cluster: str = "slurm") -> dict[str, CellOutcome]:
    """Run (or submit) `jobs` with the chosen executor; returns {label: status} of the cells that
    finished while this process watched ("submitted" for those it only handed over). `cluster` is
    submitit's cluster for executor=slurm ("debug" runs the same submission in this process).
    `reg` reaches the cells run in this process (inline); workers elsewhere load the installed
    plugins."""
    if not jobs:
        return {}
    if chosen.name == "inline":
        return _inline(jobs, chosen, reg=reg, say=say)
    run = {"local": _local, "slurm": _slurm, "ray": _ray}[chosen.name]
    return run(jobs, chosen, wait=wait, say=say, cluster=cluster)


def _outcome(job: CellJob, value: Any, error: BaseException | None) -> CellOutcome:
    if error is None:
        return value
    line = job.error.read_text().strip() if job.error.exists() else f"{type(error).__name__}: {error}".splitlines()[0]
    return CellOutcome("failed", f"{line} (log {job.log})")


def _settle(statuses: dict[str, CellOutcome], job: CellJob, outcome: CellOutcome, chosen: Settings,
            say: Callable[[str], None], others: Sequence[tuple[CellJob, Callable[[], Any]]], took: str = "") -> bool:
    """Record how `job` ended; with fail_fast and a failure, cancel the `others` still running or
    waiting (each recorded as cancelled) and return True: the suite stops."""
    statuses[job.label] = outcome
    say(f"{job.label}: {outcome}{took}")
    if not (chosen.fail_fast and outcome.state == "failed"):
        return False
    for other, cancel in others:
        cancel()
        statuses[other.label] = CellOutcome("cancelled", "fail_fast")
    return True


def _numbered(say: Callable[[str], None], prefix: str, line: str) -> None:
    say(f"{prefix} {line}")


def _inline(jobs: list[CellJob], chosen: Settings, *, reg: Registry,
            say: Callable[[str], None]) -> dict[str, CellOutcome]:
    statuses: dict[str, CellOutcome] = {}
    durations: list[float] = []
    for i, job in enumerate(jobs, 1):
        eta = f"; ETA {formatting.duration(sum(durations) / len(durations) * (len(jobs) - i + 1))}" if durations else ""
        say(f"[{i}/{len(jobs)}] {job.label}: running{eta}")
        start = time.monotonic()
        try:
            outcome = run_cell(job, reg=reg, to_log=False)
        except UsageError as exc:
            outcome = CellOutcome("failed", str(exc))
        except Exception as exc:  # one broken cell must not cost the suite the others
            outcome = CellOutcome("failed", f"{type(exc).__name__}: {exc}")
        durations.append(time.monotonic() - start)
        # the cells after a fail-fast failure never started: nothing to cancel
        if _settle(statuses, job, outcome, chosen, functools.partial(_numbered, say, f"[{i}/{len(jobs)}]"), [],
                   f" in {formatting.duration(durations[-1])}") or outcome.state == "interrupted":
            break
    return statuses


def _local(jobs, chosen, *, wait, say, cluster) -> dict[str, CellOutcome]:
    """At most `parallel` cells at once, each its own process (and its own GPU when there are GPUs)."""
    import torch

    gpus = list(range(torch.cuda.device_count()))
    slots = chosen.options["parallel"] or max(len(gpus), 1)
    if not gpus and slots > 1:  # cells sharing the CPU share its cores instead of oversubscribing them
        jobs = [dataclasses.replace(job, threads=max(1, (os.cpu_count() or 1) // slots)) for job in jobs]
    executor = submitit.LocalExecutor(folder=Path(jobs[0].suite_dir) / "submitit")
    waiting = list(jobs)
    statuses: dict[str, CellOutcome] = {}
    running: dict[str, tuple[CellJob, Any, list[int], float]] = {}
    free = list(gpus)
    while waiting or running:
        while waiting and len(running) < slots:
            job = waiting.pop(0)
            gpu = [free.pop(0)] if free else []
            executor.update_parameters(timeout_min=chosen.options["timeout_min"], gpus_per_node=len(gpu),
                                       visible_gpus=gpu)
            running[job.label] = (job, executor.submit(CellTask(), job), gpu, time.monotonic())
            say(f"{job.label}: started (process {running[job.label][1].job_id}; log {job.log})")
        for label, (job, handle, gpu, started) in list(running.items()):
            if handle.done():
                del running[label]
                free += gpu
                others = [(other_job, other.cancel) for other_job, other, _, _ in running.values()]
                if _settle(statuses, job, _collect(job, handle), chosen, say, others,
                           f" in {formatting.duration(time.monotonic() - started)}"):
                    return statuses
        time.sleep(0.5)
    return statuses


def _collect(job: CellJob, handle: Any) -> CellOutcome:
    try:
        return _outcome(job, handle.result(), None)
    except Exception as exc:  # submitit re-raises the worker's error
        return _outcome(job, None, exc)


def slurm_parameters(options: dict, name: str) -> dict:
    """submitit AutoExecutor parameters of the slurm executor's options."""
    parameters: dict[str, Any] = {
        "name": name, "timeout_min": options["timeout_min"], "gpus_per_node": options["gpus_per_node"],
        "cpus_per_task": options["cpus_per_task"], "tasks_per_node": 1, "nodes": 1,
        "slurm_array_parallelism": options["array_parallelism"],
    }
    if options["mem_gb"]:
        parameters["mem_gb"] = options["mem_gb"]
    if options["partition"]:
        parameters["slurm_partition"] = options["partition"]
    if options["setup"]:
        parameters["slurm_setup"] = [str(line) for line in options["setup"]]
    if options["sbatch"]:
        parameters["slurm_additional_parameters"] = dict(options["sbatch"])
    return parameters


def _slurm(jobs, chosen, *, wait, say, cluster) -> dict[str, CellOutcome]:
    import shutil

    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if cluster == "slurm" and missing:
        raise UsageError(f"executor=slurm: there is no {missing[0]} command on this machine (submit from a Slurm "
                         "login node)")
    folder = Path(jobs[0].suite_dir) / "submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    try:
        executor.update_parameters(**slurm_parameters(chosen.options, f"geobench-{Path(jobs[0].suite_dir).name}"))
    except (NameError, AssertionError, ValueError) as exc:
        raise UsageError(f"executor=slurm: {str(exc).splitlines()[0]}") from None
    with executor.batch():
        handles = [executor.submit(CellTask(), job) for job in jobs]
    records = _read_json(_submissions(jobs[0].suite_dir))
    for job, handle in zip(jobs, handles):
        records[job.label] = {"executor": "slurm", "job_id": str(handle.job_id), "folder": str(folder / "%j")}
    atomic_write_json(_submissions(jobs[0].suite_dir), records)
    say(f"submitted {len(jobs)} cells as a job array ({handles[0].job_id.split('_')[0]}); logs under {folder}")
    if not wait:
        return {job.label: CellOutcome("submitted", f"Slurm job {handle.job_id}") for job, handle in zip(jobs, handles)}
    statuses: dict[str, CellOutcome] = {}
    by_handle = {id(h): job for h, job in zip(handles, jobs)}
    for handle in submitit.helpers.as_completed(handles):
        job = by_handle[id(handle)]
        others = [(by_handle[id(other)], functools.partial(other.cancel, check=False)) for other in handles
                  if by_handle[id(other)].label not in statuses and other is not handle]
        if _settle(statuses, job, _collect(job, handle), chosen, say, others):
            break
    return statuses


def _ray(jobs, chosen, *, wait, say, cluster) -> dict[str, CellOutcome]:
    import ray
    import torch

    address = chosen.options["address"]
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    task = ray.remote(_ray_cell).options(num_cpus=chosen.options["cpus_per_task"],
                                         num_gpus=1 if torch.cuda.is_available() else 0, max_retries=0)
    pending = {task.remote(job): job for job in jobs}
    say(f"{len(jobs)} cells handed to Ray ({address or 'a local instance'}); logs under {Path(jobs[0].suite_dir) / 'logs'}")
    statuses: dict[str, CellOutcome] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            outcome = _outcome(job, ray.get(done[0]), None)
        except Exception as exc:  # a RayTaskError wrapping the worker's error
            outcome = _outcome(job, None, exc)
        if _settle(statuses, job, outcome, chosen, say,
                   [(other, functools.partial(ray.cancel, ref)) for ref, other in pending.items()]):
            break
    return statuses


def _ray_cell(job: CellJob) -> CellOutcome:
    return run_cell(job)


def _reachable(address: str) -> None:
    """Fail in seconds, not after Ray's long retries, when a host:port address does not answer."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not address or address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UsageError(f"executor.address={address!r}: no Ray cluster answers there ({exc.strerror or exc})") from None


class CellTask(Checkpointable):
    """The callable submitit pickles for each cell. As a Checkpointable, a cell that Slurm preempts
    or times out is requeued with the same CellJob, and `run_cell` continues it from its state."""

    def __call__(self, job: CellJob) -> CellOutcome:
        return run_cell(job)

