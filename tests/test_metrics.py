"""Every metric against an independent computation on the materialized trajectory (numpy), or on a
case with a known answer."""

import numpy as np
import pytest
import torch

from geobench import series
from geobench.analysis import metric_options, run_metrics
from geobench.api import EvalRecord, UsageError
from geobench.objective import composite_loss, lambda_at, lm_and_probe_losses
from geobench.plugins.metrics import fisher, grad_structure, switching
from geobench.registry import installed
from geobench.runner import open_analysis


def options(name, **given):
    return metric_options([name], {f"{name}.{k}": v for k, v in given.items()}, installed())[name]


@pytest.fixture(scope="module")
def ctx(trained_run):
    return open_analysis(trained_run.path, installed())


@pytest.fixture(scope="module")
def trajectory(ctx):
    """The trunk trajectory materialized: steps, rows θ_t (T × D) in float64."""
    steps = ctx.trajectory.checkpoint_steps()
    names = ctx.trajectory.scope("trunk")
    thetas = np.stack([np.concatenate([ctx.trajectory.load_checkpoint(s)[n].double().numpy().ravel() for n in names])
                       for s in steps])
    return steps, names, thetas


def numpy_pca(rows, normalize):
    if normalize:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    ratios = s**2 / (s**2).sum()
    v = vt[0] if vt[0] @ rows[-1] > 0 else -vt[0]
    return ratios, v


def test_backbone_against_numpy(ctx, trajectory):
    steps, _, thetas = trajectory
    result = run_metrics(ctx, ["backbone"], options={"backbone": options("backbone", rotation_window=5)})["backbone"]
    assert result.status == "ok", result.error
    delta = thetas[1:] - thetas[0]  # anchored at the first checkpoint (Θ₀ = step 1)
    ratios, v_b = numpy_pca(delta, normalize=True)
    ratios_raw, _ = numpy_pca(delta, normalize=False)
    s = result.scalars
    assert s["pc1"] == pytest.approx(ratios[0], abs=1e-6)
    assert s["pc1_raw"] == pytest.approx(ratios_raw[0], abs=1e-6)
    assert s["k95"] == int(np.searchsorted(np.cumsum(ratios), 0.95) + 1)
    assert s["drift"] == pytest.approx(np.linalg.norm(delta[-1]), rel=1e-6)
    full = thetas - thetas[0]
    a = full @ v_b
    np.testing.assert_allclose(result.series["a"], a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.series["r_norm"], np.linalg.norm(full - np.outer(a, v_b), axis=1),
                               rtol=1e-4, atol=1e-6)
    assert result.series["a"][-1] > 0  # sign convention
    # rotation: sliding windows of 5 checkpoints after Θ₀, stride one, each anchored at its own first
    backbones = []
    for start in range(1, len(steps) - 4):
        window = thetas[start + 1:start + 5] - thetas[start]
        backbones.append(numpy_pca(window, normalize=True)[1])
    expected_rho = [abs(u @ v) for u, v in zip(backbones, backbones[1:])]
    assert len(expected_rho) == len(steps) - 1 - 5
    np.testing.assert_allclose(result.series["rotation_rho"], expected_rho, atol=1e-6)
    assert s["rotation_mean"] == pytest.approx(np.mean(expected_rho), abs=1e-6)
    assert s["rotation_min"] == pytest.approx(np.min(expected_rho), abs=1e-6)
    # PC1 with the top-10 denominator, as the source published its trunk PC1
    _, sv, _ = np.linalg.svd(delta / np.linalg.norm(delta, axis=1, keepdims=True), full_matrices=False)
    assert s["pc1_top10"] == pytest.approx(sv[0] ** 2 / (sv[:10] ** 2).sum(), abs=1e-6)
    # power laws in half-open windows, against numpy's polyfit on the same points
    for row in result.tables["fits"]:
        inside = [i for i, t in enumerate(steps) if row["start"] < t <= row["end"] and abs(a[i]) > 0]
        if len(inside) >= 2:
            slope = np.polyfit(np.log(np.array(steps)[inside]), np.log(np.abs(a[inside])), 1)[0]
            assert row["gamma_a"] == pytest.approx(slope, abs=1e-6)
    blocks = {row["block"]: row["pc1"] for row in result.tables["per_block"]}
    assert set(blocks) == {0, 1} and all(0 < v <= 1 for v in blocks.values())


def test_backbone_window_needs_checkpoints(ctx):
    with pytest.raises(UsageError, match=r"holds 0 checkpoints.*at least 3"):
        ctx.trajectory.backbone("trunk", (1000, 2000))
    with pytest.raises(UsageError, match="scope='heads' is not one of"):
        ctx.trajectory.scope("heads")
    with pytest.raises(UsageError, match="matches no parameter"):
        ctx.trajectory.scope("block:7")


def test_alignment_against_numpy(ctx, trajectory):
    steps, names, thetas = trajectory
    result = run_metrics(ctx, ["alignment"], options={"alignment": options("alignment", control_batches=3)})["alignment"]
    assert result.status == "ok", result.error
    _, v_b = numpy_pca(thetas[1:] - thetas[0], normalize=True)
    updates = np.diff(thetas, axis=0)
    expected = updates @ v_b / np.linalg.norm(updates, axis=1)
    np.testing.assert_allclose(result.series["cos"], expected, atol=1e-6)
    # the control, recomputed with a plain backward pass
    model = ctx.setup.model_at(steps[-1])
    lam = lambda_at(ctx.config.train.lambda_schedule, steps[-1])
    params = dict(model.named_parameters())
    for cos, (inputs, targets, mask) in zip(result.series["control_cos"], ctx.setup.batches(3)):
        model.zero_grad()
        composite_loss(model(inputs), targets, mask, lam).backward()
        g = np.concatenate([params[n].grad.double().numpy().ravel() for n in names])
        assert cos == pytest.approx(g @ v_b / np.linalg.norm(g), abs=1e-5)


def test_alignment_over_a_fixed_step_interval_against_numpy(ctx, trajectory):
    """The source's β₂ table: u_s = θ_s − θ_(s−N) at the checkpoints that have one N steps earlier."""
    steps, _, thetas = trajectory
    result = run_metrics(ctx, ["alignment"], options={"alignment": options("alignment", interval=4,
                                                                           control_batches=0)})["alignment"]
    assert result.status == "ok", result.error
    _, v_b = numpy_pca(thetas[1:] - thetas[0], normalize=True)
    later = [s for s in steps if s - 4 in steps]
    updates = np.stack([thetas[steps.index(s)] - thetas[steps.index(s - 4)] for s in later])
    assert result.series["steps"] == later and len(later) < len(steps) - 1
    np.testing.assert_allclose(result.series["cos"], updates @ v_b / np.linalg.norm(updates, axis=1), atol=1e-6)
    assert "θ_(s−4)" in result.variant


