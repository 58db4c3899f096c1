import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One cache for the whole session (tokenizers and token arrays are reused across tests), outside
# the user's own cache; subprocesses inherit it.
_SESSION_CACHE = tempfile.mkdtemp(prefix="geobench-test-cache-")
os.environ["GEOBENCH_CACHE"] = _SESSION_CACHE
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_SESSION_CACHE, "hf-datasets"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinystories"

# A run small enough to finish in seconds on one CPU core.
FAST = [
    "preset=tiny", "steps=12", "train_stories=300", "val_stories=40", "eval_examples=16",
    "n_codewords=32", "eval_every=6", "checkpoint_every=4", "state_every=4", "batch_size=8",
    "val_batches=1", "val_batch_size=8", "warmup=3", "lambda=[[0,2.0],[6,4.0]]", "metrics=[]",
]


def geobench_command() -> list[str]:
    """The installed console script, as a user calls it."""
    script = Path(sys.executable).parent / "geobench"
    return [str(script)] if script.exists() else [shutil.which("geobench") or "geobench"]


PAUSE_AFTER_STATE = """\
import os, signal
with open(os.environ["GEOBENCH_TEST_PIDS"], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
from geobench.rundir import RunDir
_save_state = RunDir.save_state
_paused = os.path.join(os.path.dirname(os.environ["GEOBENCH_TEST_PIDS"]), "paused")
def _save_state_then_stop(self, *args, **kwargs):
    _save_state(self, *args, **kwargs)
    if not os.path.exists(_paused):  # once: a resumed or requeued process runs through
        with open(_paused, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)  # the test kills or signals the stopped process
RunDir.save_state = _save_state_then_stop
"""


def stopping_after_first_state(tmp_path: Path) -> dict:
    """Environment for a geobench subprocess (and the processes it starts) that stops itself with
    SIGSTOP right after its first training-state save, so that a test can kill it mid-run however
    loaded the machine is: the real code runs, it only pauses there. Every Python process started
    with it writes its PID to a file, for `kill_every_process` (torchrun starts its workers in
    sessions of their own, out of reach of a process-group kill)."""
    site = tmp_path / "pause-after-state"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(PAUSE_AFTER_STATE)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
            "GEOBENCH_TEST_PIDS": str(site / "pids")}


def paused_process(tmp_path: Path) -> int:
    """The PID of the process that stopped itself (`stopping_after_first_state`)."""
    return int((tmp_path / "pause-after-state" / "paused").read_text())


def kill_every_process(tmp_path: Path, signal_number: int = signal.SIGKILL) -> None:
    """Signal (SIGKILL: as a lost node would) every process started with `stopping_after_first_state(tmp_path)`."""
    for pid in (tmp_path / "pause-after-state" / "pids").read_text().split():
        try:
            os.kill(int(pid), signal_number)
        except ProcessLookupError:
            pass


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    return subprocess.run(geobench_command() + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data/tinystories is not present")
    return SHARED_DATA


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny finished run with a checkpoint and an evaluation every 2 steps, for the metric tests."""
    from geobench import config
    from geobench.registry import installed
    from geobench.rundir import RunDir
    from geobench.train import prepare, train

    pairs = config.parse_pairs(FAST + ["steps=30", "eval_every=2", "checkpoint_every=2", "state_every=30",
                                       "eval_examples=40", "lr=3e-3"])
    cfg = config.resolve("adamw", pairs, None, installed(), "tiny")
    out = RunDir(tmp_path_factory.mktemp("metrics") / "run")
    out.path.mkdir(parents=True)
    (out.config).write_text(config.save(cfg))
    train(prepare(cfg, installed()), out)
    return out


def hf_checkpoint(directory, tensors, shards=2):
    """A Hugging Face style checkpoint: safetensors shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, directory / shard)
        weight_map.update({n: shard for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory
