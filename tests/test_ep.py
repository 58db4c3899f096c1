"""Equilibrium propagation: exactness on an energy-based model, estimator bias, the controls, the
eigenvalue probe, and training through the command line."""

import cmath
import json

import numpy as np
import pytest
import torch

from conftest import FAST, run_cli
from geobench.api import Batch, ModelConfig
from geobench.objective import composite_loss, composite_weights
from geobench.plugins.ep import relaxation as ep
from geobench.plugins.ep.eqformer import EqFormer, linear


class Energy(EqFormer):
    """F(h) = h − ∂E/∂h for E = ½‖h‖² − ½ρ(h)ᵀWρ(h) − ρ(h)ᵀe with W symmetric and ρ = tanh: J = I − ∇²E is
    symmetric, the case where EP is exact as β → 0. Same readout as the eqformer."""

    def __init__(self, d=6, vocab=11, seed=0):
        torch.nn.Module.__init__(self)
        g = torch.Generator().manual_seed(seed)
        self.wte = torch.nn.Embedding(vocab, d)
        torch.nn.init.normal_(self.wte.weight, std=0.5, generator=g)
        self.ln_f = torch.nn.LayerNorm(d)
        a = torch.randn(d, d, generator=g) * 0.3
        self.W = torch.nn.Parameter((a + a.T) / 2)
        self.relax_steps, self.damping, self.tol = 400, 0.5, 1e-12

    def embed(self, idx):
        return self.wte(idx)

    def step(self, h, e):
        r = torch.tanh(h)
        return (1 - r * r) * (linear(r, self.W) + e.to(h.dtype))


@pytest.fixture(scope="module")
def energy_case():
    torch.manual_seed(0)
    model = Energy().double()
    inputs, targets = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3] = True
    return model, inputs, targets, mask


def gradient(model, fn, **kwargs):
    model.zero_grad(set_to_none=True)
    fn(model, **kwargs)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def exact(model, inputs, targets, mask):
    e, h, _ = ep.free_phase(model, inputs)
    return gradient(model, ep.implicit_gradient, e=e, h=h, batch=Batch(inputs, targets, mask), lam=2.0, steps=400)


def estimate(model, inputs, targets, mask, estimator, beta, n_points=4):
    e, h, _ = ep.free_phase(model, inputs)
    return gradient(model, ep.ep_gradient, e=e, h=h, batch=Batch(inputs, targets, mask), lam=2.0, estimator=estimator,
                    beta=beta, n_points=n_points, nudge_steps=400)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_implicit_gradient_equals_backprop_through_the_relaxation(energy_case):
    model, inputs, targets, mask = energy_case
    g_bptt = gradient(model, ep.bptt_gradient, batch=Batch(inputs, targets, mask), lam=2.0)
    g_exact = exact(*energy_case)
    assert float((g_bptt - g_exact).norm() / g_exact.norm()) < 1e-6


def test_ep_is_exact_in_the_limit_on_an_energy_based_model(energy_case):
    g_exact = exact(*energy_case)
    for estimator in ("one_sided", "symmetric", "holo"):
        assert cos(estimate(*energy_case, estimator, 1e-3), g_exact) > 0.99


def test_symmetric_and_holomorphic_estimators_have_less_bias(energy_case):
    g_exact = exact(*energy_case)
    error = {est: float((estimate(*energy_case, est, 0.1) - g_exact).norm() / g_exact.norm())
             for est in ("one_sided", "symmetric", "holo")}
    assert error["symmetric"] < error["one_sided"] and error["holo"] < error["one_sided"]
    holo = [float((estimate(*energy_case, "holo", 0.1, n) - g_exact).norm() / g_exact.norm()) for n in (2, 4, 8)]
    assert holo[0] > holo[1] > holo[2]  # the bias shrinks with the number of points on the circle