def test_alignment_source_variant_against_numpy(ctx, trajectory):
    """docs/FIDELITY.md: per block against the block's RAW v_b; the control on block 0 at several checkpoints."""
    steps, _, _ = trajectory
    opts = options("alignment", backbone="raw", per_block=True, control_scope="block:0", control_batches=2,
                   control_checkpoints=2)
    result = run_metrics(ctx, ["alignment"], options={"alignment": opts})["alignment"]
    assert result.status == "ok", result.error

    def block_rows(i):
        names = ctx.trajectory.scope(f"block:{i}")
        return names, np.stack([np.concatenate([ctx.trajectory.load_checkpoint(s)[n].double().numpy().ravel() for n in names])
                                for s in steps])

    for row in result.tables["per_block"]:
        _, thetas = block_rows(row["block"])
        _, v_raw = numpy_pca(thetas[1:] - thetas[0], normalize=False)
        updates = np.diff(thetas, axis=0)
        expected = np.abs(updates @ v_raw / np.linalg.norm(updates, axis=1))
        assert row["mean_abs_cos"] == pytest.approx(expected.mean(), abs=1e-6)
    names, thetas = block_rows(0)
    _, v_raw = numpy_pca(thetas[1:] - thetas[0], normalize=False)
    at = ctx.trajectory.spread([], 2)
    assert at == [steps[0], steps[-1]] and result.scalars["control_checkpoints"] == 2
    expected = []
    for step in at:
        model = ctx.setup.model_at(step)
        lam = lambda_at(ctx.config.train.lambda_schedule, step)
        params = dict(model.named_parameters())
        for inputs, targets, mask in ctx.setup.batches(2):
            model.zero_grad()
            composite_loss(model(inputs), targets, mask, lam).backward()
            g = np.concatenate([params[n].grad.double().numpy().ravel() for n in names])
            expected.append(g @ v_raw / np.linalg.norm(g))
    np.testing.assert_allclose(result.series["control_cos"], expected, atol=1e-5)
    assert "raw v_b" in result.variant and "block:0 scope" in result.variant


def test_fisher_with_a_fixed_lambda_and_the_raw_backbone(ctx, trajectory):
    steps, names, thetas = trajectory
    result = run_metrics(ctx, ["fisher"], options={"fisher": options(
        "fisher", steps=[steps[-1]], batches=3, random_directions=2, backbone="raw", lam=2.0)})["fisher"]
    assert result.status == "ok", result.error
    _, v_raw = numpy_pca(thetas[1:] - thetas[0], normalize=False)
    model = ctx.setup.model_at(steps[-1])
    params = dict(model.named_parameters())
    G = []
    for inputs, targets, mask in ctx.setup.batches(3):
        model.zero_grad()
        composite_loss(model(inputs), targets, mask, 2.0).backward()
        G.append(np.concatenate([params[n].grad.double().numpy().ravel() for n in names]))
    q_b = np.mean((np.array(G) @ v_raw) ** 2)
    assert result.tables["fisher"][0]["q_b"] == pytest.approx(q_b, rel=1e-4)
    assert "λ = 2" in result.variant and "raw v_b" in result.variant


def test_fisher_checkpoints_from_a_step_on(ctx, trajectory):
    """The source's set: 50 checkpoints from step 200 on, where count=50 alone takes step 1 in."""
    steps, _, _ = trajectory
    later = [s for s in steps if s >= 10]
    assert ctx.trajectory.spread([], len(later), first=10) == later
    assert ctx.trajectory.spread([], len(later)) != later and ctx.trajectory.spread([], len(later))[0] == steps[0]
    result = run_metrics(ctx, ["fisher"], options={"fisher": options(
        "fisher", count=3, from_step=10, batches=2, random_directions=1)})["fisher"]
    assert result.status == "ok", result.error
    chosen = [row["step"] for row in result.tables["fisher"]]
    assert len(chosen) == 3 and min(chosen) >= 10 and chosen[-1] == steps[-1]


def test_bootstrap_sigma_of_a_rate_and_of_a_paired_difference():
    rng = np.random.default_rng(0)
    same = rng.random(200) < 0.5
    assert series.bootstrap_sigma(same, 20, rng, paired_with=same) == 0.0
    a, b = rng.random(2000) < 0.6, rng.random(2000) < 0.4
    sigma = series.bootstrap_sigma(a, 200, rng, paired_with=b)
    assert sigma == pytest.approx(np.sqrt(0.6 * 0.4 / 2000 + 0.4 * 0.6 / 2000), rel=0.25)
    assert series.bootstrap_sigma(a, 300, rng) == pytest.approx(np.sqrt(0.6 * 0.4 / 2000), rel=0.25)
    assert [series.tier(d, 0.01) for d in (0.031, 0.02, 0.019)] == ["A", "B", "C"]


