"""The one way metric plugins see a run: the analysis context, and running a set of metrics so
that one failing metric is recorded as failed while the others still run."""

from __future__ import annotations

import dataclasses
import functools
import traceback

import torch
import yaml

from geobench import config as config_mod
from geobench import registry as plugin_registry
from geobench.errors import UsageError
from geobench.trajectory import RunDir


@dataclasses.dataclass
class AnalysisContext:
    run: RunDir
    config: config_mod.Config

    @classmethod
    def open(cls, path, reg: plugin_registry.Registry | None = None) -> AnalysisContext:
        run = RunDir(path)
        if not run.config.exists():
            raise UsageError(f"{str(path)!r} is not a geobench run directory (no config.yaml)")
        tree = yaml.safe_load(run.config.read_text())
        opt = plugin_registry.get_optimizer(tree["optimizer"]["name"], reg)
        return cls(run, config_mod.build(tree, opt.params))

    @functools.cached_property
    def evals(self) -> list[dict]:
        return self.run.read_evals()

    def checkpoint_steps(self) -> list[int]:
        return self.run.checkpoint_steps()

    def load_checkpoint(self, step: int, names=None) -> dict[str, torch.Tensor]:
        return self.run.load_checkpoint(step, names)

    @functools.cached_property
    def live(self):
        """The run's model, data and evaluator rebuilt from its config (for metrics that need
        gradients or evaluations); load a checkpoint into `live.model` before use."""
        from geobench.train import prepare

        return prepare(self.config)


def run_metrics(ctx: AnalysisContext, names: list[str], reg: plugin_registry.Registry | None = None) -> dict:
    reg = reg or plugin_registry.registry()
    results = {}
    for name in names:
        plugin = plugin_registry.get_metric(name, reg)
        options = {key: spec.default for key, spec in plugin.options.items()}
        try:
            output = plugin.compute(ctx, options)
            results[name] = {"status": "ok", "source": plugin.source, "options": options, **output}
        except Exception as exc:  # one broken metric must not cost the others their results
            results[name] = {"status": "failed", "source": plugin.source, "options": options,
                             "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(limit=5)}
    return results