def test_the_nudge_is_the_loss_gradient_and_the_complex_path_matches(energy_case):
    torch.manual_seed(1)
    model = EqFormer(ModelConfig(n_layer=1, n_head=2, d_model=8, d_ff=16, context=12), 20).double()
    inputs, targets = torch.randint(0, 20, (2, 12)), torch.randint(0, 20, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 5] = True
    h = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    auto = torch.autograd.grad(composite_loss(model.readout(h), targets, mask, 3.0), h)[0]
    written = ep.loss_gradient_h(model, h.detach(), targets, composite_weights(targets, mask, 3.0))
    torch.testing.assert_close(written, auto)
    real = model.step(h.detach(), model.embed(inputs).detach())
    complex_path = model.step(h.detach().to(torch.complex128), model.embed(inputs).detach()).real
    torch.testing.assert_close(real, complex_path)


def test_eigenvalue_probe_recovers_a_planted_spectrum():
    rng = np.random.default_rng(0)
    r, theta = 0.9, 0.3
    blocks = np.zeros((8, 8))
    blocks[:2, :2] = r * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    blocks[2:, 2:] = np.diag([0.5, -0.4, 0.3, 0.2, -0.1, 0.05])
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    A = torch.from_numpy(basis @ blocks @ basis.T).float()
    values = ep.leading_eigenvalues(lambda v: (A @ v.reshape(-1)).reshape(v.shape), (8,), k=4, iterations=200)
    lead = sorted(values[:2], key=lambda z: z.imag)
    expected = [r * cmath.exp(-1j * theta), r * cmath.exp(1j * theta)]
    assert all(abs(a - b) < 1e-6 for a, b in zip(lead, expected))
    assert abs(abs(values[2]) - 0.5) < 1e-6


TINY_EP = [*FAST, "steps=6", "eval_every=3", "checkpoint_every=2", "model.d_model=32", "model.n_head=2",
           "model.d_ff=64", "model.relax_steps=15", "nudge_steps=6"]


@pytest.mark.parametrize("estimator", ["symmetric", "holo", "bptt", "implicit"])
def test_ep_trains_through_the_cli(tmp_path, estimator):
    extra = ["n_points=2", "beta=0.02"] if estimator == "holo" else []
    result = run_cli("run", "ep", f"estimator={estimator}", *extra, *TINY_EP, "--out", "ep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "ep" / "report.json").read_text())
    assert doc["config"]["model"]["family"] == "eqformer" and doc["optimizer"]["params"]["estimator"] == estimator
    assert doc["run"]["status"] == "completed"
    first, last = (json.loads(line)["val_loss"] for line in (tmp_path / "ep" / "evals.jsonl").read_text().splitlines()[::2])
    assert first != last  # the weights moved


def test_ep_metric_reports_cosine_residuals_and_eigenvalues(tmp_path):
    result = run_cli("run", "ep", *TINY_EP, "metrics=backbone,energy", "--out", "ep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    analyzed = run_cli("analyze", str(tmp_path / "ep"), "--metric", "ep", "ep.count=2", "ep.batches=2",
                       "ep.eig_iterations=10")
    assert analyzed.returncode == 0, analyzed.stderr
    doc = json.loads((tmp_path / "ep" / "report.json").read_text())
    assert {k: v["status"] for k, v in doc["metrics"].items()} == {"backbone": "ok", "energy": "ok", "ep": "ok"}
    for row in doc["metrics"]["ep"]["tables"]["ep"]:
        assert -1 <= row["cos_all"] <= 1 and row["cos_readout"] == pytest.approx(1.0)  # readout gradients are exact
        assert row["eig_abs"] >= 0 and row["free_residual"] >= 0
    for metric, why in (("grad_structure", "needs gradients through the model's forward"),
                        ("fisher", "model family eqformer is not differentiable by autograd")):
        refused = run_cli("analyze", str(tmp_path / "ep"), "--metric", metric)
        assert refused.returncode == 2 and f"metric '{metric}' cannot apply to this run" in refused.stderr
        assert why in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_ep_run_reports_its_diagnostics_by_default_and_skips_what_cannot_apply(tmp_path):
    result = run_cli("run", "ep", *TINY_EP, "metrics=none", "ep.count=2", "ep.batches=2", "ep.eig_iterations=5", "--out", "ep",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "ep" / "report.json").read_text())
    status = {name: m["status"] for name, m in doc["metrics"].items()}
    assert status == {"backbone": "ok", "switching": "ok", "energy": "ok", "ep": "ok", "alignment": "skipped",
                      "fisher": "skipped", "interference": "skipped", "grad_structure": "skipped"}
    assert "not differentiable by autograd" in doc["metrics"]["fisher"]["reason"]
    assert doc["metrics"]["ep"]["scalars"]["mean_cos"] != 0
    assert "metrics skipped: alignment (it needs gradients" in result.stdout
    assert "## Metric `fisher`\n\n**skipped:** it needs gradients through the model's forward" in (
        tmp_path / "ep" / "report.md").read_text()
    # the gradient rule's diagnostics are in every evaluation after the first step
    rule = [e["gradient_rule"] for e in doc["evals"]]
    assert [r["batches"] for r in rule] == [1, 2, 3]
    assert all(r["skipped"] == 0 and 0 <= r["free_residual"] for r in rule)
    assert "| gradient rule since the last |" in (tmp_path / "ep" / "report.md").read_text()
    assert "| 6 | " in (tmp_path / "ep" / "report.md").read_text().split("gradient rule since the last")[1]
    assert "batches 3, nudged_residual " in (tmp_path / "ep" / "report.md").read_text()