def planted_evals(steps):
    """p_ood with two clear switches (peaks at checkpoints 3 and 10, troughs at 5 and 12)."""
    level = {3: 0.6, 10: 0.6, 5: 0.05, 12: 0.05}
    return [EvalRecord(step=s, p_ood=level.get(i, 0.3)) for i, s in enumerate(steps)]


@pytest.mark.parametrize("variant, e2_6", [("rownorm", "residual"), ("raw", "residual"), ("rownorm", "whole")])
def test_switch_directions_against_numpy(ctx, trajectory, monkeypatch, variant, e2_6):
    steps, names, thetas = trajectory
    monkeypatch.setattr(type(ctx), "evals", property(lambda self: planted_evals(steps)))
    result = switching.compute(ctx=ctx.context(installed().metric("switching")),
                               options=options("switching", resamples=5, backbone=variant, per_block=True,
                                               sigma="last", e2_6=e2_6))
    delta = thetas[1:] - thetas[0]
    rows = delta / np.linalg.norm(delta, axis=1, keepdims=True) if variant == "rownorm" else delta
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    v_b = vt[0] if vt[0] @ delta[-1] > 0 else -vt[0]
    found = result.tables["switches"]
    assert [(r["peak"], r["trough"]) for r in found] == [(steps[3], steps[5]), (steps[10], steps[12])]
    for r in found:
        v = thetas[steps.index(r["peak"])] - thetas[steps.index(r["trough"])]
        v /= np.linalg.norm(v)
        assert r["abs_cos_vb"] == pytest.approx(abs(v @ v_b), abs=1e-6)
        perp = v - (v @ v_b) * v_b
        perp /= np.linalg.norm(perp)
        whole = sum((v @ vt[k]) ** 2 for k in range(1, 6))  # residual_decomposition.py's
        residual = sum((perp @ vt[k]) ** 2 for k in range(1, 6))  # update_alignment.py's
        assert r["e2_6"] == pytest.approx(whole if e2_6 == "whole" else residual, abs=1e-6)
        assert whole == pytest.approx(residual * (1 - (v @ v_b) ** 2), abs=1e-9)  # the two differ by 1 − cos²
        assert r["tier"] == series.tier(r["delta_p"], r["sigma_last"]) and r["sigma_paired"] >= 0
    # per block: each block's own trajectory PCA, LayerNorms included
    offsets = np.cumsum([0] + [int(np.prod(ctx.trajectory.parameter_shapes[n])) for n in ctx.trajectory.scope("all")])
    everything = np.stack([np.concatenate([ctx.trajectory.load_checkpoint(s)[n].double().numpy().ravel()
                                           for n in ctx.trajectory.scope("all")]) for s in steps])
    index = {n: (offsets[i], offsets[i + 1]) for i, n in enumerate(ctx.trajectory.scope("all"))}
    for r in result.tables["per_block"]:
        cols = np.concatenate([np.arange(*index[n]) for n in ctx.trajectory.scope(f"block:{r['block']}")])
        block = everything[:, cols]
        d = block[1:] - block[0]
        rows = d / np.linalg.norm(d, axis=1, keepdims=True) if variant == "rownorm" else d
        vb = np.linalg.svd(rows, full_matrices=False)[2][0]
        v = block[steps.index(r["peak"])] - block[steps.index(r["trough"])]
        assert r["abs_cos_vb"] == pytest.approx(abs(v @ vb) / np.linalg.norm(v), abs=1e-6)
    assert "raw PCA" in result.variant if variant == "raw" else "row-normalized PCA" in result.variant


def test_switching_on_a_run_that_stopped_early_has_no_signal(ctx, monkeypatch):
    monkeypatch.setattr(type(ctx), "evals", property(lambda self: [EvalRecord(step=1, p_ood=0.0)]))
    result = switching.compute(ctx=ctx.context(installed().metric("switching")), options=options("switching"))
    assert result.no_signal == ("no switching to detect: 1 evaluation of p_ood (the last at step 1); the detector "
                                "needs at least 3")
    assert result.scalars == {"n_switches": 0}


