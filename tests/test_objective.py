import math

import numpy as np
import pytest
import torch

from geobench.data.probe import EvalSet
from geobench.evaluate import Evaluator
from geobench.objective import composite_loss, lambda_at, token_losses
from geobench.schedule import lr_factor


def numpy_ce(logits, target):
    z = logits - logits.max()
    return float(np.log(np.exp(z).sum()) - z[target])


def test_composite_loss_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = np.array([[1, 2, 3, -1, -1], [4, 5, 6, 0, 1]])
    mask = np.zeros((2, 5), bool)
    mask[0, 2] = mask[1, 4] = True
    lm = [numpy_ce(logits[b, t], targets[b, t]) for b in range(2) for t in range(5) if targets[b, t] >= 0 and not mask[b, t]]
    probe = [numpy_ce(logits[b, t], targets[b, t]) for b in range(2) for t in range(5) if mask[b, t]]
    expected = np.mean(lm) + 4.0 * np.mean(probe)
    got = composite_loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(mask), 4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    no_probe = composite_loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.zeros(2, 5, dtype=torch.bool), 4.0)
    all_lm = [numpy_ce(logits[b, t], targets[b, t]) for b in range(2) for t in range(5) if targets[b, t] >= 0]
    assert no_probe.item() == pytest.approx(np.mean(all_lm), rel=1e-5)


def test_lambda_schedule():
    schedule = [[0, 2.0], [4000, 4.0]]
    assert [lambda_at(schedule, s) for s in (1, 3999, 4000, 9000)] == [2.0, 2.0, 4.0, 4.0]


def test_warmup_then_cosine_clamped_at_the_floor():
    """docs/science.md#training-protocol: lr_t = peak · max(½(1 + cos(π·min(1, (t − W)/(T − W)))), 0.1)
    after a linear warmup."""
    def spec(t, warmup=1500, total=10_000, floor=0.1):
        if t <= warmup:
            return t / warmup
        return max(0.5 * (1 + np.cos(np.pi * min(1.0, (t - warmup) / (total - warmup)))), floor)

    for t in (1, 750, 1500, 1501, 4000, 5750, 8000, 8258, 8259, 8260, 9000, 10_000):
        assert lr_factor(t, 1500, 10_000, 0.1) == pytest.approx(spec(t), rel=1e-12), t
    assert lr_factor(5750, 1500, 10_000, 0.1) == pytest.approx(0.5)  # half way through the decay
    # the clamp starts at step 8259 of a 10k run and the lr stays flat after it
    assert lr_factor(8258, 1500, 10_000, 0.1) > 0.1
    assert [lr_factor(t, 1500, 10_000, 0.1) for t in (8259, 9000, 10_000)] == [0.1, 0.1, 0.1]
    assert lr_factor(3487, 1500, 4000, 0.1) > 0.1 == lr_factor(3488, 1500, 4000, 0.1)  # ≈ 3488 of 4k
    assert lr_factor(1631, 200, 2000, 0.1) > 0.1 == lr_factor(1632, 200, 2000, 0.1)  # a 2000-step reheat
    values = [lr_factor(s, 1500, 10_000, 0.1) for s in range(1500, 10_001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: makes exact-match and the CE sums checkable by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):
        return self.table[idx]


def test_evaluator_against_hand_counts():
    vocab = 6
    torch.manual_seed(0)
    table = torch.randn(vocab, vocab)  # logits depend only on the current token
    predicted = table.argmax(-1)
    inputs = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [4, 4, 5, 5]])
    targets = np.array([[1, 2, predicted[2].item(), -1], [2, 1, (predicted[1].item() + 1) % vocab, -1],
                        [4, 5, 5, predicted[5].item()]])
    mask = np.zeros_like(targets, dtype=bool)
    mask[0, 2] = mask[1, 2] = mask[2, 3] = True
    data = EvalSet(inputs, targets, mask)
    val = [(torch.from_numpy(inputs), torch.from_numpy(targets))]
    result = Evaluator(val, data, data, batch_size=2, device=torch.device("cpu"))(FixedLogits(table))

    def ce(i, t):
        return -torch.log_softmax(table[i], -1)[t].item()

    probe = [ce(inputs[b, t], targets[b, t]) for b, t in zip(*np.nonzero(mask))]
    other = [ce(inputs[b, t], targets[b, t]) for b, t in zip(*np.nonzero((targets >= 0) & ~mask))]
    everything = [ce(inputs[b, t], targets[b, t]) for b, t in zip(*np.nonzero(targets >= 0))]
    assert result.p_in == result.p_ood == pytest.approx(2 / 3)
    assert result.nll_ood == pytest.approx(np.mean(probe), rel=1e-5)
    assert result.lm_ood == pytest.approx(np.mean(other), rel=1e-5)
    assert result.r_ood == pytest.approx(np.mean(probe) / np.mean(other), rel=1e-5)
    assert result.val_loss == pytest.approx(np.mean(everything), rel=1e-5)
    assert math.isfinite(result.val_loss)
    # the source's lm_ood also counts the EOS padding targets after the query
    padding = targets < 0
    padded = EvalSet(inputs, targets, mask, padding=padding)
    source = Evaluator(val, padded, padded, batch_size=2, device=torch.device("cpu"), lm_ood_padding_eos=5)(
        FixedLogits(table))
    with_padding = other + [ce(inputs[b, t], 5) for b, t in zip(*np.nonzero(padding))]
    assert source.lm_ood == pytest.approx(np.mean(with_padding), rel=1e-5)
    assert source.nll_ood == pytest.approx(result.nll_ood) and source.p_ood == result.p_ood


