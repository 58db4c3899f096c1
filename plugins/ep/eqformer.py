"""The equilibrium transformer: one weight-tied block iterated to a fixed point.

h* = F(h*; x) with F(h; x) = e(x) + U(h), e(x) the token and position embeddings and U(h) the update a
transformer block adds to its residual stream (attention then MLP, pre-LayerNorm), reached by the
damped iteration h ← (1 − γ)h + γF(h; x) from h = 0 for at most T1 steps or until the residual
‖F(h) − h‖/‖h‖ falls below the tolerance. Readout: final LayerNorm and the tied embedding.

On complex states (holomorphic equilibrium propagation needs them) every operation is written out
so that it is holomorphic — LayerNorm with (x − μ)² rather than |x − μ|², softmax, the tanh form of
GELU; on real states the same functions are torch's fused kernels (SDPA, layer_norm, gelu(tanh)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from geobench.api import ModelConfig, ModelPlugin, Param, ParameterLayout, hookimpl
from geobench.plugins.models.gpt import init_weights

PARAMS = {
    "relax_steps": Param(30, "maximum free-phase relaxation steps T1", low=1),
    "damping": Param(0.8, "h ← (1 − γ)h + γF(h), γ", low=0, high=1, low_open=True),
    "relax_tol": Param(1e-4, "stop relaxing when ‖F(h) − h‖/‖h‖ is below this", low=0),
}
# the one weight-tied block is block 0; its attention and MLP matrices are the trunk
LAYOUT = ParameterLayout(trunk=r"block\.(qkv|proj|up|down)\.weight", block=r"block\.",
                         embedding=r"wte\.weight|wpe\.weight")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    if not x.is_complex():
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    centered = x - x.mean(-1, keepdim=True)
    return centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * weight + bias


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.T.to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    if not x.is_complex():
        return F.gelu(x, approximate="tanh")
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(scores: torch.Tensor) -> torch.Tensor:
    shifted = scores - scores.real.amax(-1, keepdim=True).detach()
    e = torch.exp(shifted)
    return e / e.sum(-1, keepdim=True)


class EqBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.n_head = cfg.d_model, cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's update U(x) = a + m, without the skip connection of x itself."""
        B, T, C = x.shape
        q, k, v = linear(layer_norm(x, self.ln1.weight, self.ln1.bias), self.qkv.weight).split(C, dim=2)
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if x.is_complex():
            scores = q @ k.transpose(-1, -2) / math.sqrt(C // self.n_head)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            attended = softmax(scores.masked_fill(~causal, -1e4)) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = attended.transpose(1, 2).reshape(B, T, C)
        a = linear(y, self.proj.weight)
        hidden = gelu(linear(layer_norm(x + a, self.ln2.weight, self.ln2.bias), self.up.weight))
        return a + linear(hidden, self.down.weight)


class EqFormer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.block = EqBlock(cfg)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        params = {name: cfg.params.get(name, spec.default) for name, spec in PARAMS.items()}
        self.relax_steps, self.damping, self.tol = params["relax_steps"], params["damping"], params["relax_tol"]
        self.apply(init_weights)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))

    def step(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """F(h; x) = e(x) + U(h)."""
        return e.to(h.dtype) + self.block(h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return linear(layer_norm(h, self.ln_f.weight, self.ln_f.bias), self.wte.weight)

    @staticmethod
    def residual(h: torch.Tensor, f: torch.Tensor) -> float:
        return float((f - h).abs().norm() / h.abs().norm().clamp_min(1e-12))

    def relax(self, e: torch.Tensor, h: torch.Tensor | None = None, steps: int | None = None,
              force=None) -> tuple[torch.Tensor, float]:
        """Damped fixed-point iteration; `force(h)` is added to F (the nudge). Returns h and its residual."""
        h = torch.zeros_like(e) if h is None else h
        residual = float("inf")
        for _ in range(steps or self.relax_steps):
            f = self.step(h, e)
            if force is not None:
                f = f + force(h)
            residual = self.residual(h, f)
            h = (1 - self.damping) * h + self.damping * f
            if residual < self.tol or not math.isfinite(residual):
                break
        return h, residual

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h, _ = self.relax(self.embed(idx))
        return self.readout(h)


def build(*, config: ModelConfig, vocab_size: int) -> torch.nn.Module:
    return EqFormer(config, vocab_size)


@hookimpl
def geobench_register_models(register):
    register(ModelPlugin("eqformer", "weight-tied transformer block iterated to a fixed point (for EP)", build=build,
                         layout=LAYOUT, params=PARAMS, differentiable=False))
