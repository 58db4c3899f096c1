"""The run configuration as typed data: one dataclass per section, every field declared with a
`Param` (default, help, allowed values). How a Config is layered and validated is the host's
(`geobench.config`); plugins receive it typed (a metric's `check`, a model's builder).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from geobench.api.params import SEED_HIGH, Param

MAX_STEPS = 10**8  # a thousand times the paper's run; far beyond what any budget trains


def p(default: Any, help: str, **limits: Any) -> Any:
    """A config field declared with a `Param` (default, help, allowed values)."""
    spec = Param(default, help, **limits)
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(default), metadata={"param": spec}
        )
    return dataclasses.field(default=default, metadata={"param": spec})


@dataclasses.dataclass
class ModelConfig:
    family: str = p("gpt", "model plugin that builds the network")
    n_layer: int = p(8, "transformer blocks", low=1)
    n_head: int = p(16, "attention heads (must divide d_model)", low=1)
    d_model: int = p(512, "residual stream width", low=8)
    d_ff: int = p(2048, "MLP hidden width", low=1)
    context: int = p(256, "tokens per training window", low=16)
    compile: bool = p(False, "torch.compile the model's forward (on in the paper preset; its time is reported "
                             "apart from the training throughput)")
    params: dict = dataclasses.field(default_factory=dict)  # the model plugin's own declared parameters


@dataclasses.dataclass
class DataConfig:
    source: str = p(
        "roneneldan/TinyStories",
        "corpus: 'embedded', a Hugging Face hub dataset id, or a local file or folder",
    )
    train_stories: int = p(200_000, "first N training stories (with at least min_chars)", low=1)
    val_stories: int = p(5_000, "first N validation stories", low=1)
    min_chars: int = p(40, "drop stories shorter than this many characters", low=0)
    tokenizer: str = p("bpe", "'bpe' (byte-level BPE trained on the corpus), 'gpt2' (the GPT-2 / GPT-Neo BPE of the "
                              "source, shipped with the install) or a hub tokenizer id")
    vocab_size: int = p(50257, "vocabulary size of the trained BPE", low=1024)
    cache_dir: str = p("", "cache for tokenizers and token arrays (default $GEOBENCH_CACHE)")


@dataclasses.dataclass
class ProbeConfig:
    p_probe: float = p(0.10, "probability that a training sequence carries a probe", low=0, high=1)
    n_codewords: int = p(512, "codewords (single-token uppercase strings)", low=2)
    eval_examples: int = p(2000, "examples in each probe eval set (in-distribution and OOD)", low=1)
    train_gap: list = p([5, 30], "story tokens between KEY and QUERY in training [min, max]")
    ood_gap: list = p([80, 200], "filler tokens between KEY and QUERY in the OOD set [min, max]")
    eval_prefix: list = p([2, 10], "filler tokens before KEY in the eval sets [min, max]")
    filler_ids: list = p([100, 5000], "token ids the eval filler is drawn from [min, max]")
    codewords: str = p("clean", "codeword rule: 'clean' (uppercase words that are one token after a space; the mask "
                       "is that token) or 'source' (the source's list and mask, see docs/FIDELITY.md)",
                       choices=("clean", "source"))
    codeword_min_chars: int = p(4, "shortest codeword of the clean rule (GPT-2's vocabulary has 373 of >= 4 letters, "
                                   "1028 of >= 3)", low=1)
    codeword_seed: int = p(0, "seed of the codeword shuffle and of the fixed eval sets (the source's shuffle: 42)",
                           low=0, high=SEED_HIGH)
    lm_ood: str = p("clean", "lm_ood over the OOD examples' filler and template tokens ('clean') or also over the "
                    "EOS padding after the query, as the source counted it ('source')", choices=("clean", "source"))


@dataclasses.dataclass
class TrainConfig:
    steps: int = p(10_000, "optimizer steps", low=1, high=MAX_STEPS)
    batch_size: int = p(64, "sequences per micro-batch", low=1)
    grad_accum: int = p(2, "micro-batches per step", low=1)
    warmup: int = p(1500, "linear warmup steps", low=0)
    lr_floor: float = p(0.1, "the cosine is clamped at this fraction of the peak lr (flat after)", low=0, high=1)
    grad_clip: float = p(1.0, "clip the global gradient norm (0: off)", low=0)
    lambda_schedule: list = p(
        [[0, 2.0], [4000, 4.0]], "probe-loss weight: [from_step, lambda] pairs"
    )
    eval_every: int = p(200, "evaluate at step 1 and every N steps", low=1)
    checkpoint_every: int = p(200, "weights-only checkpoint at step 1 and every N steps", low=1)
    checkpoint_window: list = p(
        [], "extra checkpoints [start, end, every] or a list of them, e.g. [[600, 2000, 50], [2000, 4000, 100]]"
    )
    state_every: int = p(200, "full training state (for resume) every N steps", low=1)
    val_batches: int = p(20, "validation batches per evaluation", low=1)
    val_batch_size: int = p(64, "sequences per validation batch", low=1)
    diverge_factor: float = p(
        1.0, "mark the run diverged when an evaluated val_loss exceeds this multiple of the val_loss before the "
        "first update (0: only a non-finite loss counts)", low=0)
    stop_on_diverge: bool = p(False, "stop training at that evaluation (the source trained on to the last step)")
    early_stop: bool = p(False, "stop once p_ood >= early_stop_p_ood at early_stop_evals consecutive evaluations")
    early_stop_p_ood: float = p(0.8, "p_ood threshold of the early stop", low=0, high=1)
    early_stop_evals: int = p(5, "consecutive evaluations at or above the threshold", low=1)
    seed: int = p(42, "seed of the initialization and the data order", low=0, high=SEED_HIGH)
    device: str = p("auto", "where to train", choices=("auto", "cpu", "cuda"))
    resume: bool = p(False, "continue the run in the output directory from its saved state")


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adamw"
    params: dict = dataclasses.field(default_factory=dict)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "probe": ProbeConfig,
    "train": TrainConfig,
}


@dataclasses.dataclass
class Config:
    preset: str = p("auto", "size preset (auto: paper on CUDA, tiny on CPU)", choices=("auto", "paper", "small", "tiny"))
    name: str = p("", "run name (default: derived from the optimizer and the overrides)")
    metrics: list | None = p(None, "metric plugins run at the end of training; none: the defaults (the metrics whose "
        "plugins mark them default, plus those the optimizer plugin adds), less those that cannot apply to the run; "
        "[]: no metric; +NAME / -NAME: the defaults with NAME added / removed", kind=list, nullable=True)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