@pytest.mark.parametrize("case", ["mixed", "no_probe", "all_ignored"])
def test_chunked_head_loss_equals_cross_entropy_on_the_logits(case):
    """The composite loss and its gradients from (hidden, W) in chunks equal F.cross_entropy on the
    full logits: ignored targets, the probe weighting and an all-ignored micro-batch included."""
    from geobench.objective import head_composite_loss, head_token_stats

    torch.manual_seed(0)
    B, T, d, V = 3, 7, 8, 50
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[0, -2:] = -1  # padding
    mask = torch.zeros(B, T, dtype=torch.bool)
    if case == "mixed":
        mask[1, 3] = mask[2, 5] = True
    if case == "all_ignored":
        targets[:] = -1
    lam = 4.0

    def reference(h, w):  # plain cross-entropy on the materialized logits, written out
        logits = h @ w.T
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).clamp_min(0),
                                               reduction="none").view(B, T)
        valid = targets >= 0
        lm, probe = valid & ~mask, valid & mask
        lm_loss = (ce * lm).sum() / max(int(lm.sum()), 1)
        probe_loss = (ce * probe).sum() / max(int(probe.sum()), 1)
        return lm_loss + lam * probe_loss

    want = reference(hidden, weight)
    g_h, g_w = torch.autograd.grad(want, (hidden, weight)) if want.requires_grad else (None, None)
    got = head_composite_loss(hidden, weight, targets, mask, lam, chunk=4)  # chunks that split rows unevenly
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    c_h, c_w = torch.autograd.grad(got, (hidden, weight))
    if case == "all_ignored":
        assert got.item() == 0.0 and not c_h.any() and not c_w.any()
    else:
        torch.testing.assert_close(c_h, g_h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c_w, g_w, rtol=1e-10, atol=1e-12)
        assert got.item() == pytest.approx(composite_loss(hidden @ weight.T, targets, mask, lam).item(), rel=1e-6)
    ce, argmax = head_token_stats(hidden.detach(), weight.detach(), targets, chunk=5)
    logits = hidden.detach() @ weight.detach().T
    torch.testing.assert_close(ce, token_losses(logits, targets).to(ce.dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(argmax, logits.argmax(-1))


def test_training_through_the_chunked_head_equals_training_on_the_logits(tmp_path, monkeypatch):
    """End to end: the same tiny run with the head path forced on (as at the paper size) and off."""
    from conftest import FAST
    from geobench import config, objective
    from geobench.registry import installed
    from geobench.rundir import RunDir
    from geobench.train import prepare, train

    finals = {}
    for name, threshold in (("logits", 2**62), ("head", 0)):
        monkeypatch.setattr(objective, "HEAD_PATH_BYTES", threshold)
        cfg = config.resolve("adamw", config.parse_pairs([*FAST, "steps=6", "eval_every=3"]), None, installed(), "tiny")
        out = RunDir(tmp_path / name)
        out.path.mkdir()
        train(prepare(cfg, installed()), out)
        finals[name] = (out.load_checkpoint(6), out.read_evals())
    (w_logits, e_logits), (w_head, e_head) = finals["logits"], finals["head"]
    for key in w_logits:
        torch.testing.assert_close(w_head[key], w_logits[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(e_logits, e_head):
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-4) and b.p_ood == a.p_ood


def test_schedule_inconsistencies_are_each_named():
    from geobench import config
    from geobench.registry import installed
    from geobench.schedule import inconsistencies

    def found(*pairs):
        return inconsistencies(config.resolve("adamw", config.parse_pairs(list(pairs)), None, installed(), "tiny"))

    assert found() == []  # the tiny preset's own schedule
    assert found("steps=60") == ["the λ switch at step 200 comes after the last step (train.steps=60)"]
    assert found("warmup=500") == ["train.warmup=500 >= train.steps=500: the learning rate never leaves its warmup"]
    assert found("eval_every=400", "steps=300", "lambda=[[0, 2.0]]") == [
        "2 evaluations (train.eval_every=400, train.steps=300): too few for a curve"]
    assert found("steps=200") == []  # the switch at the last step itself is inside the run
