"""Equilibrium propagation for fixed-point models, and the exact-gradient controls.

A fixed-point model exposes `embed(idx) -> e`, `step(h, e) -> F(h; x)`, `readout(h) -> logits`,
`relax(e, h, steps, force) -> (h, residual)`, its `damping`, and a readout of a final LayerNorm
`ln_f` and the tied token embedding `wte` (the eqformer of this package does). With h* = F(h*),
the loss L(readout(h*)) has the gradient

    dL/dθ = (∂F/∂θ)ᵀ w + ∂L/∂θ|_readout,   w = (I − J)⁻ᵀ ∇_h L,   J = ∂F/∂h at h*.

`implicit` solves for w exactly (vector-Jacobian products); `bptt` backpropagates through the
unrolled relaxation. EP never forms Jᵀ: it relaxes again with the output nudged, h = F(h) − β∇_h L,
whose equilibria move as dh/dβ = −(I − J)⁻¹ ∇_h L, and uses w_EP = −dh/dβ — exact when J is
symmetric (an energy-based model), biased otherwise. dh/dβ is estimated one-sided ((h^β − h*)/β),
symmetric ((h^β − h^−β)/2β, bias O(β²)) or holomorphically: N nudges β_k = |β|e^{2πik/N} on a circle,
dh/dβ ≈ (1/N|β|) Σ h^{β_k} e^{−2πik/N}, whose bias shrinks with N (states become complex).
Memory is that of one application of F, whatever the number of relaxation steps.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Callable

import torch
import torch.nn.attention

from geobench.api import Batch
from geobench.objective import composite_loss, composite_weights

EP_ESTIMATORS = ("one_sided", "symmetric", "holo")  # estimates of dh*/dβ from nudged relaxations
ESTIMATORS = (*EP_ESTIMATORS, "bptt", "implicit")  # and the exact-gradient controls


def loss_gradient_h(model, h: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """∇_h of Σ_pos weight · CE(readout(h)), written out so that it continues holomorphically to complex h."""
    w_ln, b_ln, embedding = model.ln_f.weight, model.ln_f.bias, model.wte.weight
    centered = h - h.mean(-1, keepdim=True)
    sigma = torch.sqrt((centered * centered).mean(-1, keepdim=True) + 1e-5)
    normed = centered / sigma
    logits = (normed * w_ln + b_ln) @ embedding.T.to(h.dtype)
    shifted = logits - logits.real.amax(-1, keepdim=True)
    p = torch.exp(shifted)
    p = p / p.sum(-1, keepdim=True)
    onehot = torch.zeros_like(p)
    onehot.scatter_(-1, targets.clamp_min(0).unsqueeze(-1), 1.0)
    d_logits = (p - onehot) * weights.unsqueeze(-1).to(p.dtype)
    g = (d_logits @ embedding.to(h.dtype)) * w_ln
    return (g - g.mean(-1, keepdim=True) - normed * (g * normed).mean(-1, keepdim=True)) / sigma


def free_phase(model, inputs) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(e with its graph to the embeddings, h* without a graph, the residual reached)."""
    e = model.embed(inputs)
    with torch.no_grad():
        h, residual = model.relax(e.detach())
    return e, h, residual


def _apply(model, e: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets, mask, lam: float, scale: float) -> float:
    """Accumulate scale · [(∂F/∂θ)ᵀ w + ∂L/∂θ at fixed h] into the parameters' .grad; return L."""
    f = model.step(h, e)
    loss = composite_loss(model.readout(h), targets, mask, lam)
    torch.autograd.backward([f, loss * scale], [w * scale, None])
    return float(loss.detach())


def dh_dbeta(model, e: torch.Tensor, h: torch.Tensor, targets, weights, estimator: str, beta: float,
             n_points: int, steps: int) -> tuple[torch.Tensor, float]:
    """The EP estimate of dh*/dβ and the largest nudged-phase residual."""
    complex_dtype = torch.complex128 if h.dtype == torch.float64 else torch.complex64

    def nudged(b: complex | float):
        start = h.to(complex_dtype) if isinstance(b, complex) else h
        state, residual = model.relax(e, start, steps, force=lambda x: -b * loss_gradient_h(model, x, targets, weights))
        return state, residual

    with torch.no_grad():
        e = e.detach()
        if estimator == "one_sided":
            h_b, r = nudged(beta)
            return (h_b - h) / beta, r
        if estimator == "symmetric":
            (plus, r1), (minus, r2) = nudged(beta), nudged(-beta)
            return (plus - minus) / (2 * beta), max(r1, r2)
        total, worst = torch.zeros_like(h, dtype=complex_dtype), 0.0
        for k in range(n_points):
            phase = cmath.exp(2j * math.pi * k / n_points)
            state, r = nudged(complex(beta * phase))
            total += state / phase
            worst = max(worst, r)
        return (total / (n_points * beta)).real, worst


