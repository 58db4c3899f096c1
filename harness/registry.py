"""The plugin manager: the registry of the plugins found through the `geobench` entry-point group
(their contract is `geobench.api`).

One rule for registries: the command line builds the registry of the installed plugins once
(`installed()`), and every function that needs a plugin receives a `Registry` explicitly — the
trainer, the analysis context (and the runs it derives), suites and their executors. A plugin
registered through `make_registry(extra_plugins=…)` therefore works on every path. Only a worker
in another process rebuilds the registry, from the installed entry points.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pluggy

from geobench.api import NEEDS, Config, MetricPlugin, ModelPlugin, OptimizerPlugin, UsageError, did_you_mean, hookspecs
from geobench.api.plugins import FAMILY_NEED

ENTRY_POINT_GROUP = "geobench"


@dataclasses.dataclass
class Registry:
    manager: pluggy.PluginManager
    optimizers: dict[str, OptimizerPlugin]
    metrics: dict[str, MetricPlugin]
    models: dict[str, ModelPlugin]

    @property
    def hooks(self) -> Any:
        """The lifecycle hooks of every registered plugin (`hooks.geobench_on_step(...)`)."""
        return self.manager.hook

    def optimizer(self, name: str) -> OptimizerPlugin:
        base, sep, variant = name.partition(":")
        plugin = self.optimizers.get(base)
        if plugin is None:
            raise UsageError(f"unknown optimizer {name!r}{did_you_mean(base, self.optimizers)}; "
                             f"available: {', '.join(self.optimizers)} (see `geobench plugins`)")
        if sep:
            if plugin.variants is None:
                raise UsageError(f"optimizer {base!r} takes no variant (got {name!r})")
            return dataclasses.replace(plugin.variants(variant), source=plugin.source)
        if plugin.variants is not None:
            raise UsageError(f"optimizer {base!r} needs a variant: {base}:NAME, e.g. torch:Adagrad")
        why = plugin.unavailable()
        if why:
            raise UsageError(why)
        return plugin

    def metric(self, name: str) -> MetricPlugin:
        if name not in self.metrics:
            available = ", ".join(self.metrics) or "none installed"
            raise UsageError(f"unknown metric {name!r}{did_you_mean(name, self.metrics)}; available: {available}")
        return self.metrics[name]

    def model(self, name: str) -> ModelPlugin:
        if name not in self.models:
            raise UsageError(f"unknown model family {name!r}{did_you_mean(name, self.models)}; "
                             f"available: {', '.join(self.models)}")
        return self.models[name]

    def unmet_need(self, metric: str, cfg: Config | None) -> str | None:
        """Why `metric` cannot apply to a run of `cfg` (None: a manifest's trajectory, checkpoints
        only), or None when it can."""
        plugin = self.metric(metric)
        for need in plugin.needs:
            if need == "checkpoints" or (cfg is None and need == "evals"):  # a manifest's history is empty
                continue
            if cfg is None:
                return f"it needs {NEEDS.get(need, need)}, and a manifest's trajectory has checkpoints only"
            family = self.model(cfg.model.family)
            if need.startswith(FAMILY_NEED) and need.removeprefix(FAMILY_NEED) != family.name:
                return f"it needs model family {need.removeprefix(FAMILY_NEED)}, and this run trains {family.name}"
            if need == "gradients" and not family.differentiable:
                return f"it needs {NEEDS[need]}, and model family {family.name} is not differentiable by autograd"
            if need == "probe" and cfg.probe.p_probe == 0:
                return f"it needs {NEEDS[need]}"
        return None


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
def installed() -> Registry:
    """The registry of the installed plugins, built once per process: for the command line and
    for workers in other processes, which hand it on explicitly."""
    return make_registry()
