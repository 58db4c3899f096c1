"""Per-token gradient structure (docs/science.md#gradient-structure, after the nanochat "Exp 1+2" probes).

Per-token gradients of log p(target) with respect to one weight row, bucketed by the predictive
entropy of the token (quantiles over all tokens): per bucket the participation ratio, rank95 and the
top right singular vector of the uncentered gradient matrix, and the signed cosine between buckets'
top vectors. On the probe task: cos(mean gradient of correct retrievals, mean gradient of incorrect
ones) against a control band from random half-splits within each group.

The row belongs to a Linear of the LAST block (mlp.down by default, or attn.proj): after it only
position-wise layers act, so one backward pass of Σ_t log p(y_t) gives every token's own gradient
exactly, g_t = δ_t[row] · x_t, with x_t the layer's input and δ_t the gradient at its output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench.api import MetricPlugin, MetricResult, Param, UsageError, hookimpl, seed_param
from geobench.objective import token_losses

if TYPE_CHECKING:
    from geobench.api import MetricContext


OPTIONS = {
    "weight": Param("mlp.down", "Linear of the last block whose row is probed", choices=("mlp.down", "attn.proj")),
    "row": Param(0, "row (output unit) of that weight", low=0),
    "step": Param(None, "checkpoint (none: the last)", kind=int, nullable=True, low=1),
    "tokens": Param(4096, "validation tokens to collect", low=10),
    "buckets": Param(5, "entropy-quantile buckets", low=2),
    "resamples": Param(20, "random half-splits for the control band", low=1),
    "min_group": Param(10, "correct and incorrect retrievals each needs before their mean gradients are compared",
                       low=1),
    "seed": seed_param(0, "seed of the half-splits"),
}


def per_token_gradients(model, module, row: int, inputs: torch.Tensor, targets: torch.Tensor, autocast):
    """(gradients (N, d_in) of log p(target) for every non-pad token, entropies (N,), argmax-correct (N,),
    flat positions (N,) into the (B, T) batch)."""
    captured = {}

    def hook(mod, args, output):
        captured["x"] = args[0]
        output.retain_grad()
        captured["out"] = output

    handle = module.register_forward_hook(hook)
    try:
        with autocast:
            logits = model(inputs)
        valid = targets >= 0
        log_p_sum = -(token_losses(logits, targets) * valid).sum()
        log_p_sum.backward()
    finally:
        handle.remove()
    delta = captured["out"].grad[..., row].float()                  # (B, T)
    x = captured["x"].detach().float()                              # (B, T, d_in)
    grads = (delta.unsqueeze(-1) * x)[valid]
    probs = torch.softmax(logits.detach().float(), dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)[valid]
    correct = (logits.detach().argmax(-1) == targets)[valid]
    positions = torch.nonzero(valid.flatten()).flatten()
    model.zero_grad(set_to_none=True)
    return grads, entropy, correct, positions


def spectrum(M: np.ndarray) -> dict:
    """PR, rank95 and the top right singular vector (oriented along the mean row) of an uncentered matrix."""
    _, s, vt = np.linalg.svd(M, full_matrices=False)
    energy = s**2
    top = vt[0] if np.dot(vt[0], M.mean(0)) >= 0 else -vt[0]
    return {"participation_ratio": float(energy.sum() ** 2 / (energy**2).sum()),
            "rank95": int(np.searchsorted(np.cumsum(energy) / energy.sum(), 0.95 - 1e-12) + 1), "top": top}


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else None


def split_band(groups: list[np.ndarray], resamples: int, rng) -> list[float] | None:
    """[min, max] of cos(mean of a random half, mean of the other half) within each group."""
    values = []
    for g in groups:
        if len(g) < 2:
            continue
        for _ in range(resamples):
            order = rng.permutation(len(g))
            half = len(g) // 2
            c = cosine(g[order[:half]].mean(0), g[order[half:]].mean(0))
            if c is not None:
                values.append(c)
    return [min(values), max(values)] if values else None


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    step = ctx.trajectory.checkpoint_steps()[-1] if options["step"] is None else ctx.trajectory.spread([options["step"]], 1)[0]
    model: Any = ctx.setup.model_at(step)  # a GPT (needs family:gpt)
    block = model.blocks[-1]
    module = block.mlp.down if options["weight"] == "mlp.down" else block.attn.proj
    if options["row"] >= module.weight.shape[0]:
        raise UsageError(f"row={options['row']} is out of range: {options['weight']} has {module.weight.shape[0]} rows")
    device, autocast = ctx.setup.device, ctx.setup.autocast

    grads, entropies = [], []
    for inputs, targets in ctx.setup.evaluator.val_batches:
        g, h, _, _ = per_token_gradients(model, module, options["row"], inputs.to(device), targets.to(device), autocast)
        grads.append(g.cpu().numpy())
        entropies.append(h.cpu().numpy())
        if sum(len(x) for x in grads) >= options["tokens"]:
            break
    G, H = np.concatenate(grads)[: options["tokens"]], np.concatenate(entropies)[: options["tokens"]]
    edges = np.quantile(H, np.linspace(0, 1, options["buckets"] + 1))
    bucket = np.clip(np.searchsorted(edges, H, side="right") - 1, 0, options["buckets"] - 1)
    rows, tops = [], []
    for b in range(options["buckets"]):
        members = G[bucket == b]
        if len(members) == 0:
            raise UsageError(f"entropy bucket {b} is empty: collect more tokens (tokens={options['tokens']})")
        spec = spectrum(members)
        tops.append(spec.pop("top"))
        rows.append({"bucket": b, "entropy_min": float(edges[b]), "entropy_max": float(edges[b + 1]),
                     "tokens": int(len(members)), **spec})
    cross = [[float(u @ v) for v in tops] for u in tops]

    probe = probe_split(ctx, model, module, options, np.random.default_rng(options["seed"]))
    scalars = {"step": step, "pr_low_entropy": rows[0]["participation_ratio"],
               "pr_high_entropy": rows[-1]["participation_ratio"], **probe.pop("scalars")}
    notes = probe.pop("notes")
    return MetricResult(scalars=scalars, series={"cross_bucket_cos": cross}, tables={"buckets": rows, **probe},
                        figures=[plot(ctx, cross)], notes=notes)


def probe_split(ctx, model, module, options, rng) -> dict:
    """Correct vs incorrect retrievals on the OOD probe set, overall and per template."""
    data = ctx.setup.evaluator.probe_ood
    device, autocast = ctx.setup.device, ctx.setup.autocast
    grads, correct, templates = [], [], []
    size = ctx.setup.evaluator.batch_size
    for start in range(0, len(data.inputs), size):
        rows = slice(start, start + size)
        inputs, targets, mask = (torch.from_numpy(a[rows]).to(device) for a in (data.inputs, data.targets, data.mask))
        g, _, right, positions = per_token_gradients(model, module, options["row"], inputs, targets, autocast)
        at_probe = mask.flatten()[positions]
        grads.append(g[at_probe].cpu().numpy())
        correct.append(right[at_probe].cpu().numpy())
        templates.append(data.templates[rows])
    G, ok, tpl = np.concatenate(grads), np.concatenate(correct), np.concatenate(templates)
    table = []
    for name, keep in [("all", np.ones(len(ok), bool))] + [(f"template {t}", tpl == t) for t in np.unique(tpl)]:
        right, wrong = G[keep & ok], G[keep & ~ok]
        enough = min(len(right), len(wrong)) >= options["min_group"]
        table.append({"prompt": name, "correct": int(len(right)), "incorrect": int(len(wrong)),
                      "cos_correct_incorrect": cosine(right.mean(0), wrong.mean(0)) if enough else None,
                      "control_band": split_band([right, wrong], options["resamples"], rng) if enough else None})
    overall = table[0]
    notes = [] if overall["cos_correct_incorrect"] is not None else [
        f"correct vs incorrect not compared: {overall['correct']} correct and {overall['incorrect']} incorrect "
        f"retrievals, and each side needs {options['min_group']} (grad_structure.min_group)"]
    return {"scalars": {"probe_cos_correct_incorrect": overall["cos_correct_incorrect"],
                        "probe_correct": overall["correct"], "probe_incorrect": overall["incorrect"]},
            "probe": table, "notes": notes}


def plot(ctx, cross) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(cross, vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(image, ax=ax, label="signed cosine of top directions")
    ax.set_xlabel("entropy bucket (low → high)")
    ax.set_ylabel("entropy bucket (low → high)")
    fig.tight_layout()
    return ctx.figure(fig, "grad_structure", caption=(
        "Signed cosine between the top gradient directions of every pair of predictive-entropy buckets."))


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("grad_structure", "per-token gradient structure by entropy bucket; correct vs incorrect",
                          OPTIONS, compute, default=True, needs=("checkpoints", "model", "data", "gradients", "family:gpt"),
                          terms={"participation ratio": "(Σσ²)² / Σσ⁴ of a bucket's per-token gradient matrix: how many "
                                                        "directions its gradients spread over",
                                 "rank95": "the fewest singular directions holding 95% of a bucket's gradient energy",
                                 "cos_correct_incorrect": "the cosine between the mean gradients of correct and of "
                                                          "incorrect codeword retrievals, in the top-entropy bucket, "
                                                          "against a control band of random half-splits"}))