def ep_gradient(model, *, e: torch.Tensor, h: torch.Tensor, batch: Batch, lam: float, estimator: str = "symmetric",
                beta: float = 0.05, n_points: int = 4, nudge_steps: int = 15, scale: float = 1.0) -> dict:
    """Accumulate scale × the EP gradient estimate into .grad, from the free phase (e, h*)."""
    _, targets, mask = batch
    weights = composite_weights(targets, mask, lam)
    dh, nudged_residual = dh_dbeta(model, e, h, targets, weights, estimator, beta, n_points, nudge_steps)
    loss = _apply(model, e, h, -dh, targets, mask, lam, scale)
    return {"loss": loss, "nudged_residual": nudged_residual}


def implicit_gradient(model, *, e: torch.Tensor, h: torch.Tensor, batch: Batch, lam: float, steps: int = 60,
                      scale: float = 1.0) -> dict:
    """Exact gradient at the fixed point: w = Jᵀw + ∇_h L solved by damped iteration of VJPs."""
    _, targets, mask = batch
    h = h.detach().requires_grad_(True)
    grad_h = torch.autograd.grad(composite_loss(model.readout(h), targets, mask, lam), h)[0]
    f = model.step(h, e.detach())
    w = grad_h.clone()
    gamma = model.damping
    for _ in range(steps):
        jt_w = torch.autograd.grad(f, h, w, retain_graph=True)[0]
        w = (1 - gamma) * w + gamma * (jt_w + grad_h)
    loss = _apply(model, e, h.detach(), w.detach(), targets, mask, lam, scale)
    return {"loss": loss, "nudged_residual": None}


def bptt_gradient(model, *, batch: Batch, lam: float, scale: float = 1.0) -> dict:
    """Backpropagation through the unrolled damped relaxation (T1 steps from h = 0)."""
    inputs, targets, mask = batch
    e = model.embed(inputs)
    h = torch.zeros_like(e)
    residual = math.inf
    for _ in range(model.relax_steps):
        f = model.step(h, e)
        residual = model.residual(h.detach(), f.detach())
        h = (1 - model.damping) * h + model.damping * f
    loss = composite_loss(model.readout(h), targets, mask, lam)
    (loss * scale).backward()
    return {"loss": float(loss.detach()), "nudged_residual": None, "unrolled_residual": residual}


def jacobian_penalty(model, e, h, weight: float, generator: torch.Generator | None = None) -> float:
    """Hutchinson estimate of ‖J‖_F² at the free fixed point, E‖Jᵀv‖² over v ~ N(0, I) (per element),
    and its gradient times `weight` accumulated into .grad."""
    h = h.detach().requires_grad_(True)
    v = torch.randn(h.shape, generator=generator).to(h.device)
    # the gradient of a VJP is a second derivative, which only the math attention kernel provides everywhere
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        f = model.step(h, e.detach())
        jt_v = torch.autograd.grad(f, h, v, create_graph=True)[0]
        penalty = jt_v.pow(2).sum() / v.numel()
        (weight * penalty).backward()
    return float(penalty.detach())


def leading_eigenvalues(jvp: Callable[[torch.Tensor], torch.Tensor], shape, k: int = 4, iterations: int = 40,
                        seed: int = 0) -> list[complex]:
    """Eigenvalues of largest modulus of a linear map known only through Jacobian-vector products:
    subspace iteration on k vectors, then Rayleigh–Ritz, which resolves a complex pair."""
    n = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    for _ in range(iterations):
        W = torch.stack([jvp(V[:, j].reshape(shape).float()).reshape(-1).double().cpu() for j in range(k)], dim=1)
        V, _ = torch.linalg.qr(W)
    W = torch.stack([jvp(V[:, j].reshape(shape).float()).reshape(-1).double().cpu() for j in range(k)], dim=1)
    values = torch.linalg.eigvals(V.T @ W)
    return sorted((complex(v) for v in values), key=abs, reverse=True)


def jacobian_spectrum(model, inputs, k: int = 4, iterations: int = 40) -> list[complex]:
    """Leading eigenvalues of J = ∂F/∂h at the free fixed point of a batch. The Jacobian-vector
    products are central differences, (F(h + εv) − F(h − εv)) / 2ε, which every kernel supports
    (forward-mode AD does not cover fused attention on every device)."""
    e, h, _ = free_phase(model, inputs)
    e = e.detach()
    scale = 1e-3 * float(h.norm())

    @torch.no_grad()
    def jvp(v):
        v = v.to(h.device)
        eps = scale / float(v.norm().clamp_min(1e-12))
        return (model.step(h + eps * v, e) - model.step(h - eps * v, e)) / (2 * eps)

    return leading_eigenvalues(jvp, tuple(h.shape), k, iterations)