def test_fisher_summary_against_an_explicit_fisher_matrix():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(6, 9)) * np.linspace(3, 0.1, 9)
    F = G.T @ G / 6
    v_b = rng.normal(size=9)
    v_b /= np.linalg.norm(v_b)
    gen = torch.Generator().manual_seed(0)
    out = fisher.fisher_summary(torch.from_numpy(G).float(), torch.from_numpy(v_b).float(), 10, gen)
    assert out["q_b"] == pytest.approx(v_b @ F @ v_b, rel=1e-5)
    assert out["trace"] == pytest.approx(np.trace(F), rel=1e-5)
    values, vectors = np.linalg.eigh(F)
    assert out["top_eigenvalue"] == pytest.approx(values[-1], rel=1e-5)
    assert out["top_overlap"] == pytest.approx(abs(vectors[:, -1] @ v_b), abs=1e-5)
    # random unit directions orthogonal to v_b average to (tr F − q_b) / (D − 1)
    out = fisher.fisher_summary(torch.from_numpy(G).double(), torch.from_numpy(v_b), 4000, gen)
    assert out["q_random"] == pytest.approx((np.trace(F) - v_b @ F @ v_b) / 8, rel=0.1)


def test_fisher_and_interference_on_the_run(ctx, trajectory):
    steps, names, _ = trajectory
    results = run_metrics(ctx, ["fisher", "interference"], options={
        "fisher": options("fisher", steps=[steps[-1]], batches=4, random_directions=3),
        "interference": options("interference", steps=[steps[-1]], batches=2)})
    assert results["fisher"].status == "ok", results["fisher"].error
    row = results["fisher"].tables["fisher"][0]
    assert row["step"] == steps[-1] and row["anisotropy"] > 0 and 0 <= row["top_overlap"] <= 1
    inter = results["interference"]
    assert inter.status == "ok", inter.error
    model = ctx.setup.model_at(steps[-1])
    params = [dict(model.named_parameters())[n] for n in names]
    cosines = []
    for inputs, targets, mask in ctx.setup.batches(40):
        if not bool((mask & (targets >= 0)).any()):
            continue
        lm, probe = lm_and_probe_losses(model(inputs), targets, mask)
        g_lm = torch.cat([g.flatten() for g in torch.autograd.grad(lm, params, retain_graph=True)])
        g_probe = torch.cat([g.flatten() for g in torch.autograd.grad(probe, params)])
        cosines.append(float(torch.nn.functional.cosine_similarity(g_lm, g_probe, dim=0)))
        if len(cosines) == 2:
            break
    assert inter.tables["interference"][0]["cos_lm_probe"] == pytest.approx(np.mean(cosines), abs=1e-5)


def test_per_token_gradients_equal_one_backward_per_token(ctx):
    model = ctx.setup.model_at(ctx.trajectory.checkpoint_steps()[-1])
    module = model.blocks[-1].mlp.down
    inputs, targets = ctx.setup.evaluator.val_batches[0]
    inputs, targets = inputs[:2, :20], targets[:2, :20]
    grads, entropy, _, positions = grad_structure.per_token_gradients(model, module, 3, inputs, targets, ctx.setup.autocast)
    flat_targets = targets.flatten()
    for k in (0, 5, len(positions) - 1):
        b, t = divmod(int(positions[k]), targets.shape[1])
        model.zero_grad()
        log_p = torch.log_softmax(model(inputs[b:b + 1])[0, t].float(), -1)[flat_targets[positions[k]]]
        log_p.backward()
        torch.testing.assert_close(grads[k], module.weight.grad[3], rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            probs = torch.softmax(model(inputs[b:b + 1])[0, t].float(), -1)
        assert float(entropy[k]) == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-4)


