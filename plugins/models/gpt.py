"""The 51M GPT of SPEC §1, published as the model family `gpt`."""

from geobench import hookimpl
from geobench.model import GPT
from geobench.registry import ModelPlugin


@hookimpl
def geobench_register_models(register):
    register(ModelPlugin(name="gpt", help="GPT-2 style decoder of SPEC §1 (tied embeddings)", build=GPT))
