"""Benchmark suites: a suite is data — a YAML file with a base config, a grid of cells, the metrics
and the table to print — run cell by cell through the same runner as `geobench run`.

Suite file keys: name, description, base (config keys for every cell), grid (a mapping of lists,
crossed, or a list of explicit cells, each a mapping that may carry a `label` and its own `metrics`),
metrics,
metric_options ({metric: {option: value}}), table (how the comparison shows the configurations:
{heading, label_by, order_by}, documents.TableSpec), executor (a name of geobench.executors, or a
mapping with `name` and its options), fail_fast, published ({cell group: {column: value}},
docs/science.md#published-figures, shown beside paper-scale tables), references (published series
of `geobench.published` drawn and tabulated beside the cells at every scale), scales
({tiny|short|paper: {base: ..., metric_options: ...}}).

A cell's group is its configuration less its seed (comparison.group_names): the cells of a grid over
`seed` (or `train.seed`) form one group, with a bootstrap interval over them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any

from geobench import comparison, config, executors, runner
from geobench import published as published_series
from geobench.analysis import plan_metrics
from geobench.api import Config, Param, UsageError, did_you_mean
from geobench.api.documents import to_json
from geobench.api.errors import shown
from geobench.api.params import load_yaml, parse_yaml_text, read_yaml_file
from geobench.documents import CellOutcome, CellRecord, SuiteIndex, TableSpec
from geobench.files import atomic_write_json
from geobench.registry import Registry
from geobench.rundir import RunDir, writer_lock

SUITE_KEYS = ("name", "description", "base", "grid", "metrics", "metric_options", "table", "published", "references",
              "scales", "executor", "fail_fast")
SCALES = ("tiny", "short", "paper")


@dataclasses.dataclass
class Cell:
    label: str
    group: str
    cfg: Config
    plan: runner.MetricPlan
    out: RunDir


@dataclasses.dataclass
class Suite:
    name: str
    description: str
    scale: str
    table: TableSpec
    published: dict[str, dict[str, float]]
    directory: Path
    cells: list[Cell]
    reg: Registry
    references: list[str] = dataclasses.field(default_factory=list)
    executor: executors.Settings = dataclasses.field(default_factory=executors.Settings)


def builtin() -> dict[str, str]:
    """Suites shipped with geobench: name → description."""
    found = {}
    for entry in resources.files("geobench.suite_files").iterdir():
        if entry.name.endswith(".yaml"):
            data = load_yaml(entry.read_text())
            found[entry.name.removesuffix(".yaml")] = data.get("description", "")
    return dict(sorted(found.items()))


def _read(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise UsageError(f"suite file {name_or_path!r} does not exist")
        text, where = None, name_or_path
    else:
        shipped = builtin()
        if name_or_path not in shipped:
            raise UsageError(f"unknown suite {name_or_path!r}{did_you_mean(name_or_path, shipped)}; "
                             f"built-in: {', '.join(shipped)} (or a path to a .yaml file)")
        text, where = resources.files("geobench.suite_files").joinpath(f"{name_or_path}.yaml").read_text(), name_or_path
    data = read_yaml_file(path, "suite") if text is None else parse_yaml_text(text, f"suite {where!r}")
    if not isinstance(data, dict):
        raise UsageError(f"suite {where!r} must be a mapping")
    unknown = [k for k in data if k not in SUITE_KEYS]
    if unknown:
        raise UsageError(f"suite {where!r} has unknown key {unknown[0]!r}{did_you_mean(unknown[0], SUITE_KEYS)}; "
                         f"allowed: {', '.join(SUITE_KEYS)}")
    return data, where


TABLE_KEYS = {"heading": Param("configuration", "the heading of the table's first column"),
              "label_by": Param(None, "an optimizer hyperparameter whose value names each row", kind=str, nullable=True),
              "order_by": Param(None, "a column that ranks the rows (ascending)", kind=str, nullable=True)}


def table_spec(value: Any, where: str) -> TableSpec:
    """The suite's `table` mapping, checked against TABLE_KEYS."""
    if value is None:
        return TableSpec()
    if not isinstance(value, dict):
        raise UsageError(f"suite {where!r}: table must be a mapping of {', '.join(TABLE_KEYS)} (e.g. "
                         f"{{heading: β₂, label_by: beta2}}), not {shown(value)}")
    unknown = [k for k in value if k not in TABLE_KEYS]
    if unknown:
        raise UsageError(f"suite {where!r}: table has unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), TABLE_KEYS)}; "
                         f"allowed: {', '.join(TABLE_KEYS)}")
    return TableSpec(**{k: spec.check(f"table.{k}", value[k]) if k in value else spec.default
                                   for k, spec in TABLE_KEYS.items()})