def test_spectrum_and_split_band_on_known_matrices():
    M = np.diag([3.0, 1.0, 1.0, 0.0])[:3]  # σ² = 9, 1, 1
    spec = grad_structure.spectrum(M)
    assert spec["participation_ratio"] == pytest.approx(121 / 83)
    assert spec["rank95"] == 3
    assert abs(spec["top"][0]) == pytest.approx(1.0)
    rank_one = np.outer(np.arange(1, 9), [1.0, 2.0, 0.0])
    assert grad_structure.spectrum(rank_one)["participation_ratio"] == pytest.approx(1.0)
    same = np.tile([1.0, 0.0], (6, 1))
    assert grad_structure.split_band([same], 5, np.random.default_rng(0)) == [pytest.approx(1.0)] * 2


def test_grad_structure_on_the_run(ctx):
    result = run_metrics(ctx, ["grad_structure"], options={"grad_structure": options("grad_structure", tokens=200)})
    out = result["grad_structure"]
    assert out.status == "ok", out.error
    buckets = out.tables["buckets"]
    assert len(buckets) == 5 and sum(b["tokens"] for b in buckets) == 200
    cross = np.array(out.series["cross_bucket_cos"])
    np.testing.assert_allclose(np.diag(cross), 1.0, atol=1e-5)
    np.testing.assert_allclose(cross, cross.T, atol=1e-6)
    probe = out.tables["probe"][0]
    assert probe["prompt"] == "all" and probe["correct"] + probe["incorrect"] == 40
    # the comparison needs min_group retrievals on each side; fewer: no cosine, and a note says why
    few = min(probe["correct"], probe["incorrect"])
    strict = run_metrics(ctx, ["grad_structure"], options={"grad_structure": options(
        "grad_structure", tokens=200, min_group=few + 1)})["grad_structure"]
    assert strict.scalars["probe_cos_correct_incorrect"] is None
    assert strict.notes == [f"correct vs incorrect not compared: {probe['correct']} correct and {probe['incorrect']} "
                            f"incorrect retrievals, and each side needs {few + 1} (grad_structure.min_group)"]


def test_reheat_summary_on_a_known_curve():
    from geobench.plugins.metrics.reheat import summarize

    evals = [EvalRecord(step=0, p_ood=0.1), EvalRecord(step=1, p_ood=0.05), EvalRecord(step=200, p_ood=0.65),
             EvalRecord(step=400, p_ood=0.8), EvalRecord(step=600, p_ood=0.7)]
    assert summarize(evals, 0.6) == {"start_p_ood": 0.1, "peak_p_ood": 0.8, "peak_step": 400,
                                     "first_step_at_threshold": 200, "final_p_ood": 0.7,
                                     "gain": pytest.approx(0.7), "diverged": False}
    assert summarize(evals[:2], 0.6)["gain"] == 0.0 and summarize(evals[:2], 0.6)["first_step_at_threshold"] is None
    # the source's β₂ table: the peak over the evaluations after the start, so a reheat that only loses is negative
    falling = [EvalRecord(step=0, p_ood=0.5), EvalRecord(step=1, p_ood=0.3), EvalRecord(step=200, p_ood=0.4)]
    assert summarize(falling, 0.6)["gain"] == 0.0 and summarize(falling, 0.6)["peak_step"] == 0
    after = summarize(falling, 0.6, "after_start")
    assert after["peak_step"] == 200 and after["gain"] == pytest.approx(-0.1)
    assert summarize(evals, 0.6, "after_start") == summarize(evals, 0.6)  # a peak after the start: the same


def test_a_reheat_may_train_at_another_probe_rate(ctx):
    said: list[str] = []
    result = run_metrics(ctx, ["reheat"], options={"reheat": options(
        "reheat", steps=2, warmup=1, eval_every=2, lrs="[1e-3]", p_probe=0.0)}, say=said.append)["reheat"]
    assert result.status == "ok", result.error
    # a line as each derived run starts and ends: a reheat or a basin can take minutes
    assert said[:2] == ["geobench: metric 1/1 reheat: computing",
                        "geobench:   derived run reheat-from30-lr0.001 (from step 30, 2 steps): training"]
    assert said[2].startswith("geobench:   derived run reheat-from30-lr0.001: done in ")
    derived = ctx.run.path / "derived" / "reheat-from30-lr0.001"
    assert "p_probe: 0.0" in (derived / "config.yaml").read_text() and "p_probe 0;" in result.variant
    with pytest.raises(UsageError, match="must keep the probe settings"):
        ctx.retrain(step=ctx.trajectory.checkpoint_steps()[-1], name="other-gap", overrides={"probe.train_gap": [1, 2]})


