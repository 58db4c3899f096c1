"""The plugin contract: what an optimizer, metric or model plugin declares and receives.

Everything a plugin builds on lives in `geobench.api` and imports nothing else of geobench: the
host (registry, trainer, analysis) reads these descriptors, and plugins never see the host.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from geobench.api.batch import Batch
from geobench.api.errors import UsageError
from geobench.api.params import Param

if TYPE_CHECKING:
    from geobench.api.config import Config, ModelConfig
    from geobench.api.context import MetricContext
    from geobench.api.documents import MetricResult

# What a parameter is to an optimizer; a model family's layout assigns one role to each parameter.
ROLES = {
    "matrix": "a hidden weight matrix of a block (attention, MLP)",
    "embedding": "a token or position embedding (the output head too, when it is tied to the embedding)",
    "head": "an output projection of its own (untied)",
    "norm": "a normalization weight, a bias, any other vector",
}
DECAYED_ROLES = ("matrix", "embedding", "head")  # the roles weight decay applies to (norms and biases: none)


class RoledParameter(NamedTuple):
    name: str
    tensor: torch.nn.Parameter
    role: str


class Parameters(tuple):
    """The model's named parameters with their roles (a tuple of `RoledParameter`, in
    `named_parameters()` order), as an optimizer plugin's builder receives them."""

    def select(self, *roles: str) -> list[RoledParameter]:
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown parameter roles {unknown}; roles: {', '.join(ROLES)}")
        return [p for p in self if p.role in roles]

    def tensors(self, *roles: str) -> list[torch.nn.Parameter]:
        """The tensors of `roles` (all, when none are named)."""
        return [p.tensor for p in (self.select(*roles) if roles else self)]

    def groups(self, *, weight_decay: float, roles: Sequence[str] = tuple(ROLES)) -> list[dict[str, Any]]:
        """The standard parameter groups over the parameters of `roles`: the decayed roles (matrices,
        embeddings, head) with `weight_decay`, norms and biases without; empty groups left out."""
        decayed = [p.tensor for p in self if p.role in roles and p.role in DECAYED_ROLES]
        plain = [p.tensor for p in self if p.role in roles and p.role not in DECAYED_ROLES]
        return [group for group in ({"params": decayed, "weight_decay": weight_decay},
                                    {"params": plain, "weight_decay": 0.0}) if group["params"]]


@dataclasses.dataclass(frozen=True)
class TrainingSchedule:
    """The shape of the training run an optimizer is built for: a self-scheduling optimizer takes
    its warmup and horizon from it, SophiaG its tokens per step."""

    steps: int
    warmup: int
    tokens_per_step: int


class BuildOptimizer(Protocol):
    def __call__(self, *, parameters: Parameters, hp: Mapping[str, Any], device: torch.device,
                 schedule: TrainingSchedule) -> torch.optim.Optimizer:
        """A torch optimizer over `parameters` (every trainable parameter of the model, each with its
        role), grouped as the plugin chooses: `parameters.groups(weight_decay=...)` for the standard
        decay split, `parameters.select("matrix")` and `Composite` for hybrids that give roles to
        different optimizers. Every parameter must be in exactly one group."""
        ...


class PrepareStep(Protocol):
    def __call__(self, *, step: int, tokens_per_step: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, batches: Sequence[Batch]) -> None:
        """Called at the start of every optimizer step, before its gradient is computed, with the
        step's micro-batches (e.g. refresh a curvature estimate every k steps). `.grad` is free to
        use: the harness clears it afterwards."""
        ...


class GradientRule(Protocol):
    def __call__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, lam: float,
                 hp: Mapping[str, Any], scale: float) -> dict[str, Any]:
        """Accumulate scale × a gradient estimate of the composite loss into the parameters' .grad
        (instead of autograd's backward) and return at least {"loss": float} (NaN marks a
        diverged step). Other numbers and flags it returns are diagnostics: the trainer reports
        their mean (numbers) or count (flags) over each evaluation interval."""
        ...


