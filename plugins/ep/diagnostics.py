"""EP diagnostics (docs/science.md#ep-diagnostics) along a run of a fixed-point model: the EP estimate against the exact
gradient (cosine and norm ratio per parameter group), batch-to-batch self-cosine of each estimator,
free and nudged residuals, and the leading eigenvalues of J = ∂F/∂h at the fixed point (matrix-free
subspace iteration, which resolves a complex pair), flagging a crossing of the unit circle."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench.api import MetricPlugin, MetricResult, Param, hookimpl
from geobench.objective import lambda_at
from geobench.plugins.ep import relaxation as ep

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "steps": Param([], "checkpoints (empty: up to `count` spread over the run)", items=int),
    "count": Param(4, "checkpoints when `steps` is empty", low=1),
    "batches": Param(3, "batches per checkpoint", low=2),
    "estimator": Param(None, "EP estimator to check (none: the run's; symmetric for a run trained with an exact "
                       "gradient, bptt or implicit)", kind=str, nullable=True, choices=ep.EP_ESTIMATORS),
    "exact": Param("implicit", "the exact gradient", choices=("implicit", "bptt")),
    "eig_k": Param(4, "subspace size of the eigenvalue probe", low=2),
    "eig_iterations": Param(30, "subspace iterations", low=1),
}
GROUPS = {"embedding": ("wte.", "wpe."), "block": ("block.",), "readout": ("ln_f.",)}


def _gradient(model, rule, **kwargs) -> dict:
    """Run a gradient rule on fresh .grad buffers; the gradient per parameter group, and the rule's info."""
    model.zero_grad(set_to_none=True)
    info = rule(model, **kwargs)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return {**{g: torch.cat([v for n, v in grads.items() if n.startswith(prefixes)]) for g, prefixes in GROUPS.items()},
            "all": torch.cat(list(grads.values())), "info": info}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    hp = ctx.run_config().optimizer.params if ctx.run_config().optimizer.name == "ep" else {}
    trained_with = hp.get("estimator", "symmetric")
    estimator = options["estimator"] or (trained_with if trained_with in ep.EP_ESTIMATORS else "symmetric")
    beta, n_points, nudge = hp.get("beta", 0.05), hp.get("n_points", 4), hp.get("nudge_steps", 15)
    lam_schedule = ctx.run_config().train.lambda_schedule
    rows = []
    for step in ctx.trajectory.spread(options["steps"], options["count"]):
        model: Any = ctx.setup.model_at(step).train()  # an EqFormer (needs family:eqformer)
        lam = lambda_at(lam_schedule, step)
        est, exact, free, nudged = [], [], [], []
        for batch in ctx.setup.batches(options["batches"]):
            e, h, residual = ep.free_phase(model, batch.inputs)
            free.append(residual)
            g = _gradient(model, ep.ep_gradient, e=e, h=h, batch=batch, lam=lam, estimator=estimator, beta=beta,
                          n_points=n_points, nudge_steps=nudge)
            nudged.append(g.pop("info")["nudged_residual"])
            est.append(g)
            if options["exact"] == "implicit":
                exact_g = _gradient(model, ep.implicit_gradient, e=model.embed(batch.inputs), h=h, batch=batch, lam=lam)
            else:
                exact_g = _gradient(model, ep.bptt_gradient, batch=batch, lam=lam)
            exact_g.pop("info")
            exact.append(exact_g)
        row = {"step": step, "estimator": estimator}
        for group in ("all", *GROUPS):
            row[f"cos_{group}"] = float(np.mean([_cos(a[group], b[group]) for a, b in zip(est, exact)]))
        row["norm_ratio"] = float(np.mean([float(a["all"].norm() / b["all"].norm().clamp_min(1e-300))
                                           for a, b in zip(est, exact)]))
        row["self_cos_ep"] = float(np.mean([_cos(a["all"], b["all"]) for a, b in zip(est, est[1:])]))
        row["self_cos_exact"] = float(np.mean([_cos(a["all"], b["all"]) for a, b in zip(exact, exact[1:])]))
        row["free_residual"], row["nudged_residual"] = float(np.mean(free)), float(np.mean(nudged))
        inputs = next(iter(ctx.setup.batches(1)))[0]
        values = ep.jacobian_spectrum(model, inputs, options["eig_k"], options["eig_iterations"])
        lead = values[0]
        row.update(eig_abs=abs(lead), eig_real=lead.real, eig_imag=lead.imag,
                   outside_unit_circle=abs(lead) >= 1)
        rows.append(row)
    crossed = [r["step"] for r in rows if r["outside_unit_circle"]]
    scalars = {"mean_cos": float(np.mean([r["cos_all"] for r in rows])), "min_cos": float(min(r["cos_all"] for r in rows)),
               "max_eig_abs": float(max(r["eig_abs"] for r in rows)), "crossed_unit_circle": int(bool(crossed)),
               "first_crossing_step": int(crossed[0]) if crossed else None}
    checked = "chosen with ep.estimator" if options["estimator"] else (
        "the run's" if estimator == trained_with else f"the run trained with the exact {trained_with} gradient")
    variant = f"EP estimator {estimator} ({checked}) against the {options['exact']} gradient"
    return MetricResult(scalars=scalars, tables={"ep": rows}, figures=[plot(ctx, rows)], variant=variant)


def plot(ctx, rows) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for group in ("all", *GROUPS):
        left.plot(steps, [r[f"cos_{group}"] for r in rows], marker="o", ms=3, label=group)
    left.set_ylim(-1.02, 1.02)
    left.set_xlabel("step")
    left.set_ylabel("cos(g_EP, g_exact)")
    left.legend(fontsize=7)
    right.plot(steps, [r["eig_abs"] for r in rows], marker="o")
    right.axhline(1.0, color="red", ls="--", label="unit circle")
    right.set_xlabel("step")
    right.set_ylabel("|λ_max| of ∂F/∂h")
    right.legend()
    fig.tight_layout()
    return ctx.figure(fig, "ep")


def comparison_figures(*, runs, groups, references, plt, save) -> None:
    """cos(g_EP, g_exact) by checkpoint, every run on one axis."""
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run in runs:
        table = run.result.tables["ep"]
        ax.plot([r["step"] for r in table], [r["cos_all"] for r in table], marker="o", ms=3, color=run.colour,
                label=run.label)
    ax.set_xlabel("step")
    ax.set_ylabel("cos(g_EP, g_exact)")
    ax.set_ylim(-1.02, 1.02)
    ax.legend(fontsize=7)
    save(fig, "ep_cosine", caption="The cosine between the EP gradient estimate and the exact gradient at every "
                                   "measured checkpoint of every run (1: EP follows the true gradient).")


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("ep", "EP vs exact gradient, estimator self-cosine, residuals, leading Jacobian eigenvalue",
                          OPTIONS, compute, needs=("checkpoints", "model", "data", "family:eqformer"),
                          columns={"ep_cos": ("mean_cos", "cos(EP, exact)")}, comparison_figures=comparison_figures,
                          terms={"cos(EP, exact)": "the cosine between the equilibrium-propagation gradient estimate "
                                                   "and the exact gradient, averaged over checkpoints (mean_cos)",
                                 "residual": "‖F(h) − h‖ / ‖h‖ at the fixed point of the free or nudged phase",
                                 "|λ_max|": "the modulus of the leading eigenvalue of ∂F/∂h at the fixed point; "
                                            "above 1 the relaxation no longer converges"}))


