"""The branches a CUDA run takes, forced on the CPU: the threaded prefetch, the losses read in
batches (a non-finite loss found late is recorded at its true step), and bf16 autocast through the
chunked head loss and its backward."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST
from geobench import cli, train
from geobench.data.batches import Prefetcher
from geobench.monitor import SYNC_EVERY_CUDA, LossReader
from geobench.objective import composite_loss, head_composite_loss

BOOM = ["sgd", "lr=1e6", "wd=0", "grad_clip=0", "diverge_factor=0", *FAST,
        "eval_every=12", "checkpoint_every=12", "state_every=12"]  # boundaries at steps 1 and 12 only


def diverged(tmp_path, name: str) -> tuple[dict, str]:
    assert cli.main(["run", *BOOM, "--out", str(tmp_path / name)]) == 0
    return json.loads((tmp_path / name / "report.json").read_text())["run"], name


def test_a_non_finite_loss_read_late_is_recorded_at_its_step(tmp_path, monkeypatch, capsys):
    every_step, _ = diverged(tmp_path, "every-step")
    capsys.readouterr()
    monkeypatch.setattr(train, "LossReader", lambda every: LossReader(SYNC_EVERY_CUDA))  # as on CUDA
    batched, _ = diverged(tmp_path, "batched")
    said = capsys.readouterr().out
    assert every_step["status"] == batched["status"] == "diverged"
    assert batched["diverged_at"] == every_step["diverged_at"] and 2 <= batched["diverged_at"] <= 8
    found = 1 + SYNC_EVERY_CUDA  # steps 2..9 are read together after step 9
    assert f"at step {batched['diverged_at']}: the run diverged" in said
    assert f"(read {found - batched['diverged_at']} steps later; the weights after step " \
           f"{batched['diverged_at'] - 1} are not kept)" in said
    assert every_step["last_step"] == every_step["diverged_at"] - 1  # read at once: the last finite weights kept
    assert batched["last_step"] == found - 1  # read late: the steps in between ran on


def test_the_threaded_prefetch_hands_out_the_plain_stream_in_a_run(tmp_path, monkeypatch):
    threaded = []

    def as_on_cuda(*args, **kwargs):
        kwargs["threaded"] = True  # pinning needs a CUDA device; the thread is what a CPU run skips
        prefetch = Prefetcher(*args, **kwargs)
        threaded.append(prefetch)
        return prefetch

    assert cli.main(["run", "adamw", *FAST, "--out", str(tmp_path / "plain")]) == 0
    monkeypatch.setattr(train, "Prefetcher", as_on_cuda)
    assert cli.main(["run", "adamw", *FAST, "--out", str(tmp_path / "threaded")]) == 0
    assert threaded and threaded[0].threaded and not threaded[0].thread.is_alive()
    plain, other = (json.loads((tmp_path / d / "evals.jsonl").read_text().splitlines()[-1]) for d in ("plain", "threaded"))
    assert plain["val_loss"] == other["val_loss"] and plain["train_loss"] == other["train_loss"]


def _loss_and_grads(hidden, weight, run) -> tuple[float, list[torch.Tensor]]:
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = run(h, w)
    loss.backward()
    return loss.item(), [h.grad, w.grad]


@pytest.mark.parametrize("chunk", [7, 4096])
def test_bf16_autocast_through_the_chunked_head_and_its_backward(chunk):
    """Under bf16 autocast the chunked head's loss and gradients are as close to the float32 ones
    as the plain loss on bf16 logits is (both round the logits' matmul to bf16)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 11, 32), torch.randn(500, 32) / 4
    targets = torch.randint(0, 500, (3, 11))
    targets[0, -2:] = -1
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[:, 5] = True

    def chunked(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return head_composite_loss(h, w, targets, mask, 2.0, chunk=chunk)

    def plain(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = h @ w.T
        return composite_loss(logits.float(), targets, mask, 2.0)

    exact_loss, exact_grads = _loss_and_grads(hidden, weight,
                                              lambda h, w: composite_loss(h @ w.T, targets, mask, 2.0))
    for run in (chunked, plain):
        loss, grads = _loss_and_grads(hidden, weight, run)
        errors = [float((g - e).norm() / e.norm()) for g, e in zip(grads, exact_grads)]
        if run is chunked:
            ours = (abs(loss - exact_loss) / exact_loss, errors)
            assert all(torch.isfinite(g).all() for g in grads)
        else:
            theirs = (abs(loss - exact_loss) / exact_loss, errors)
    assert ours[0] <= 2 * theirs[0] + 1e-3 and ours[0] < 1e-2
    assert all(a <= 2 * b + 1e-3 and a < 5e-2 for a, b in zip(ours[1], theirs[1])), (ours, theirs)