class ComputeMetric(Protocol):
    def __call__(self, *, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
        """The metric's numbers on the run `ctx` shows (see `MetricResult`); `options` are validated
        against the plugin's declared options. Raise a UsageError when the run lacks what it needs."""
        ...


class CheckMetric(Protocol):
    def __call__(self, *, config: Config, options: Mapping[str, Any], reg: Plugins) -> None:
        """Raise a UsageError when a run of `config` could never satisfy `options` (a reheat from a
        step that will not be checkpointed, an optimizer `reg` does not know), so that a run or
        suite fails before training."""
        ...


class Plugins(Protocol):
    """The installed plugins, as a metric's `check` looks them up (each raises a UsageError naming
    an unknown or unavailable plugin)."""

    def optimizer(self, name: str) -> OptimizerPlugin: ...

    def metric(self, name: str) -> MetricPlugin: ...

    def model(self, name: str) -> ModelPlugin: ...


@dataclasses.dataclass(frozen=True)
class ComparedRun:
    """A run of a comparison as a metric's comparison figures see it: `label` is what its legend
    entry says (its name and the settings that set it apart from the other runs), `group` its
    configuration (runs that differ only in their seed share one), `colour` its configuration's
    colour (the published series it pairs with have it too), `steps` the steps it was planned
    for, `diverged_at` the step it was marked diverged at, `result` this metric's result."""

    label: str
    group: str
    colour: str
    status: str
    steps: int
    params: Mapping[str, Any]
    result: MetricResult
    diverged_at: int | None = None


class SaveFigure(Protocol):
    def __call__(self, fig: Any, name: str, *, caption: str) -> None:
        """Add `fig` to the comparison as figures/NAME.png, under `caption` (what it shows, in a sentence)."""


class ComparisonFigures(Protocol):
    def __call__(self, *, runs: list[ComparedRun], groups: list[dict[str, Any]],
                 references: list[dict[str, Any]], plt: Any, save: SaveFigure) -> None:
        """Draw this metric's figures of a comparison: `runs` are the runs where it succeeded;
        `groups` the comparison's configurations, each a mapping of `group`, `label`, `colour`,
        `runs`, `statuses`, `optimizer`, `params`, every column's mean under its id and its
        bootstrap interval under `<id>_interval`; `references` the published series shown beside
        them (geobench.published's analysis, with the `colour` of the run each pairs with and the
        `steps` it ran); `plt` is pyplot. geobench.figures.draw and published_lines draw curves
        the way every geobench figure does."""
        ...


class BuildModel(Protocol):
    def __call__(self, *, config: ModelConfig, vocab_size: int) -> torch.nn.Module:
        """A freshly initialized network mapping token ids (B, T) to logits (B, T, vocab); its own
        declared parameters are in `config.params`."""
        ...


@dataclasses.dataclass(frozen=True)
class OptimizerPlugin:
    """An optimizer: declared hyperparameters and a builder, and how the harness must drive it.

    - `schedule`: "harness" — the harness writes lr = peak × (warmup + clamped cosine) into every
      group before each step (each group's `lr` after `build` is its peak; `lr_meaning` says what lr
      is to the optimizer, e.g. a multiplier of an estimated step size); "self" — the optimizer
      schedules itself and the harness never touches lr.
    - `closure`: `step(closure)` gets a closure that recomputes the loss and gradients of the same
      step's micro-batches (L-BFGS, SAM); `second_order`: the loss is backpropagated with
      `create_graph=True` through a twice-differentiable path; `prepare_step`: a hook at the start
      of every step (SophiaG's Hessian refresh).
    - Optimizers with `train()`/`eval()` (Schedule-Free) are switched to eval mode around every
      evaluation, checkpoint and state save: the trajectory records the eval-mode weights.
    - `requires`: the distributions it imports (their versions go into the report); when one is
      missing the plugin is listed as unavailable, with `install`. `deterministic=False` declares
      that a resumed run is not bit-identical to an uninterrupted one.

    A plugin with `variants` set answers names `NAME:VARIANT` (e.g. `torch:Adagrad`) by returning a
    concrete plugin. A plugin may bring its own model family (`family`, the default of model.family
    when it is used), its own `gradient` rule, and `metrics` it adds to the default metric set.
    """

    name: str
    help: str
    params: Mapping[str, Param]
    build: BuildOptimizer
    schedule: str = "harness"
    lr_meaning: str = "the step size"
    closure: bool = False
    second_order: bool = False
    prepare_step: PrepareStep | None = None
    requires: tuple[str, ...] = ()
    install: str = ""
    deterministic: bool = True
    variants: Callable[[str], OptimizerPlugin] | None = None
    family: str | None = None
    gradient: GradientRule | None = None
    metrics: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"optimizer {self.name!r} declares schedule={self.schedule!r}; "
                             f"allowed: {', '.join(SCHEDULES)}")

    def missing(self) -> list[str]:
        """The distributions in `requires` that are not installed."""
        missing = []
        for dist in self.requires:
            try:
                importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                missing.append(dist)
        return missing

    def unavailable(self) -> str | None:
        """Why the plugin cannot run here (a missing library and how to install it), or None."""
        missing = self.missing()
        if not missing:
            return None
        return (f"optimizer {self.name!r} needs {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed: {self.install or 'pip install ' + ' '.join(missing)}")


