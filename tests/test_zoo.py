"""The optimizer contract on the optimizers that stretch it: a composite (Muon + AdamW), eval-mode
weights (Schedule-Free), closures (SAM, L-BFGS), second derivatives, a per-step hook (SophiaG),
the schedule check, and plugins whose library is missing. Each is checked against an independent
computation; the plugins whose library is not installed are skipped (tox's plugin env has them)."""

import copy

import pytest
import torch

from conftest import FAST
from geobench import Param, config, distributed, hookimpl, optim
from geobench.api import Batch, OptimizerPlugin, UsageError
from geobench.checkpoints import load_weights
from geobench.objective import composite_loss
from geobench.registry import installed, make_registry
from geobench.rundir import RunDir
from geobench.stepping import Stepper
from geobench.train import prepare, train

REG = installed()
CPU = torch.device("cpu")


def needs(name):
    why = REG.optimizers[name].unavailable()
    return pytest.mark.skipif(why is not None, reason=why or "")


def resolved(name, *pairs, reg=REG):
    return config.resolve(name, config.parse_pairs([*FAST, *pairs]), None, reg, "tiny")


def batches_of(setup, step, lam=2.0):
    return [Batch(*setup.stream.batch(step, micro)) for micro in range(setup.cfg.train.grad_accum)]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tmp_path):
    setup = prepare(resolved("muon"), REG)
    groups = optim.describe(setup.optimizer_plugin, setup.optimizer, setup.parameters)["groups"]
    by_class = {g["optimizer"].rsplit(".", 1)[-1]: g for g in groups}
    layout = REG.model("gpt").layout
    names = [n for n, _ in setup.model.named_parameters()]
    trunk = layout.trunk_names(names)
    assert by_class["Muon"]["roles"] == ["matrix"]
    assert by_class["Muon"]["parameters"] == sum(dict(setup.model.named_parameters())[n].numel() for n in trunk)
    assert by_class["Muon"]["hyperparameters"]["lr"] == 0.02
    adamw = [g for g in groups if g["optimizer"].endswith("AdamW")]
    assert {r for g in adamw for r in g["roles"]} == {"embedding", "norm"}
    assert sum(g["parameters"] for g in groups) == sum(p.numel() for p in setup.model.parameters())
    # the harness's schedule reaches both parts
    optim.set_lr(setup.optimizer, 0.5)
    assert [part.param_groups[0]["lr"] for part in setup.optimizer.parts.values()] == [0.01, 0.0015]


@needs("schedulefree")
def test_schedule_free_checkpoints_and_evaluations_hold_x_not_y(tmp_path):
    """x = y + (1 − 1/β₁)(z − y), computed from the optimizer's own train-mode weights y and state z
    after training, is what the last checkpoint holds and what the last evaluation evaluated."""
    setup = prepare(resolved("schedulefree", "beta1=0.9"), REG)
    out = RunDir(tmp_path / "run")
    train(setup, out)
    y = {n: p.detach().double() for n, p in setup.model.named_parameters()}
    z = {n: setup.optimizer.state[p]["z"].double() for n, p in setup.model.named_parameters()}
    x = {n: y[n] + (1 - 1 / 0.9) * (z[n] - y[n]) for n in y}
    last = out.checkpoint_steps()[-1]
    saved = out.load_checkpoint(last)
    for n in y:
        torch.testing.assert_close(saved[n].double(), x[n], atol=1e-6, rtol=1e-5)
    gap = sum(float((saved[n].double() - y[n]).norm() ** 2) for n in y) ** 0.5
    assert gap > 1e-3  # y is not what was recorded
    record = out.read_evals()[-1]
    model = copy.deepcopy(setup.model)
    assert setup.evaluator(load_weights(model, saved)).val_loss == record.val_loss
    assert setup.evaluator(setup.model).val_loss != record.val_loss
    doc_trajectory = optim.describe(setup.optimizer_plugin, setup.optimizer, setup.parameters)["trajectory"]
    assert doc_trajectory.startswith("eval-mode weights")


