"""The plugin API: everything an optimizer, metric or model plugin builds on, in one place that
imports nothing else of geobench.

- `Param` (declared options and hyperparameters) and `UsageError` (bad input, one line, exit 2);
- the plugin descriptors `OptimizerPlugin`, `MetricPlugin`, `ModelPlugin` with `ParameterLayout`,
  and the protocols of the functions they carry;
- `Batch`, `Parameters` (the model's parameters with their roles), `TrainingSchedule`;
- `EvalRecord` (one evaluation of a run) and `MetricResult` (what a metric returns);
- `MetricContext`, what a metric's `compute` receives, and the views it is made of;
- `Config` and its sections, the typed run configuration a check or a builder receives;
- `hookimpl`, to mark the functions of a plugin module.

Writing a plugin: docs/writing-an-optimizer-plugin.md and docs/writing-a-metric-plugin.md.
"""

from geobench.api.batch import Batch
from geobench.api.config import Config, DataConfig, ModelConfig, OptimizerConfig, ProbeConfig, TrainConfig
from geobench.api.context import (
    BACKBONE_CHECKPOINTS,
    BackboneView,
    CheckpointSource,
    EvaluationSets,
    GramView,
    MetricContext,
    PCAView,
    Retrain,
    TrainedSetup,
    TrajectoryView,
    UndeclaredNeed,
)
from geobench.api.documents import EvalRecord, Measures, MetricResult
from geobench.api.errors import UsageError, did_you_mean
from geobench.api.hookspecs import hookimpl
from geobench.api.params import Param, seed_param
from geobench.api.plugins import (
    NEEDS,
    ROLES,
    SCOPE,
    BuildModel,
    BuildOptimizer,
    CheckMetric,
    ComparedRun,
    ComparisonFigures,
    ComputeMetric,
    GradientRule,
    MetricPlugin,
    ModelPlugin,
    OptimizerPlugin,
    ParameterLayout,
    Parameters,
    Plugins,
    PrepareStep,
    RoledParameter,
    SaveFigure,
    TrainingSchedule,
)

__all__ = [
    "BACKBONE_CHECKPOINTS",
    "NEEDS",
    "ROLES",
    "SCOPE",
    "BackboneView",
    "Batch",
    "BuildModel",
    "BuildOptimizer",
    "CheckMetric",
    "CheckpointSource",
    "ComparedRun",
    "ComparisonFigures",
    "ComputeMetric",
    "Config",
    "DataConfig",
    "EvalRecord",
    "EvaluationSets",
    "GradientRule",
    "GramView",
    "Measures",
    "MetricContext",
    "MetricPlugin",
    "MetricResult",
    "ModelConfig",
    "ModelPlugin",
    "OptimizerConfig",
    "OptimizerPlugin",
    "PCAView",
    "Param",
    "ParameterLayout",
    "Parameters",
    "Plugins",
    "PrepareStep",
    "ProbeConfig",
    "Retrain",
    "RoledParameter",
    "SaveFigure",
    "TrainConfig",
    "TrainedSetup",
    "TrainingSchedule",
    "TrajectoryView",
    "UndeclaredNeed",
    "UsageError",
    "did_you_mean",
    "hookimpl",
    "seed_param",
]
