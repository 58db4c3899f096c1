"""The plugin contract.

A plugin is a module (or object) with functions marked `@geobench.hookimpl`, published under the
`geobench` entry-point group. The `register_*` hooks receive a `register` callable and pass it one
plugin description each; the lifecycle hooks watch a run without the trainer knowing who listens.
"""

import pluggy

hookspec = pluggy.HookspecMarker("geobench")
hookimpl = pluggy.HookimplMarker("geobench")


@hookspec
def geobench_register_optimizers(register):
    """Call `register(OptimizerPlugin(...))` once per optimizer this plugin provides."""


@hookspec
def geobench_register_metrics(register):
    """Call `register(MetricPlugin(...))` once per metric this plugin provides."""


@hookspec
def geobench_register_models(register):
    """Call `register(ModelPlugin(...))` once per model family this plugin provides."""


@hookspec
def geobench_on_step(run, step, loss, lr):
    """For every step, once the host has read its composite loss `loss` (before the step's update is
    applied; on CUDA the losses are read in batches of up to 8 steps); `run` is the live `RunDir`."""


@hookspec
def geobench_on_eval(run, step, record):
    """After every evaluation: `record` is the dict written to evals.jsonl."""


@hookspec
def geobench_on_checkpoint(run, step, path):
    """After a weights-only checkpoint file is in place at `path`."""


@hookspec
def geobench_on_report(run, report):
    """Before report.json is validated and written; add to `report["extensions"][name]`."""