MAX_CELLS = 10_000  # a grid whose product is larger is a typo, not a benchmark


def _cells(grid: Any, where: str) -> list[dict]:
    if isinstance(grid, dict):
        if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise UsageError(f"suite {where!r}: the grid is empty (every grid key needs a non-empty list)")
        keys = list(grid)
        count = math.prod(len(grid[k]) for k in keys)
        if count > MAX_CELLS:
            raise UsageError(f"suite {where!r}: the grid makes {count:,} cells; at most {MAX_CELLS:,} are allowed")
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if isinstance(grid, list) and grid and all(isinstance(c, dict) for c in grid):
        return [dict(c) for c in grid]
    raise UsageError(f"suite {where!r}: the grid is empty (give a mapping of lists or a list of cells)")


def path_component(text: str, what: str) -> str:
    """`text` if it can name one directory inside another (no separator, not `.` or `..`), else a UsageError."""
    if not re.fullmatch(r"[A-Za-z0-9_=,+-][A-Za-z0-9_.=,+-]*", text):
        raise UsageError(f"{what} {shown(text)} cannot name a directory: use letters, digits and _ . = , + - "
                         "(not starting with a dot)")
    return text


def _merge_options(where: str, *layers: Any) -> dict:
    merged: dict = {}
    for layer in layers:
        if not isinstance(layer or {}, dict) or not all(isinstance(v or {}, dict) for v in (layer or {}).values()):
            raise UsageError(f"suite {where!r}: metric_options must map metric names to {{option: value}} mappings")
        for metric, values in (layer or {}).items():
            merged.setdefault(metric, {}).update(values or {})
    return merged


def load(name_or_path: str, scale: str, overrides: dict[str, str], directory: str | None,
         reg: Registry) -> Suite:
    """Read and check a suite completely: every cell's config, optimizer, metrics and options."""
    data, where = _read(name_or_path)
    overrides = dict(overrides)
    try:
        executor = executors.settings(data.get("executor"), overrides, overrides.pop("fail_fast", data.get("fail_fast", False)))
    except UsageError as exc:
        raise UsageError(f"suite {where!r}: {exc}") from None
    if scale not in SCALES:
        raise UsageError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    def mapping(value: Any, what: str) -> dict:
        if not isinstance(value or {}, dict):
            raise UsageError(f"suite {where!r}: {what} must be a mapping, not {shown(value)}")
        return value or {}

    scaled = mapping(mapping(data.get("scales"), "scales").get(scale), f"scales.{scale}")
    base = {**mapping(data.get("base"), "base"), **mapping(scaled.get("base"), f"scales.{scale}.base")}
    options = _merge_options(where, data.get("metric_options"), scaled.get("metric_options"))
    metrics = data.get("metrics")  # absent: each run's default metrics
    table = table_spec(data.get("table"), where)
    name = path_component(str(data.get("name") or Path(where).stem), f"suite {where!r}: name")
    root = Path(directory) if directory else Path("runs") / "suites" / f"{name}-{scale}"
    cells: list[Cell] = []
    raw_cells = _cells(data.get("grid"), where)
    varying = [k for k in dict.fromkeys(k for c in raw_cells for k in c) if k != "label"
               and len({json.dumps(c.get(k)) for c in raw_cells}) > 1]
    for raw in raw_cells:
        values = {**base, **raw, **overrides}
        given = values.pop("label", "")
        label = path_component(str(given), f"suite {where!r}: label") if given else re.sub(
            r"[^A-Za-z0-9_.=,+-]", "_", "-".join([str(values.get("optimizer", ""))]
                                                 + [f"{k}={raw[k]}" for k in varying if k in raw and k != "optimizer"]))
        if any(cell.label == label for cell in cells):
            raise UsageError(f"suite {where!r}: two cells have the label {label!r}; each cell needs its own "
                             "(it names the cell's run directory)")
        optimizer = values.pop("optimizer", None)
        if not optimizer:
            raise UsageError(f"suite {where!r}: cell {label!r} names no optimizer")
        values.setdefault("preset", "tiny" if scale == "tiny" else "paper")
        values.setdefault("metrics", metrics)  # a cell may name its own
        try:
            cfg = config.resolve(str(optimizer), values, None, reg, "paper")
            out = RunDir(root / label)
            if not out.is_empty():
                cfg.train.resume = True  # an interrupted cell continues
            planned, _ = plan_metrics(cfg, reg)
            checked = runner.check(cfg, out, reg, {f"{m}.{k}": v for m, opts in options.items() if m in planned
                                                   for k, v in opts.items()})
        except UsageError as exc:
            raise UsageError(f"suite {where!r}, cell {label!r}: {exc}") from None
        cells.append(Cell(label, "", cfg, checked, out))
    for cell, group in zip(cells, comparison.group_names([(c.label, config.to_dict(c.cfg)) for c in cells])):
        cell.group = group
    computed = {name for cell in cells for name in cell.plan.names}
    for metric in options:  # options of a metric that `metrics=` on the command line left out are moot
        if metric not in reg.metrics or (metric not in computed and "metrics" not in overrides):
            raise UsageError(f"suite {where!r}: metric_options names metric {metric!r}, which no cell computes"
                             f"{did_you_mean(str(metric), computed)} (computed: {', '.join(sorted(computed)) or 'none'})")
    published = data.get("published") or {}
    try:
        references = published_series.resolve(",".join(data.get("references") or [])) if data.get("references") else []
    except UsageError as exc:
        raise UsageError(f"suite {where!r}: {exc}") from None
    return Suite(name, data.get("description", ""), scale, table, published if scale == "paper" else {}, root, cells, reg,
                 references, executor)