def hand_written_sam(model, batches, lam, rho, clip, lr, betas, wd):
    """SAM by its definition: the gradient g at θ, the ascent e = ρ g/‖g‖, the gradient at θ + e,
    then one AdamW step from θ with it (gradients clipped as the harness clips them). Returns the
    gradient the step used."""
    params = dict(model.named_parameters())

    def gradient():
        model.zero_grad(set_to_none=True)
        for b in batches:
            (composite_loss(model(b.inputs), b.targets, b.mask, lam) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        return {n: p.grad.clone() for n, p in params.items()}

    g = gradient()
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    with torch.no_grad():
        start = {n: p.clone() for n, p in params.items()}
        for n, p in params.items():
            p.add_(rho * g[n] / (norm + 1e-12))
    perturbed = gradient()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
            p.grad = perturbed[n]
    decayed = [p for n, p in params.items() if p.ndim >= 2]
    plain = [p for n, p in params.items() if p.ndim < 2]
    torch.optim.AdamW([{"params": decayed, "weight_decay": wd}, {"params": plain, "weight_decay": 0.0}],
                      lr=lr, betas=betas).step()
    return perturbed


@needs("sam")
def test_a_sam_step_matches_the_hand_written_one():
    cfg = resolved("sam", "grad_accum=2", "grad_clip=0.5", "rho=0.1")
    setup = prepare(cfg, REG)
    reference = copy.deepcopy(setup.model)
    stepper = Stepper(cfg=cfg, model=setup.model, optimizer=setup.optimizer, plugin=setup.optimizer_plugin,
                      device=CPU, autocast=setup.autocast, here=distributed.World())
    batches = batches_of(setup, 1)
    stepper.gradient(batches, 2.0)
    first = [p.grad.clone() for p in setup.model.parameters()]
    stepper.gradient(batches, 2.0)  # what the closure recomputes: the same gradient, deterministically
    assert all(torch.equal(a, p.grad) for a, p in zip(first, setup.model.parameters()))
    base, used = setup.optimizer.base_optimizer, []
    base_step = base.step
    base.step = lambda: (used.append({n: p.grad.clone() for n, p in setup.model.named_parameters()}), base_step())
    stepper.update(batches, 2.0)
    hp = cfg.optimizer.params
    perturbed = hand_written_sam(reference, batches, 2.0, rho=0.1, clip=0.5, lr=hp["lr"],
                                 betas=(hp["beta1"], hp["beta2"]), wd=hp["wd"])
    assert len(used) == 1
    unperturbed = dict(zip((n for n, _ in setup.model.named_parameters()), first))
    for name, grad in perturbed.items():
        scale = float(grad.abs().max())  # the perturbed weights round differently: compare at the tensor's scale
        torch.testing.assert_close(used[0][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    moved = max(float((perturbed[n] - unperturbed[n]).abs().max() / perturbed[n].abs().max()) for n in perturbed)
    assert moved > 1e-3  # the ascent step changed the gradient far beyond that tolerance
    # AdamW's first step is ~lr·sign(g): where g is ~1e-9 rounding can move it by a fraction of lr
    for (name, a), b in zip(setup.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0.1 * hp["lr"], msg=name)


@needs("sophia")
def test_sophia_refreshes_its_hessian_from_sampled_labels_every_k_steps():
    from geobench.plugins.optimizers.zoo import sophia_hessian

    cfg = resolved("sophia", "hessian_every=3")
    setup = prepare(cfg, REG)
    model, optimizer, batches = setup.model, setup.optimizer, batches_of(setup, 1)
    beta2 = cfg.optimizer.params["beta2"]
    torch.manual_seed(7)
    sophia_hessian(step=1, tokens_per_step=64, model=model, optimizer=optimizer, batches=batches)
    torch.manual_seed(7)  # the same labels, sampled again by hand
    reference = copy.deepcopy(model)
    for inputs, _, _ in batches:
        logits = reference(inputs)
        sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
        (torch.nn.functional.cross_entropy(logits.flatten(0, 1), sampled.flatten()) / len(batches)).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(optimizer.state[p]["hessian"], (1 - beta2) * q.grad ** 2)
    before = {id(p): optimizer.state[p]["hessian"].clone() for p in model.parameters()}
    for step in (2, 3):
        sophia_hessian(step=step, tokens_per_step=64, model=model, optimizer=optimizer, batches=batches)
    assert all(torch.equal(before[id(p)], optimizer.state[p]["hessian"]) for p in model.parameters())
    sophia_hessian(step=4, tokens_per_step=64, model=model, optimizer=optimizer, batches=batches)
    assert not all(torch.equal(before[id(p)], optimizer.state[p]["hessian"]) for p in model.parameters())


class HessianVectorSGD(torch.optim.Optimizer):
    """θ ← θ − lr (g + c·Hg): the Hessian-vector product needs the gradient's graph."""

    def __init__(self, params, lr, c):
        super().__init__(params, {"lr": lr, "c": c})

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        with torch.enable_grad():
            hv = torch.autograd.grad([p.grad for p in params], params, grad_outputs=[p.grad.detach() for p in params])
        for group in self.param_groups:
            for p in group["params"]:
                h = hv[[id(q) for q in params].index(id(p))]
                p.sub_(group["lr"] * (p.grad + group["c"] * h))


class SecondOrder:
    @hookimpl
    def geobench_register_optimizers(self, register):
        register(OptimizerPlugin(
            name="hv-sgd", help="SGD plus a Hessian-vector term", params={"lr": Param(0.05, low=0, low_open=True)},
            build=lambda *, parameters, hp, device, schedule: HessianVectorSGD(parameters.tensors(), hp["lr"], 0.01),
            second_order=True))


def test_a_second_order_optimizer_trains_through_a_twice_differentiable_path(tmp_path):
    reg = make_registry(extra_plugins=(SecondOrder(),))
    cfg = resolved("hv-sgd", reg=reg)
    setup = prepare(cfg, reg)
    outcome = train(setup, RunDir(tmp_path / "run"))
    assert outcome.status == "completed" and outcome.last_step == 12
    # the chunked head loss is never taken for it, even where the logits are large
    big = dict(config.to_dict(cfg)["model"], context=128)
    model = reg.model("gpt").build(config=config.ModelConfig(**{**big, "d_model": 8, "n_head": 2, "d_ff": 8}),
                                   vocab_size=50257)
    big_cfg = resolved("hv-sgd", "batch_size=64", "context=128", reg=reg)
    for plugin, headed in ((reg.optimizer("hv-sgd"), False), (reg.optimizer("adamw"), True)):
        stepper = Stepper(cfg=big_cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          plugin=plugin, device=CPU, autocast=setup.autocast,
                          here=distributed.World())
        assert (stepper.headed is not None) == headed


@pytest.mark.parametrize("pairs, message", [
    (["model.compile=true"], "torch.compile does not provide"),
    (["model.family=eqformer"], "not differentiable by autograd"),
])
def test_a_second_order_optimizer_is_refused_where_it_cannot_run(pairs, message):
    reg = make_registry(extra_plugins=(SecondOrder(),))
    with pytest.raises(UsageError, match=message):
        prepare(resolved("hv-sgd", *pairs, reg=reg), reg)


@pytest.mark.parametrize("name", ["torch:Rprop", "torch:ASGD"])
def test_an_optimizer_that_ignores_the_scheduled_lr_is_refused(name):
    with pytest.raises(UsageError, match="in a step at lr = 0: it does not follow the lr the harness schedules"):
        prepare(resolved(name), REG)


class Missing:
    @hookimpl
    def geobench_register_optimizers(self, register):
        register(OptimizerPlugin(name="ghost", help="needs a library nobody installed", params={},
                                 build=lambda **kwargs: None, requires=("geobench-no-such-dist",),
                                 install='pip install "geobench-ghost"'))


def test_a_plugin_whose_library_is_missing_is_listed_and_refused(monkeypatch, capsys):
    from geobench import cli
    from geobench import registry as plugin_registry

    reg = make_registry(extra_plugins=(Missing(),))
    assert reg.optimizers["ghost"].unavailable() == (
        "optimizer 'ghost' needs geobench-no-such-dist, which is not installed: pip install \"geobench-ghost\"")
    monkeypatch.setattr(plugin_registry, "installed", lambda: reg)
    assert cli.main(["plugins"]) == 0
    assert 'UNAVAILABLE: optimizer \'ghost\' needs geobench-no-such-dist' in capsys.readouterr().out
    assert cli.main(["run", "ghost", *FAST, "--out", "never"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "geobench-ghost"' in err


def test_state_size_counts_every_float_the_optimizer_keeps():
    cfg = resolved("adamw")
    setup = prepare(cfg, REG)
    n = sum(p.numel() for p in setup.model.parameters())
    setup.optimizer.zero_grad()
    for p in setup.model.parameters():
        p.grad = torch.ones_like(p)
    setup.optimizer.step()
    # AdamW: exp_avg and exp_avg_sq per value, plus one step counter per tensor
    expected = (2 * n + len(list(setup.model.parameters()))) / n
    assert optim.state_floats_per_parameter(setup.optimizer, n) == pytest.approx(expected)
