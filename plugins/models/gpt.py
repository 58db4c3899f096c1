"""The model family `gpt`: the 51M GPT of docs/science.md#the-model, a GPT-2 style decoder small
enough to read in one sitting.

Pre-LayerNorm blocks, learned absolute positions, a final LayerNorm, the output projection tied to
the token embedding, no bias in any Linear, fused qkv, MLP = down(GELU(up(x))), no dropout.
Init: every weight N(0, 0.02), LayerNorm weight 1 and bias 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from geobench.api import ModelConfig, ModelPlugin, ParameterLayout, hookimpl


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.context = cfg.context
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(init_weights)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states; logits = hidden @ output_weightᵀ. The trainer and the evaluator
        go through these so that the [tokens × vocabulary] logits are never held at once."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(idx))


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# the trunk is every attention and MLP weight matrix of every block
LAYOUT = ParameterLayout(trunk=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.up|mlp\.down)\.weight",
                         block=r"blocks\.(?P<index>\d+)\.",
                         embedding=r"wte\.weight|wpe\.weight", head=r"lm_head\.weight")


def build(*, config: ModelConfig, vocab_size: int) -> torch.nn.Module:
    return GPT(config, vocab_size)


@hookimpl
def geobench_register_models(register):
    register(ModelPlugin(name="gpt", help="GPT-2 style decoder (tied embeddings), the 51M model of the source study", build=build,
                         layout=LAYOUT))
