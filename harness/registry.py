"""Plugin manager: the built-ins and third-party plugins, all found through the `geobench`
entry-point group, and the registries of optimizers, metrics and models they provide."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from geobench import hookspecs
from geobench.errors import UsageError, did_you_mean
from geobench.params import Param

ENTRY_POINT_GROUP = "geobench"


@dataclasses.dataclass(frozen=True)
class OptimizerPlugin:
    """An optimizer: declared hyperparameters and a builder.

    `build(groups, hp, device)` gets `groups`, a list of two torch parameter-group dicts — the
    first with `decay=True` (matrices and embeddings), the second `decay=False` (LayerNorm weights
    and biases) — the validated hyperparameters and the torch device, and returns a
    `torch.optim.Optimizer`. A plugin with `variants` set answers names `NAME:VARIANT` (e.g.
    `torch:Adagrad`) by returning a concrete plugin for the variant.

    A plugin may bring its own model family (`family`, the default of model.family when it is used)
    and its own gradient rule: `gradient(model, optimizer, inputs, targets, mask, lam, hp, scale)`
    accumulates scale × its gradient estimate into the parameters' .grad instead of autograd's
    backward pass, and returns a dict with at least "loss" (NaN marks a diverged step).
    """

    name: str
    help: str
    params: Mapping[str, Param]
    build: Callable[..., Any]
    variants: Callable[[str], OptimizerPlugin] | None = None
    family: str | None = None
    gradient: Callable[..., dict] | None = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class MetricPlugin:
    """A metric: declared options, what it needs from the run, and a compute function.

    `compute(ctx, options)` gets an `AnalysisContext` and returns a JSON-serializable dict with any
    of the keys `scalars` (name → number), `series` (name → list), `tables` (name → list of row
    dicts) and `figures` (list of paths relative to the run directory). The optional
    `check(config, options)` raises a UsageError when a run of that config could never satisfy the
    options (a reheat from a step that will not be checkpointed), so a run or suite fails at once.
    """

    name: str
    help: str
    options: Mapping[str, Param]
    compute: Callable[..., dict]
    needs: tuple[str, ...] = ("checkpoints",)
    check: Callable[..., None] | None = None  # check(config, options): fail early, before training
    source: str = ""


@dataclasses.dataclass(frozen=True)
class ModelPlugin:
    """A model family: `build(model_config, vocab_size)` returns a torch module whose forward maps
    token ids (B, T) to logits (B, T, vocab)."""

    name: str
    help: str
    build: Callable[..., Any]
    source: str = ""


@dataclasses.dataclass
class Registry:
    manager: pluggy.PluginManager
    optimizers: dict[str, OptimizerPlugin]
    metrics: dict[str, MetricPlugin]
    models: dict[str, ModelPlugin]


def _source(manager: pluggy.PluginManager, plugin: object) -> str:
    for loaded, dist in manager.list_plugin_distinfo():
        if loaded is plugin:
            return f"{dist.project_name} {dist.version}"
    return f"registered at runtime ({getattr(plugin, '__name__', type(plugin).__name__)})"


def _collect(manager: pluggy.PluginManager, hook_name: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        source = _source(manager, impl.plugin)

        def register(item: Any, source: str = source) -> None:
            if item.name in found:
                raise UsageError(
                    f"plugin name {item.name!r} is registered twice: "
                    f"by {found[item.name].source} and by {source}"
                )
            found[item.name] = dataclasses.replace(item, source=source)

        impl.function(register=register)
    return dict(sorted(found.items()))


def make_registry(extra_plugins: tuple[object, ...] = ()) -> Registry:
    """Load every entry-point plugin (plus `extra_plugins`) and collect what they register."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        manager.register(plugin)
    return Registry(
        manager=manager,
        optimizers=_collect(manager, "geobench_register_optimizers"),
        metrics=_collect(manager, "geobench_register_metrics"),
        models=_collect(manager, "geobench_register_models"),
    )


@functools.lru_cache(maxsize=1)
def registry() -> Registry:
    return make_registry()


def get_optimizer(name: str, reg: Registry | None = None) -> OptimizerPlugin:
    reg = reg or registry()
    base, sep, variant = name.partition(":")
    plugin = reg.optimizers.get(base)
    if plugin is None:
        raise UsageError(
            f"unknown optimizer {name!r}{did_you_mean(base, reg.optimizers)}; "
            f"available: {', '.join(reg.optimizers)} (see `geobench plugins`)"
        )
    if sep:
        if plugin.variants is None:
            raise UsageError(f"optimizer {base!r} takes no variant (got {name!r})")
        return dataclasses.replace(plugin.variants(variant), source=plugin.source)
    if plugin.variants is not None:
        raise UsageError(f"optimizer {base!r} needs a variant: {base}:NAME, e.g. torch:Adagrad")
    return plugin


def get_metric(name: str, reg: Registry | None = None) -> MetricPlugin:
    reg = reg or registry()
    if name not in reg.metrics:
        available = ", ".join(reg.metrics) or "none installed"
        raise UsageError(f"unknown metric {name!r}{did_you_mean(name, reg.metrics)}; available: {available}")
    return reg.metrics[name]


def get_model(name: str, reg: Registry | None = None) -> ModelPlugin:
    reg = reg or registry()
    if name not in reg.models:
        raise UsageError(f"unknown model family {name!r}{did_you_mean(name, reg.models)}; available: {', '.join(reg.models)}")
    return reg.models[name]
