"""The run directory: atomic writes, the eval log, the checkpoint store and the training state.

Layout (stable; other tools read it):
    config.yaml  report.json  report.md  figures/  evals.jsonl  baseline.json  tokenizer.json  codewords.json
    checkpoints/step_XXXXXX.safetensors + checkpoints/index.json
    state/model.safetensors + state/training.pt + state/meta.json
Every file a crash could tear is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import queue
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from geobench.api import UsageError
from geobench.api.documents import EvalRecord, from_json, to_json
from geobench.checkpoints import CheckpointReader
from geobench.documents import Report, RunReport, read_report
from geobench.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, writing

LOCK_NAME = ".lock"


def check_directory_path(directory: str | Path) -> None:
    """A UsageError unless `directory` is, or can become, a directory: not a file, not under a file,
    not a broken symbolic link."""
    directory = Path(directory)
    if not str(directory):
        raise UsageError("the output directory must not be an empty path")
    if directory.is_symlink() and not directory.exists():
        raise UsageError(f"{str(directory)!r} is a broken symbolic link (to {os.readlink(directory)!r})")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{str(directory)!r} is a file, not a directory")
    above = next((d for d in directory.parents if d.exists() or d.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{str(directory)!r} lies under {str(above)!r}, which is not a directory")


@contextlib.contextmanager
def writer_lock(directory: str | Path, role: str) -> Iterator[None]:
    """Hold the one-writer lock of `directory` (created if missing) while the block runs.

    An OS-level `flock` on `directory/.lock`: the kernel releases it when the holder exits or is
    killed, so no stale lock survives a crash, and on Linux NFS maps it to a byte-range lock that
    other hosts see. A second writer — another process, or another open in this one — gets a
    UsageError naming the holder (host, PID, role) and nothing is changed. When the block fails, the
    lock file (if this call made it) and the directories this call made and nothing was written
    into are removed again."""
    directory = Path(directory)
    check_directory_path(directory)
    created = [d for d in [directory, *directory.parents] if not d.exists()]  # innermost first
    lock_created = not (directory / LOCK_NAME).exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        with contextlib.suppress(OSError):
            for made in created:
                made.rmdir()
        raise UsageError(f"cannot write in {str(directory)!r}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
        os.close(fd)
        raise in_use(directory, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"geobench {role} (host {socket.gethostname()}, pid {os.getpid()})".encode(), 0)
    try:
        yield
    except BaseException:
        if lock_created:  # a failed first writer leaves the directory as it found it
            os.unlink(directory / LOCK_NAME)
            with contextlib.suppress(OSError):  # a directory something was written into stays
                for made in created:
                    made.rmdir()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the lock


def in_use(directory: str | Path, holder: str) -> UsageError:
    return UsageError(f"{str(directory)!r} is being written by {holder}; one process writes a directory "
                      "at a time (wait for it to finish, or stop it)")


def lock_holder(directory: str | Path) -> str | None:
    """Who holds `directory`'s writer lock, or None when nobody does."""
    path = Path(directory) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
    finally:
        os.close(fd)
    return None


