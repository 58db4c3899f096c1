"""Benchmark suites: a suite is data — a YAML file with a base config, a grid of cells, the metrics
and the table to print — run cell by cell through the same runner as `geobench run`.

Suite file keys: name, description, base (config keys for every cell), grid (a mapping of lists,
crossed, or a list of explicit cells, each a mapping that may carry a `label` and its own `metrics`),
metrics,
metric_options ({metric: {option: value}}), table (main | beta2 | sgd | reheat), executor (a name of
geobench.executors, or a mapping with `name` and its options), fail_fast, published
({cell group: {column: value}}, docs/science.md#published-figures, shown beside paper-scale tables), references (published series
of `geobench.published` drawn and tabulated beside the cells at every scale), scales ({tiny|short|paper:
{base: ..., metric_options: ...}}).
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
from geobench.api import Config, UsageError, did_you_mean
from geobench.api.errors import shown
from geobench.api.params import load_yaml, parse_yaml_text, read_yaml_file
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
    table: str
    published: dict
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


def load_published(name: str) -> dict:
    return _read(name)[0].get("published") or {}


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
    table = data.get("table", "main")
    if table not in comparison.TABLES:
        raise UsageError(f"suite {where!r}: table {table!r} is not one of {', '.join(comparison.TABLES)}")
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
        group = "-".join(part for part in label.split("-") if not part.startswith("seed="))
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
        cells.append(Cell(label, group, cfg, checked, out))
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


def states(suite: Suite) -> dict[str, tuple[str, str]]:
    """{label: (state, detail)} of every cell (executors.cell_state)."""
    return {job.label: executors.cell_state(job) for job in jobs(suite)}


def run(suite: Suite, *, wait: bool = True, cluster: str = "slurm") -> dict[str, str]:
    """Hand every cell not finished yet to the suite's executor (cells running or queued elsewhere
    are left to finish); a failing cell is recorded and the others go on unless fail_fast. Writes the
    index and, when this process waited, the comparison of the finished cells. Returns every
    cell's status."""
    def say(line: str) -> None:
        print(f"geobench bench: {line}", flush=True)

    statuses: dict[str, str] = {}
    with writer_lock(suite.directory, "bench"):
        todo, elsewhere = [], []
        for job in jobs(suite):
            state, detail = executors.cell_state(job)
            if state == "finished":
                statuses[job.label] = detail
                say(f"{job.label}: already {detail}, skipped")
            elif state in ("running", "queued"):
                statuses[job.label] = state
                elsewhere.append(job)
                say(f"{job.label}: {state} elsewhere ({detail}), not submitted again")
            else:
                todo.append(job)
        statuses.update(executors.execute(todo, suite.executor, reg=suite.reg, wait=wait, say=say, cluster=cluster))
        if wait:
            for job in elsewhere:  # e.g. the cells of a killed `bench --executor local` still training
                while executors.cell_state(job)[0] in ("running", "queued"):
                    time.sleep(2)
                statuses[job.label] = executors.cell_state(job)[1] or "missing"
        _write_index(suite, statuses)
        finished = [c for c in suite.cells if c.out.status() is not None]
        if wait and finished:
            doc, docs = comparison.build([c.out.path for c in finished], f"geobench suite {suite.name} ({suite.scale})",
                                      suite.reg, suite.table, suite.published, {str(c.out.path): c.label for c in finished},
                                      {str(c.out.path): c.group for c in finished},
                                      {"suite": {"name": suite.name, "scale": suite.scale, "cells": statuses}},
                                      suite.references)
            comparison.write(suite.directory, doc, docs, suite.reg)
    return statuses


def _write_index(suite: Suite, statuses: dict[str, str]) -> None:
    atomic_write_json(suite.directory / "suite.json", {
        "name": suite.name, "description": suite.description, "scale": suite.scale, "table": suite.table,
        "references": suite.references,
        "cells": [{"label": c.label, "group": c.group, "directory": c.out.path.name,
                   "status": statuses.get(c.label, "pending")} for c in suite.cells]})
