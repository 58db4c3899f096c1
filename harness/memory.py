"""Whether a run can fit in this machine's memory, judged before anything is written.

The estimate is a lower bound — the tensors a run of the config must hold at once whatever else it
does: the parameters with their gradients and two moments, one step's token batches, and the fixed
evaluation sets. A run refused by it cannot fit; one that passes may still need more (activations
depend on the kernels), which training reports as it goes."""

from __future__ import annotations

import os

import torch

from geobench.api import Config, UsageError

FLOAT, TOKEN = 4, 8  # bytes of a float32 value and of an int64 token id


def lower_bound(cfg: Config) -> dict[str, int]:
    """Bytes the run must hold at once, by what holds them (the vocabulary is the configured BPE's size)."""
    m, t, p = cfg.model, cfg.train, cfg.probe
    parameters = m.n_layer * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + (cfg.data.vocab_size + m.context) * m.d_model
    return {
        f"the parameters with gradients and two moments (model.n_layer={m.n_layer}, model.d_model={m.d_model}, "
        f"model.d_ff={m.d_ff})": 4 * FLOAT * parameters,
        f"one step's token batches (train.batch_size={t.batch_size}, train.grad_accum={t.grad_accum}, "
        f"model.context={m.context})": 2 * TOKEN * t.batch_size * t.grad_accum * (m.context + 1),
        f"the evaluation sets (probe.eval_examples={p.eval_examples}, train.val_batches={t.val_batches}, "
        f"train.val_batch_size={t.val_batch_size})":
            TOKEN * (2 * p.eval_examples + t.val_batches * t.val_batch_size) * (m.context + 1),
    }


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg: Config, device: torch.device) -> None:
    """A UsageError when the lower bound exceeds the memory it must fit in: all of it in the host's
    memory on a CPU; the parameters' part in the GPU's (and the rest in the host's) on CUDA."""
    needs = lower_bound(cfg)
    params_part = next(iter(needs))
    places = ({"GPU memory": ({params_part}, torch.cuda.get_device_properties(device).total_memory),
               "memory": (set(needs) - {params_part}, host_memory())} if device.type == "cuda"
              else {"memory": (set(needs), host_memory())})
    for where, (parts, total) in places.items():
        need = sum(needs[k] for k in parts)
        if need > total:
            largest = max(parts, key=lambda k: needs[k])
            raise UsageError(f"this run needs at least {need / 2**30:,.1f} GiB of {where} and the machine has "
                             f"{total / 2**30:,.1f} GiB; the largest part is {largest}: {needs[largest] / 2**30:,.1f} GiB")