SCHEDULES = {"harness": "the harness's warmup + clamped cosine, written into every group's lr",
             "self": "the optimizer's own (the harness never writes lr)"}


# What a metric may need, and what provides it.
NEEDS = {
    "checkpoints": "a trajectory of checkpoints",
    "run": "a geobench run (its configuration), not only checkpoints",
    "evals": "the run's evaluation history",
    "model": "the run's model",
    "data": "the run's data stream and evaluation sets",
    "training": "training from a checkpoint",
    "gradients": "gradients through the model's forward",
    "probe": "probe sequences in training (probe.p_probe > 0)",
}
FAMILY_NEED = "family:"  # "family:gpt": only runs of that model family

# the option every metric that works on a parameter scope declares
SCOPE = Param("trunk", "parameters: trunk, all or block:I", pattern=r"trunk|all|block:\d+")


@dataclasses.dataclass(frozen=True)
class MetricPlugin:
    """A metric: declared options, what it needs from a run (keys of NEEDS, or `family:NAME`;
    the context `compute` receives follows from them, see `geobench.api.context`), a compute
    function and, optionally, an early check of its options against a config, and what it
    contributes to side-by-side reports: `columns` (column id → (the scalar of its result, the
    heading)), shown wherever a run has the value, and `comparison_figures`; `terms`: what the
    names in its results and columns mean (term → definition), defined once on every page that
    shows them. `default`: the metric is in the default set a run computes (where it applies)."""

    name: str
    help: str
    options: Mapping[str, Param]
    compute: ComputeMetric
    needs: tuple[str, ...] = ("checkpoints",)
    check: CheckMetric | None = None
    columns: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # id → (scalar, heading)
    comparison_figures: ComparisonFigures | None = None
    terms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    min_checkpoints: int = 0  # a run whose schedule writes fewer cannot be measured (known before training)
    min_evals: int = 0
    default: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in NEEDS and not n.startswith(FAMILY_NEED)]
        if unknown:
            raise UsageError(f"metric {self.name!r} declares unknown needs {unknown}; "
                             f"allowed: {', '.join(NEEDS)}, {FAMILY_NEED}NAME")


@dataclasses.dataclass(frozen=True)
class ParameterLayout:
    """Where a model family keeps its parameters, as regular expressions over `named_parameters()`
    names: `trunk` matches every attention and MLP weight matrix of every block; `block` matches a
    block's parameters (LayerNorms included) from the start of the name, with a group `index` (a
    family without it has one block, index 0); `embedding` and `head` match the embeddings and an
    untied output projection.

    A parameter's role (ROLES): `matrix` in the trunk, else `embedding` or `head` where those match,
    else `norm` for a tensor of fewer than 2 dimensions and `matrix` for any other."""

    trunk: str
    block: str
    embedding: str = r"$^"
    head: str = r"$^"

    def role(self, name: str, tensor: torch.Tensor) -> str:
        if re.fullmatch(self.trunk, name):
            return "matrix"
        if re.fullmatch(self.embedding, name):
            return "embedding"
        if re.fullmatch(self.head, name):
            return "head"
        return "norm" if tensor.ndim < 2 else "matrix"

    def parameters(self, model: torch.nn.Module) -> Parameters:
        """The model's trainable parameters with their roles."""
        return Parameters(RoledParameter(name, tensor, self.role(name, tensor))
                          for name, tensor in model.named_parameters() if tensor.requires_grad)

    def trunk_names(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if re.fullmatch(self.trunk, n)]

    def block_index(self, name: str) -> int | None:
        match = re.match(self.block, name)
        if match is None:
            return None
        return int(match.group("index")) if "index" in match.re.groupindex else 0

    def block_names(self, names: Sequence[str], i: int) -> list[str]:
        return [n for n in names if self.block_index(n) == i]

    def block_indices(self, names: Sequence[str]) -> list[int]:
        return sorted({i for i in map(self.block_index, names) if i is not None})


@dataclasses.dataclass(frozen=True)
class ModelPlugin:
    """A model family: declared parameters (in `model.params`), its parameter layout, whether
    autograd can differentiate its forward (metrics that need gradients apply only then), and a
    builder."""

    name: str
    help: str
    build: BuildModel
    layout: ParameterLayout
    params: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    differentiable: bool = True
    source: str = ""
