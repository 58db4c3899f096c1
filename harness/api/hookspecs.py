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
    """For every step whose composite loss `loss` the host has read, with the lr it ran at; `run` is
    the live `RunDir`. The loss is read after the step's gradient and before its update is applied,
    on a CPU at once, on CUDA in batches of up to 8 steps (so calls come in bursts, in step order).
    The step whose loss is not finite is reported too; the run stops after it."""


@hookspec
def geobench_on_eval(run, step, record):
    """After every evaluation: `record` is the `EvalRecord` written to evals.jsonl."""


@hookspec
def geobench_on_checkpoint(run, step, path):
    """After a weights-only checkpoint file is in place at `path`."""


@hookspec
def geobench_on_report(run, report):
    """Before report.json is validated and written: `report` is the typed report (a RunReport, or a
    TrajectoryReport of a manifest's checkpoints); add JSON-serializable data under
    `report.extensions[NAME]`."""
