"""The 51M GPT of SPEC §1, published as the model family `gpt`."""

import torch

from geobench import hookimpl
from geobench.config import ModelConfig
from geobench.model import GPT
from geobench.registry import ModelPlugin, ParameterLayout

# SPEC §1: the trunk is every attention and MLP weight matrix of every block
LAYOUT = ParameterLayout(trunk=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.up|mlp\.down)\.weight",
                         block=r"blocks\.(?P<index>\d+)\.",
                         embedding=r"wte\.weight|wpe\.weight", head=r"lm_head\.weight")


def build(*, config: ModelConfig, vocab_size: int) -> torch.nn.Module:
    return GPT(config, vocab_size)


@hookimpl
def geobench_register_models(register):
    register(ModelPlugin(name="gpt", help="GPT-2 style decoder of SPEC §1 (tied embeddings)", build=build,
                         layout=LAYOUT))
