import numpy as np
import pytest
import torch

from geobench.api import Parameters, RoledParameter, TrainingSchedule, UsageError
from geobench.registry import installed

CPU = torch.device("cpu")
SCHEDULE = TrainingSchedule(steps=10, warmup=2, tokens_per_step=64)


def groups():
    """A weight matrix and a bias, as a model's layout gives them to an optimizer plugin."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    return w, b, Parameters([RoledParameter("w", w, "matrix"), RoledParameter("b", b, "norm")])


def build(plugin, params, parameters):
    return plugin.build(parameters=parameters, hp=params, device=CPU, schedule=SCHEDULE)


def hp(name, **given):
    plugin = installed().optimizer(name)
    return plugin, {k: given.get(k, spec.default) for k, spec in plugin.params.items()}


def test_adamw_decays_matrices_only_and_uses_beta2():
    plugin, params = hp("adamw", beta2=0.9)
    w, b, g = groups()
    opt = build(plugin, params, g)
    assert isinstance(opt, torch.optim.AdamW)
    assert [grp["weight_decay"] for grp in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.9)


def manual_sgd(theta, grads, lr, momentum, nesterov, wd, decoupled):
    """Independent numpy SGD: L2 adds wd·θ to the gradient; decoupled shrinks θ by (1 − lr·wd) after."""
    buf = None
    for g in grads:
        if not decoupled:
            g = g + wd * theta
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
        if decoupled:
            theta = theta * (1 - lr * wd)
    return theta


@pytest.mark.parametrize("momentum, nesterov, wd_mode", [(0.0, False, "l2"), (0.9, False, "l2"), (0.9, True, "decoupled")])
def test_sgd_variants_match_the_formulas(momentum, nesterov, wd_mode):
    plugin, params = hp("sgd", lr=0.1, momentum=momentum, nesterov=nesterov, wd=0.5, wd_mode=wd_mode)
    w, b, g = groups()
    start_w, start_b = w.detach().numpy().copy(), b.detach().numpy().copy()
    opt = build(plugin, params, g)
    rng = np.random.default_rng(1)
    grads_w = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    grads_b = [rng.normal(size=4).astype(np.float32) for _ in range(3)]
    for gw, gb in zip(grads_w, grads_b):
        w.grad, b.grad = torch.from_numpy(gw), torch.from_numpy(gb)
        opt.step()
    decoupled = wd_mode == "decoupled"
    expected_w = manual_sgd(start_w, grads_w, 0.1, momentum, nesterov, 0.5, decoupled)
    np.testing.assert_allclose(w.detach().numpy(), expected_w, rtol=1e-5)
    expected_b = manual_sgd(start_b, grads_b, 0.1, momentum, nesterov, 0.0, decoupled)
    np.testing.assert_allclose(b.detach().numpy(), expected_b, rtol=1e-5)


def test_decoupled_decay_follows_the_scheduled_lr():
    plugin, params = hp("sgd", lr=0.1, wd=0.5, wd_mode="decoupled")
    w, b, g = groups()
    opt = build(plugin, params, g)
    opt.param_groups[0]["lr"] = 0.02  # what the trainer's schedule does
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.02 * 0.5))


def test_nesterov_needs_momentum():
    plugin, params = hp("sgd", nesterov=True)
    with pytest.raises(UsageError, match="nesterov=true needs momentum > 0"):
        build(plugin, params, groups()[2])


def test_any_torch_optimizer_by_name():
    plugin = installed().optimizer("torch:Adagrad")
    assert plugin.name == "torch:Adagrad" and "lr" in plugin.params and "weight_decay" in plugin.params
    params = {k: s.default for k, s in plugin.params.items()} | {"weight_decay": 0.1}
    opt = build(plugin, params, groups()[2])
    assert isinstance(opt, torch.optim.Adagrad)
    assert [grp["weight_decay"] for grp in opt.param_groups] == [0.1, 0.0]
    bad = {k: s.default for k, s in plugin.params.items()} | {"lr_decay": -1.0}
    with pytest.raises(UsageError, match="torch:Adagrad could not be built"):
        build(plugin, bad, groups()[2])


def test_unknown_optimizers_suggest_a_name():
    with pytest.raises(UsageError, match=r"unknown optimizer 'adamww' \(did you mean 'adamw'\?\)"):
        installed().optimizer("adamww")
    with pytest.raises(UsageError, match=r"torch.optim has no optimizer 'Adamm' \(did you mean"):
        installed().optimizer("torch:Adamm")
    with pytest.raises(UsageError, match="needs a variant"):
        installed().optimizer("torch")
    with pytest.raises(UsageError, match="takes no variant"):
        installed().optimizer("adamw:fast")
