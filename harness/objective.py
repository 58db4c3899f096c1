"""The training objective (docs/science.md#training-protocol): LM cross-entropy plus λ times the
probe cross-entropy.

Two ways to the same numbers: from logits (`composite_loss`, for metrics and small models), and from
the final hidden states and the output matrix (`head_composite_loss`, `head_token_stats`), which
never hold the [tokens × vocabulary] float32 logits at once: rows go through the output layer in
chunks, and the backward pass recomputes each chunk's logits from the saved log-sum-exp."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "composite_loss",
    "composite_weights",
    "flat_gradient",
    "has_head",
    "head_composite_loss",
    "head_token_stats",
    "lambda_at",
    "lm_and_probe_losses",
    "token_losses",
]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (float32); positions with target < 0 get 0."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0), reduction="none")
    return ce.view_as(targets) * (targets >= 0)


def composite_loss(logits: torch.Tensor, targets: torch.Tensor, probe_mask: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """mean CE over non-probe, non-pad targets + λ · mean CE over probe targets (0 if none)."""
    lm_loss, probe_loss = lm_and_probe_losses(logits, targets, probe_mask)
    return lm_loss + lam * probe_loss


def lambda_at(schedule: list, step: int) -> float:
    """λ of the last [from_step, λ] entry whose from_step <= step."""
    return float([lam for start, lam in schedule if start <= step][-1])


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    """d loss / d params, flattened in the order given, float32."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


def lm_and_probe_losses(logits: torch.Tensor, targets: torch.Tensor, probe_mask: torch.Tensor):
    """(mean CE over non-probe non-pad targets, mean CE over probe targets) — the two terms of the
    composite loss, for metrics that look at them apart (interference)."""
    ce = token_losses(logits, targets)
    valid = targets >= 0
    lm, probe = valid & ~probe_mask, valid & probe_mask
    return (ce * lm).sum() / lm.sum().clamp_min(1), (ce * probe).sum() / probe.sum().clamp_min(1)


CHUNK_ROWS = 4096  # rows of logits alive at once: 4096 × 50257 float32 ≈ 0.8 GB


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i w_i · CE(h_i Wᵀ, y_i), chunk by chunk; rows with y_i < 0 must carry w_i = 0. The backward
    pass runs under the forward's autocast state, so its recomputed logits equal the forward's."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, row_weights, chunk):
        acc = _accumulator(hidden)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for rows in _chunks(hidden.shape[0], chunk):
            logits = (hidden[rows] @ weight.T).to(acc)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[rows].clamp_min(0)[:, None]).squeeze(1)
            total += ((lse[rows] - picked) * row_weights[rows]).sum()
        ctx.save_for_backward(hidden, weight, targets, row_weights, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_total):
        hidden, weight, targets, row_weights, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for rows in _chunks(hidden.shape[0], ctx.chunk):
            h = hidden[rows]
            probs = torch.exp((h @ weight.T).to(lse.dtype) - lse[rows, None])  # softmax, recomputed
            probs[torch.arange(probs.shape[0], device=probs.device), targets[rows].clamp_min(0)] -= 1.0
            g = probs * (row_weights[rows] * grad_total)[:, None]  # d total / d logits
            if grad_hidden is not None:
                grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.T @ h.to(g.dtype)
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None, None


def _accumulator(hidden: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the inputs' own precision above it."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def composite_weights(targets: torch.Tensor, probe_mask: torch.Tensor, lam: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-position weights that make Σ w·CE the composite loss: 1/n_lm on LM targets, λ/n_probe on
    probe targets, 0 on ignored positions (an all-ignored batch weighs nothing)."""
    valid = targets >= 0
    lm, probe = (valid & ~probe_mask).to(dtype), (valid & probe_mask).to(dtype)
    return lm / lm.sum().clamp_min(1) + lam * probe / probe.sum().clamp_min(1)


def head_composite_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        probe_mask: torch.Tensor, lam: float, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """`composite_loss` of the logits hidden @ weightᵀ, computed without materializing them."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    weights = composite_weights(targets, probe_mask, lam, _accumulator(hidden)).reshape(-1)
    return _LinearCrossEntropy.apply(flat, weight, targets.reshape(-1), weights, chunk)


@torch.no_grad()
def head_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE (0 where target < 0, like `token_losses`) and the argmax prediction of the
    logits hidden @ weightᵀ, chunk by chunk."""
    flat, tgt = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    ce = torch.zeros(tgt.shape, dtype=_accumulator(hidden), device=hidden.device)
    argmax = torch.empty(tgt.shape, dtype=torch.long, device=hidden.device)
    for rows in _chunks(flat.shape[0], chunk):
        logits = (flat[rows] @ weight.T).to(ce.dtype)
        argmax[rows] = logits.argmax(-1)
        picked = logits.gather(1, tgt[rows].clamp_min(0)[:, None]).squeeze(1)
        ce[rows] = (torch.logsumexp(logits, -1) - picked) * (tgt[rows] >= 0)
    return ce.view_as(targets), argmax.view_as(targets)


HEAD_PATH_BYTES = 256 * 2**20  # float32 logits larger than this go through the chunked head path


def has_head(model: torch.nn.Module, rows: int = 0) -> bool:
    """Whether the losses of `rows` positions should go through the model's head in chunks: the model
    exposes `hidden(idx)` and `output_weight` (logits = hidden @ output_weightᵀ), and its float32
    logits would exceed HEAD_PATH_BYTES (at the paper size, 64 × 256 × 50257 are 3.3 GB; small
    logits are faster in one piece, on a CPU in particular)."""
    weight = getattr(model, "output_weight", None)
    return (callable(getattr(model, "hidden", None)) and isinstance(weight, torch.Tensor)
            and rows * weight.shape[0] * 4 > HEAD_PATH_BYTES)
