"""Fisher / Rayleigh quotients (docs/science.md#fisher): with G the M×D matrix of per-batch trunk gradients of the
composite loss at a checkpoint, q(v) = (1/M)‖G v‖² along the backbone against random directions
orthogonal to it (anisotropy α), and the top Fisher eigenvector from the M×M Gram G Gᵀ/M."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench.api import BACKBONE_CHECKPOINTS, SCOPE, MetricPlugin, MetricResult, Param, hookimpl, seed_param

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "scope": SCOPE,
    "steps": Param([], "checkpoints to measure at (empty: up to `count` spread over the run)", items=int),
    "count": Param(5, "checkpoints when `steps` is empty", low=1),
    "from_step": Param(0, "with `steps` empty: spread the checkpoints over those at or after this step (the source: "
                          "200, so that its 50 checkpoints are 200, 400, ..., 10000)", low=0),
    "batches": Param(32, "per-batch gradients M", low=2),
    "backbone": Param("rownorm", "v_b of the row-normalized or the raw PCA (the source: raw)", choices=("rownorm", "raw")),
    "lam": Param(None, "λ of the composite loss (none: the schedule's λ at each checkpoint; the source: 2)",
                 kind=float, nullable=True, low=0),
    "random_directions": Param(10, "random unit directions orthogonal to v_b", low=1),
    "seed": seed_param(0, "seed of the random directions"),
}


def rayleigh(G: torch.Tensor, v: torch.Tensor) -> float:
    """q(v) = (1/M) ‖G v‖² for a unit v."""
    return float((G @ v).pow(2).sum() / G.shape[0])


def fisher_summary(G: torch.Tensor, v_b: torch.Tensor, n_random: int, generator: torch.Generator) -> dict:
    v_b = v_b / v_b.norm()
    q_b = rayleigh(G, v_b)
    q_random = []
    for _ in range(n_random):
        u = torch.randn(v_b.shape, generator=generator, dtype=v_b.dtype).to(v_b.device)
        u = u - torch.dot(u, v_b) * v_b
        q_random.append(rayleigh(G, u / u.norm()))
    K = (G @ G.T).double().cpu() / G.shape[0]
    values, vectors = torch.linalg.eigh(K)
    top = (G.T.double() @ vectors[:, -1].to(G.device)).to(v_b.dtype)
    top = top / top.norm()
    return {"q_b": q_b, "q_random": float(np.mean(q_random)), "anisotropy": q_b / float(np.mean(q_random)),
            "top_eigenvalue": float(values[-1]), "top_overlap": abs(float(torch.dot(top, v_b))),
            "trace": float(K.trace())}


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    bb = ctx.trajectory.backbone(options["scope"])
    names = bb.gram.names
    direction = (bb.pca if options["backbone"] == "rownorm" else bb.pca_raw).directions[0]
    v_b = ctx.setup.flatten(ctx.trajectory.materialize(bb.gram, direction), names)
    generator = torch.Generator().manual_seed(options["seed"])
    lam = options["lam"]
    rows = []
    for step in ctx.trajectory.spread(options["steps"], options["count"], options["from_step"]):
        G = torch.stack(list(ctx.setup.batch_gradients(step, names, options["batches"], lam=lam)))
        rows.append({"step": step, **fisher_summary(G, v_b, options["random_directions"], generator)})
        del G
    peak = max(rows, key=lambda r: r["anisotropy"])
    scalars = {"max_anisotropy": peak["anisotropy"], "max_anisotropy_step": peak["step"],
               "q_b_first": rows[0]["q_b"], "q_b_last": rows[-1]["q_b"]}
    variant = (f"{options['batches']} per-batch gradients of the composite loss with "
               + (f"λ = {lam:g}" if lam is not None else "the schedule's λ at each checkpoint")
               + f"; the {'row-normalized' if options['backbone'] == 'rownorm' else 'raw'} v_b of the {options['scope']} PCA")
    return MetricResult(scalars=scalars, tables={"fisher": rows}, figures=[plot(ctx, rows)], variant=variant)


def plot(ctx, rows) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in rows]
    left.semilogy(steps, [r["q_b"] for r in rows], marker="o", label="q(v_b)")
    left.semilogy(steps, [r["q_random"] for r in rows], marker="o", label="mean q(u), u ⊥ v_b")
    left.set_xlabel("step")
    left.set_ylabel("Rayleigh quotient q(v) = ‖G v‖² / M")
    left.legend()
    right.plot(steps, [r["anisotropy"] for r in rows], marker="o")
    right.set_xlabel("step")
    right.set_ylabel("anisotropy α = q(v_b) / mean q(u)")
    fig.tight_layout()
    return ctx.figure(fig, "fisher", caption=(
        "Left: the empirical Fisher's curvature along the backbone, q(v_b), and along random directions orthogonal "
        "to it (log scale). Right: their ratio, the anisotropy α."))


TERMS = {
    "q(v)": "‖G v‖² / M, the Rayleigh quotient of the empirical Fisher, G the M single-batch gradients of the "
            "composite loss at a checkpoint",
    "max Fisher anisotropy α": "the largest over checkpoints of q(v_b) / mean q(u), u random unit vectors orthogonal "
                               "to v_b (max_anisotropy)",
    "top_overlap": "|⟨u₁, v_b⟩|, u₁ the Fisher's top eigenvector",
}


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("fisher", "Rayleigh quotients along v_b, anisotropy, top Fisher eigenvector",
                          OPTIONS, compute, default=True, needs=("checkpoints", "model", "data", "gradients"),
                          min_checkpoints=BACKBONE_CHECKPOINTS,
                          columns={"fisher_anisotropy": ("max_anisotropy", "max Fisher anisotropy α")}, terms=TERMS))