def _cpu_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.report_json = self.path / "report.json"
        self.report_md = self.path / "report.md"
        self.figures = self.path / "figures"
        self.evals = self.path / "evals.jsonl"
        self.baseline = self.path / "baseline.json"
        self.checkpoints = self.path / "checkpoints"
        self.state = self.path / "state"

    def __str__(self) -> str:
        return str(self.path)

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(p.name != LOCK_NAME for p in self.path.iterdir())

    def clear(self) -> None:
        """Remove everything in the directory but its lock (the caller holds the lock)."""
        for entry in self.path.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def read_report(self) -> Report:
        return read_report(self.report_json)

    def status(self) -> str | None:
        """The status its report records (completed | diverged | interrupted), None without a report."""
        if not self.report_json.exists():
            return None
        report = self.read_report()
        if not isinstance(report, RunReport):
            raise UsageError(f"report {str(self.report_json)!r} is not the report of a training run")
        return report.run.status

    def lock(self, role: str) -> contextlib.AbstractContextManager:
        """The one-writer lock of this run directory (`writer_lock`)."""
        return writer_lock(self.path, role)

    # evals.jsonl: one JSON object per evaluation
    def append_eval(self, record: EvalRecord) -> None:
        with writing(self.evals):
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.evals, "a") as fh:
                fh.write(json.dumps(to_json(record)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def read_evals(self) -> list[EvalRecord]:
        """The evaluations in order. A crash can tear only the last line (the file is appended to
        and synced line by line): such a line is left out. A bad line before the last one is
        damage, not a crash, and a UsageError naming the line."""
        if not self.evals.exists():
            return []
        try:
            text = self.evals.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {str(self.evals)!r}: {exc}") from None
        lines = text.split("\n")  # a complete file ends with "\n": its last piece is empty
        records = []
        for number, line in enumerate(lines, 1):
            if not line and number == len(lines):
                break
            try:
                records.append(from_json(EvalRecord, json.loads(line), "the line"))
            except (ValueError, UsageError) as exc:
                if number == len(lines):  # the unterminated last line: torn by a crash
                    break
                raise UsageError(f"{str(self.evals)!r} line {number} is not an evaluation record ({exc}); "
                                 "the file is damaged") from None
        return records

    def truncate_evals(self, max_step: int) -> None:
        kept = [r for r in self.read_evals() if r.step <= max_step]
        atomic_write_text(self.evals, "".join(json.dumps(to_json(r)) + "\n" for r in kept))

    # baseline.json: the evaluation of the model before its first update (the divergence anchor)
    def save_baseline(self, record: EvalRecord) -> None:
        atomic_write_json(self.baseline, to_json(record))

    def read_baseline(self) -> EvalRecord | None:
        if not self.baseline.exists():
            return None
        return from_json(EvalRecord, read_json(self.baseline, "baseline evaluation"), str(self.baseline))

    # checkpoints/: weights only
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.safetensors"

    def checkpoint_steps(self) -> list[int]:
        index = self.checkpoints / "index.json"
        if not index.exists():
            return []
        steps = read_json(index, "checkpoint index")
        steps = steps.get("steps") if isinstance(steps, dict) else None
        if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise UsageError(f"checkpoint index {str(index)!r} does not list integer steps")
        return steps

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.checkpoint_path(step)
        atomic_write_bytes(path, save_tensors(_cpu_contiguous(tensors), metadata={"step": str(step)}))
        steps = sorted(set(self.checkpoint_steps()) | {step})
        atomic_write_json(self.checkpoints / "index.json", {"steps": steps})
        return path

    def drop_checkpoints_after(self, step: int) -> None:
        kept = [s for s in self.checkpoint_steps() if s <= step]
        for s in self.checkpoint_steps():
            if s > step:
                self.checkpoint_path(s).unlink(missing_ok=True)
        atomic_write_json(self.checkpoints / "index.json", {"steps": kept})

    def load_checkpoint(self, step: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one checkpoint (all, or only `names`), memory-mapped from disk."""
        return CheckpointReader(self.checkpoint_path(step)).tensors(names)

    # state/: everything needed to continue the run exactly
    def save_state(self, step: int, model: dict[str, torch.Tensor], training: dict, meta: dict) -> None:
        new, old = self.path / "state.new", self.path / "state.old"
        shutil.rmtree(new, ignore_errors=True)
        with writing(new, new):
            new.mkdir(parents=True)
            atomic_write_bytes(new / "model.safetensors", save_tensors(_cpu_contiguous(model)))
            buffer = io.BytesIO()  # serialized in memory: torch.save reports a full disk as a RuntimeError
            torch.save(training, buffer)
            atomic_write_bytes(new / "training.pt", buffer.getvalue())
            atomic_write_json(new / "meta.json", {**meta, "step": step})
        shutil.rmtree(old, ignore_errors=True)
        if self.state.exists():
            os.replace(self.state, old)
        os.replace(new, self.state)
        shutil.rmtree(old, ignore_errors=True)

    def has_state(self) -> bool:
        return (self.state / "meta.json").exists() or (self.path / "state.old" / "meta.json").exists()

    def load_state(self) -> tuple[dict, dict[str, torch.Tensor], dict]:
        """(meta, model tensors, training dict); loads no pickled objects."""
        where = self.state if (self.state / "meta.json").exists() else self.path / "state.old"
        meta = read_json(where / "meta.json", "training state")
        model = CheckpointReader(where / "model.safetensors").tensors()
        training = torch.load(where / "training.pt", weights_only=True, map_location="cpu")
        return meta, model, training


def snapshot(value: Any) -> Any:
    """A CPU copy of every tensor in a (nested) state, so that later training steps cannot change
    what a background write is writing."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class BackgroundWriter:
    """Checkpoint and state writes off the training thread. The trainer submits a write with CPU
    copies of what it writes (`snapshot`) and trains on; one writer thread performs the writes in
    order, each as atomic as a direct one (temporary name, then rename: a kill mid-write leaves the
    last complete file). At most `depth` writes wait, so a trainer faster than the disk blocks on
    `submit` instead of piling up copies. `flush()` waits for every write and raises the first error
    a write hit; `done()` hands back, on the caller's thread, the results of the writes finished so far."""

    def __init__(self, depth: int = 1):
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.finished: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="geobench-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                write, args = job
                if self.error is None:
                    self.finished.put(write(*args))
            except BaseException as exc:  # raised on the trainer's thread by flush()
                self.error = exc
            finally:
                self.jobs.task_done()

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        if self.error is not None:
            self.flush()
        self.jobs.put((write, args))

    def done(self) -> list[Any]:
        out = []
        while not self.finished.empty():
            out.append(self.finished.get())
        return out

    def flush(self) -> None:
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.jobs.put(None)
            self.thread.join()