def test_gradient_metrics_asked_for_on_ep_are_refused_before_training(tmp_path):
    result = run_cli("run", "ep", *TINY_EP, "metrics=backbone,alignment", "--out", "ep", cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "ep").exists()
    assert result.stderr.strip() == ("geobench: error: metric 'alignment' cannot apply to this run: it needs gradients "
                                     "through the model's forward, and model family eqformer is not differentiable "
                                     "by autograd")


def test_validity_gate_and_divergence_record(tmp_path):
    # a gate no free phase can pass: every batch is skipped, then the run is recorded as diverged
    result = run_cli("run", "ep", *TINY_EP, "gate=1e-12", "max_skips=3", "--out", "gated", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "gated" / "report.json").read_text())
    assert doc["run"]["status"] == "diverged" and doc["run"]["diverged_at"] == 3
    rule = doc["evals"][0]["gradient_rule"]  # the one batch before the first evaluation: skipped by the gate
    assert rule["batches"] == 1 and rule["skipped"] == 1 and rule["free_residual"] > 1e-12


def test_jacobian_penalty_and_controller():
    torch.manual_seed(0)
    model = EqFormer(ModelConfig(n_layer=1, n_head=2, d_model=8, d_ff=16, context=6), 10)
    inputs = torch.randint(0, 10, (2, 6))
    e, h, _ = ep.free_phase(model, inputs)
    model.zero_grad()
    penalty = ep.jacobian_penalty(model, e.detach(), h, 1.0, torch.Generator().manual_seed(0))
    J = torch.autograd.functional.jacobian(lambda x: model.step(x, e.detach()), h).reshape(h.numel(), h.numel())
    assert penalty == pytest.approx(float((J**2).sum()) / h.numel(), rel=0.5)  # one-sample Hutchinson estimate
    assert model.block.up.weight.grad is not None and model.block.up.weight.grad.abs().sum() > 0


def test_the_controller_raises_the_penalty_while_the_residual_is_above_target():
    from geobench.plugins.ep import optimizer as ep_plugin

    torch.manual_seed(0)
    model = EqFormer(ModelConfig(n_layer=1, n_head=2, d_model=8, d_ff=16, context=6, params={"relax_steps": 3}), 10)
    hp = {k: spec.default for k, spec in ep_plugin.PARAMS.items()} | {"jac_reg": 0.1, "jac_target": 1e-9, "gate": 10.0}
    from geobench.api import TrainingSchedule
    from geobench.plugins.ep.eqformer import LAYOUT

    optimizer = ep_plugin.build(parameters=LAYOUT.parameters(model), hp=hp, device=torch.device("cpu"),
                                schedule=TrainingSchedule(steps=3, warmup=0, tokens_per_step=12))
    inputs, targets = torch.randint(0, 10, (2, 6)), torch.randint(0, 10, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for _ in range(3):
        info = ep_plugin.gradient(model=model, optimizer=optimizer, batch=Batch(inputs, targets, mask), lam=2.0, hp=hp,
                                  scale=1.0)
        assert not info["skipped"]
    assert optimizer.param_groups[0]["jac_weight"] == pytest.approx(0.1 * 1.05**3)