def jobs(suite: Suite) -> list[executors.CellJob]:
    return [executors.CellJob(c.label, str(suite.directory.resolve()), str(c.out.path.resolve()), c.cfg,
                              c.plan, f"suite {suite.name}, scale {suite.scale}") for c in suite.cells]


def states(suite: Suite) -> dict[str, CellOutcome]:
    """Where every cell stands (executors.cell_state)."""
    return {job.label: executors.cell_state(job) for job in jobs(suite)}


def run(suite: Suite, *, wait: bool = True, cluster: str = "slurm") -> dict[str, CellOutcome]:
    """Hand every cell not finished yet to the suite's executor (cells running or queued elsewhere
    are left to finish); a failing cell is recorded and the others go on unless fail_fast. Writes the
    index and, when this process waited, the comparison of the finished cells. Returns how every
    cell stands."""
    def say(line: str) -> None:
        print(f"geobench bench: {line}", flush=True)

    statuses: dict[str, CellOutcome] = {}
    with writer_lock(suite.directory, "bench"):
        todo, elsewhere = [], []
        for job in jobs(suite):
            outcome = executors.cell_state(job)
            if outcome.finished:
                statuses[job.label] = outcome
                say(f"{job.label}: already {outcome}, skipped")
            elif outcome.state in ("running", "queued"):
                statuses[job.label] = outcome
                elsewhere.append(job)
                say(f"{job.label}: {outcome.state} elsewhere ({outcome.detail}), not submitted again")
            else:
                todo.append(job)
        statuses.update(executors.execute(todo, suite.executor, reg=suite.reg, wait=wait, say=say, cluster=cluster))
        if wait:
            for job in elsewhere:  # e.g. the cells of a killed `bench --executor local` still training
                while executors.cell_state(job).state in ("running", "queued"):
                    time.sleep(2)
                statuses[job.label] = executors.cell_state(job)
        index = suite_index(suite, statuses)
        atomic_write_json(suite.directory / "suite.json", to_json(index))
        finished = [c for c in suite.cells if c.out.status() is not None]
        if wait and finished:
            runs = [comparison.load(c.out.path, c.label) for c in finished]
            doc = comparison.build(runs, f"geobench suite {suite.name} ({suite.scale})", suite.reg, suite.table,
                                   suite.published, suite.references, index)
            comparison.write(suite.directory, doc, runs, suite.reg)
    return statuses


def suite_index(suite: Suite, statuses: dict[str, CellOutcome]) -> SuiteIndex:
    """suite.json: what `geobench report SUITE_DIR` rebuilds the comparison from."""
    return SuiteIndex(name=suite.name, description=suite.description, scale=suite.scale,
                      table=suite.table, published=suite.published, references=suite.references,
                      cells=[CellRecord(c.label, c.group, c.out.path.name, statuses.get(c.label, CellOutcome("pending")))
                             for c in suite.cells])