def test_reheat_trains_a_fresh_optimizer_and_leaves_the_source_alone(ctx):
    import hashlib

    checkpoints = sorted(ctx.run.checkpoints.iterdir())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoints}
    source_final = ctx.evals[-1]
    result = run_metrics(ctx, ["reheat"], options={"reheat": options(
        "reheat", steps=4, warmup=1, eval_every=2, lrs="[1e-3, 3e-4]")})["reheat"]
    assert result.status == "ok", result.error
    rows = result.tables["reheat"]
    assert [r["lr"] for r in rows] == [1e-3, 3e-4]
    for r in rows:
        assert r["gain"] >= 0 and r["peak_p_ood"] >= r["start_p_ood"]
        assert r["start_p_ood"] == pytest.approx(source_final.p_ood)  # the start is the checkpoint itself
    assert {c["step"] for c in result.tables["curves"]} == {0, 1, 2, 4}
    derived = ctx.run.path / "derived" / "reheat-from30-lr0.001"
    assert (derived / "evals.jsonl").exists() and "lambda_schedule:\n  - - 0\n    - 4.0" in (derived / "config.yaml").read_text()
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ctx.run.checkpoints.iterdir())}
    assert after == before
    with pytest.raises(UsageError, match="has no checkpoint at step 7"):
        ctx.retrain(step=7, name="nowhere", overrides={})


def test_basin_perturbation_and_tests(ctx):
    from geobench.plugins.metrics.basin import perturbation

    model = ctx.setup.model_at(ctx.trajectory.checkpoint_steps()[-1])
    w = model.blocks[0].mlp.up.weight
    before = w.detach().clone()
    with torch.no_grad():
        perturbation(0.0, 0, ctx.trajectory.scope("trunk"))(model)
    assert torch.equal(w, before)
    with torch.no_grad():
        perturbation(0.3, 0, ctx.trajectory.scope("trunk"))(model)
    noise = (w.detach() - before) / (0.3 * before.pow(2).mean().sqrt())
    assert abs(float(noise.std()) - 1) < 0.05 and abs(float(noise.mean())) < 0.05

    result = run_metrics(ctx, ["basin"], options={"basin": options(
        "basin", recovery_steps=2, relax_steps=2, relax_batch=4, sigmas="[0, 0.3]", eval_every=1, threshold=0.0,
        recovery_grad_accum=2)})["basin"]
    assert result.status == "ok", result.error
    b1 = sorted((ctx.run.path / "derived").glob("b1-from*"))
    assert b1 and all("grad_accum: 2\n" in (d / "config.yaml").read_text() for d in b1)  # the B1 batch, as asked
    assert all(r["steps_to_threshold"] == 0 for r in result.tables["b1_recovery"])  # threshold 0: at the start
    assert [r["sigma"] for r in result.tables["b6_depth"]] == [0.0, 0.3]
    assert all(0 <= r["depth"] <= 1 for r in result.tables["b6_depth"])


def test_the_gradient_control_at_given_checkpoints(ctx, trajectory):
    steps, _, _ = trajectory
    chosen = [steps[0], steps[3], steps[-1]]
    result = run_metrics(ctx, ["alignment"], options={"alignment": options(
        "alignment", control_batches=1, control_steps=chosen)})["alignment"]
    assert result.status == "ok", result.error
    assert result.scalars["control_checkpoints"] == 3 and len(result.series["control_cos"]) == 3
    assert f"({', '.join(map(str, chosen))})" in result.variant
