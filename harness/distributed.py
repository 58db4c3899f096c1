"""One run on several processes: torchrun + DistributedDataParallel.

The protocol does not depend on the number of processes. `batch_size × grad_accum` is the global
batch of one optimizer step whatever the world size: with N processes each rank runs
`grad_accum / N` of the step's micro-batches, taken from the same global data stream (a pure
function of the step), and DDP averages the gradients. Rank 0 evaluates and writes (checkpoints,
state, evals, report); every decision that ends or shapes the loop (a non-finite loss, divergence,
early stop) is taken from values all ranks share, so no rank can wait on a collective the others
skipped. With two ranks the averaged gradient is bit-identical to single-process accumulation (a
sum of two terms halved either way); with more, the sums associate differently and the weights
agree to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from geobench.api import UsageError


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def micro_batches(self, grad_accum: int) -> range:
        """The micro-batches of each optimizer step this rank computes."""
        if grad_accum % self.size:
            raise UsageError(f"grad_accum={grad_accum} is not divisible by the {self.size} processes: each process "
                             "runs grad_accum / processes micro-batches of a step (choose grad_accum as a multiple)")
        share = grad_accum // self.size
        return range(self.rank * share, (self.rank + 1) * share)


def world() -> World:
    """This process's place, from the variables torchrun sets (a single process without them)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def start(here: World, device: torch.device) -> None:
    if here.active and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(here: World, value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if not here.active:
        return value
    box = [value if here.writer else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(here: World, tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor every rank holds (a non-finite value on any rank stays one)."""
    if here.active:
        dist.all_reduce(tensor)
        tensor /= here.size
    return tensor


def barrier(here: World) -> None:
    if here.active:
        dist.barrier()


def wrap(here: World, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not here.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def check_devices(n: int, device_setting: str) -> None:
    """`devices=N` asks for N processes: one per GPU (as many as are visible), or N CPU processes
    when the run is pinned to the CPU (train.device=cpu)."""
    if n < 1:
        raise UsageError(f"devices={n} must be >= 1")
    if device_setting == "cpu":
        return
    visible = torch.cuda.device_count()
    if n > visible:
        raise UsageError(f"devices={n} but {visible} GPU{'s are' if visible != 1 else ' is'} visible"
                         + ("" if visible else " (on a CPU, devices=N with train.device=cpu runs N CPU processes)"))


def check_trainable(plugin: Any) -> None:
    """Optimizers that bring their own gradient rule (EP) bypass autograd, so DDP cannot average
    them; DDP's all-reduce hook does not carry the graph a second derivative needs."""
    if plugin.gradient is not None:
        raise UsageError(f"optimizer {plugin.name!r} brings its own gradient rule, which does not run under "
                         "DistributedDataParallel yet; train it in one process (devices=1)")
    if plugin.second_order:
        raise UsageError(f"optimizer {plugin.name!r} needs second derivatives, which DistributedDataParallel "
                         "does not provide; train it in one process (devices=1)")


LAUNCH_DIR = "GEOBENCH_LAUNCH_DIR"  # a launch's scratch folder: each process's PID, and geobench's exit code


def launch(argv: list[str], n: int) -> int:
    """Run `geobench <argv>` as n processes under torchrun on this machine; geobench's exit code.

    torchrun runs in a session of its own and the processes tell the launcher their PIDs, so that a
    Ctrl-C reaches the processes alone, all at once (they stop together and save their state), and
    not torchrun's agent, whose answer to a signal is a traceback. The processes end with exit code
    0 once geobench has handled what happened (a bad input, an interrupt, a failed metric) and rank 0
    leaves the code in the scratch folder: torchrun reports only a process that crashed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "geobench", *argv]
    print(f"geobench: {n} processes: {' '.join(command)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="geobench-launch-") as scratch:
        process = subprocess.Popen(command, env={**os.environ, LAUNCH_DIR: scratch}, start_new_session=True)
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:
                for pid in Path(scratch).glob("pid.*"):
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid.read_text()), signal.SIGINT)
        exit_file = Path(scratch) / "exit"
        return int(exit_file.read_text()) if exit_file.exists() else code


def join_launch() -> None:
    """In a process of a `launch`: leave this process's PID for the launcher."""
    scratch = os.environ.get(LAUNCH_DIR)
    if scratch and world().active:
        (Path(scratch) / f"pid.{world().rank}").write_text(str(os.getpid()))


def handled_exit(code: int) -> int:
    """The exit code a process of a `launch` returns for geobench's `code`: rank 0 records it for
    the launcher, and every process returns 0 so that torchrun has no failure to report."""
    scratch = os.environ.get(LAUNCH_DIR)
    if not scratch or not world().active:
        return code
    if world().writer:
        (Path(scratch) / "exit").write_text(str(code))
    return 0
