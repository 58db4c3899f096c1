"""The host's documents: the run report, the report of a manifest's trajectory, the outcome of a
metric, the comparison of runs and a suite's index, as dataclasses read and written by one
(de)serializer (`geobench.api.documents`). The JSON Schemas in reports/schema describe the same
documents; tests/test_documents.py checks that the two agree."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from geobench.api.documents import EvalRecord, MetricResult, always, from_json, to_json
from geobench.api.errors import UsageError
from geobench.files import read_json

SCHEMA_VERSION = "1.0"  # of report.json
COMPARISON_SCHEMA_VERSION = "2.1"
RunStatus = Literal["completed", "diverged", "interrupted"]


@dataclasses.dataclass
class MetricOutcome(MetricResult):
    """A metric's entry in a report: its result (the fields of MetricResult, at the top level) and
    how it went: `ok`, `failed` (with the error) or `skipped` (with the reason it cannot apply)."""

    status: Literal["ok", "failed", "skipped"] = "ok"
    source: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    error: str | None = None
    traceback: str | None = None
    seconds: float | None = None  # how long computing it took
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys of other versions, kept

    @classmethod
    def ok(cls, result: MetricResult, *, source: str, options: dict[str, Any], seconds: float) -> MetricOutcome:
        return cls(**{f.name: getattr(result, f.name) for f in dataclasses.fields(MetricResult)}, status="ok",
                   source=source, options=options, seconds=round(seconds, 3))


@dataclasses.dataclass
class RunInfo:
    name: str
    status: RunStatus
    last_step: int
    steps_planned: int
    diverged_at: int | None
    resumed_from: int | None
    started: str
    finished: str
    preset: str
    preset_reason: str
    divergence: str | None = None
    stopped_early_at: int | None = None
    baseline_val_loss: float | None = None


@dataclasses.dataclass
class Environment:
    python: str
    platform: str
    torch: str
    device: str
    threads: int
    git_revision: str | None
    packages: dict[str, str]
    processes: int | None = None


@dataclasses.dataclass
class Throughput:
    train_seconds: float
    tokens: int
    tokens_per_second: float | None
    compile_seconds: float | None = None


@dataclasses.dataclass
class FinalSummary:
    """The last evaluation, and the best p_ood of the run and its step."""

    step: int
    val_loss: float | None
    p_in: float | None
    p_ood: float | None
    nll_ood: float | None
    lm_ood: float | None
    r_ood: float | None
    best_p_ood: float | None
    best_p_ood_step: int | None


@dataclasses.dataclass
class ModelInfo:
    family: str
    parameters: dict[str, int]  # total, trunk


@dataclasses.dataclass
class RunReport:
    """report.json of a training run. `corpus`, `tokenizer` and `optimizer` are the descriptions
    their owners give (data.corpus, data.tokenizer, optim.describe); `config` the resolved config."""

    schema_version: str
    geobench_version: str
    run: RunInfo
    environment: Environment
    corpus: dict[str, Any]
    tokenizer: dict[str, Any]
    model: ModelInfo
    optimizer: dict[str, Any]
    config: dict[str, Any]
    throughput: Throughput
    evals: list[EvalRecord]
    final: FinalSummary | None
    metrics: dict[str, MetricOutcome]
    extensions: dict[str, Any] = always(dict)


@dataclasses.dataclass
class TrajectoryInfo:
    kind: Literal["manifest"]
    source: str
    optimizer: str
    params: str
    steps: list[int]
    parameters: int
    dimension: int
    started: str
    finished: str


@dataclasses.dataclass
class TrajectoryReport:
    """report.json of an analysis of checkpoints geobench did not write: no training sections."""

    schema_version: str
    geobench_version: str
    environment: Environment
    trajectory: TrajectoryInfo
    metrics: dict[str, MetricOutcome]
    extensions: dict[str, Any] = always(dict)


Report = RunReport | TrajectoryReport


def report_to_json(report: Report) -> dict[str, Any]:
    data = to_json(report)
    if isinstance(report, RunReport) and report.final is None:
        data["final"] = {}  # the schema's form of "no evaluation"
    return data


def report_from_json(data: Any, what: str) -> Report:
    if isinstance(data, dict) and "trajectory" in data:
        return from_json(TrajectoryReport, data, what)
    if isinstance(data, dict) and data.get("final") == {}:
        data = {**data, "final": None}
    return from_json(RunReport, data, what)


def read_report(path: Any) -> Report:
    return report_from_json(read_json(path, "report"), str(path))


def read_run_report(path: Any) -> RunReport:
    """The report of a training run; an `analyze --manifest` report is refused in one line."""
    report = read_report(path)
    if not isinstance(report, RunReport):
        raise UsageError(f"{str(path)!r} is the report of a manifest's checkpoints (`analyze --manifest`), not of a "
                         "training run; there is no training to compare")
    return report


# --- suites

CellState = Literal["pending", "running", "queued", "submitted", "completed", "diverged", "interrupted", "failed",
                    "cancelled"]


@dataclasses.dataclass
class CellOutcome:
    """Where a suite's cell stands: `state`, and in words what happened (the divergence step, the
    error of a failed cell and where its log is)."""

    state: CellState
    detail: str = ""

    @property
    def finished(self) -> bool:
        """The cell wrote its report (it completed, or diverged: a result too)."""
        return self.state in ("completed", "diverged")

    def __str__(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


@dataclasses.dataclass
class CellRecord:
    label: str
    group: str
    directory: str
    outcome: CellOutcome


@dataclasses.dataclass
class TableSpec:
    """How a comparison's table shows its configurations: the heading of its first column; the
    optimizer hyperparameter whose value names each row (`label_by`, e.g. beta2), else the group's
    name; and the column that ranks the rows (`order_by`, ascending, missing values last), else the
    order the runs came in."""

    heading: str = "configuration"
    label_by: str | None = None
    order_by: str | None = None


@dataclasses.dataclass
class SuiteIndex:
    """suite.json: everything `geobench report SUITE_DIR` needs to rebuild the comparison — the
    cells and their groups, the table, the published figures and the reference series."""

    name: str
    description: str
    scale: str
    table: TableSpec
    cells: list[CellRecord]
    published: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    references: list[str] = dataclasses.field(default_factory=list)
