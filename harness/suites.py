"""Benchmark suites: a suite is data — a YAML file with a base config, a grid of cells, the metrics
and the table to print — run cell by cell through the same runner as `geobench run`.

Suite file keys: name, description, base (config keys for every cell), grid (a mapping of lists,
crossed, or a list of explicit cells, each a mapping that may carry a `label` and its own `metrics`),
metrics,
metric_options ({metric: {option: value}}), table (main | beta2 | sgd | reheat), published
({cell group: {column: value}}, SPEC §5, shown beside paper-scale tables), references (published series
of `geobench.published` drawn and tabulated beside the cells at every scale), scales ({tiny|short|paper:
{base: ..., metric_options: ...}}).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from geobench import compare, config, runner
from geobench import published as published_series
from geobench import registry as plugin_registry
from geobench.errors import UsageError, did_you_mean
from geobench.trajectory import RunDir, atomic_write_json

SUITE_KEYS = ("name", "description", "base", "grid", "metrics", "metric_options", "table", "published", "references",
              "scales")
SCALES = ("tiny", "short", "paper")
DONE = ("completed", "diverged")


@dataclasses.dataclass
class Cell:
    label: str
    group: str
    cfg: config.Config
    metric_options: dict
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
    references: list[str] = dataclasses.field(default_factory=list)


def builtin() -> dict[str, str]:
    """Suites shipped with geobench: name → description."""
    found = {}
    for entry in resources.files("geobench.suite_files").iterdir():
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text())
            found[entry.name.removesuffix(".yaml")] = data.get("description", "")
    return dict(sorted(found.items()))


def _read(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise UsageError(f"suite file {name_or_path!r} does not exist")
        text, where = path.read_text(), name_or_path
    else:
        shipped = builtin()
        if name_or_path not in shipped:
            raise UsageError(f"unknown suite {name_or_path!r}{did_you_mean(name_or_path, shipped)}; "
                             f"built-in: {', '.join(shipped)} (or a path to a .yaml file)")
        text, where = resources.files("geobench.suite_files").joinpath(f"{name_or_path}.yaml").read_text(), name_or_path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UsageError(f"malformed YAML in suite {where!r}") from None
    if not isinstance(data, dict):
        raise UsageError(f"suite {where!r} must be a mapping")
    unknown = [k for k in data if k not in SUITE_KEYS]
    if unknown:
        raise UsageError(f"suite {where!r} has unknown key {unknown[0]!r}{did_you_mean(unknown[0], SUITE_KEYS)}; "
                         f"allowed: {', '.join(SUITE_KEYS)}")
    return data, where


def load_published(name: str) -> dict:
    return _read(name)[0].get("published") or {}


def _cells(grid: Any, where: str) -> list[dict]:
    if isinstance(grid, dict):
        if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise UsageError(f"suite {where!r}: the grid is empty (every grid key needs a non-empty list)")
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if isinstance(grid, list) and grid and all(isinstance(c, dict) for c in grid):
        return [dict(c) for c in grid]
    raise UsageError(f"suite {where!r}: the grid is empty (give a mapping of lists or a list of cells)")


def _merge_options(*layers: dict | None) -> dict:
    merged: dict = {}
    for layer in layers:
        for metric, values in (layer or {}).items():
            merged.setdefault(metric, {}).update(values or {})
    return merged


def load(name_or_path: str, scale: str, overrides: dict[str, str], directory: str | None,
         reg: plugin_registry.Registry) -> Suite:
    """Read and check a suite completely: every cell's config, optimizer, metrics and options."""
    data, where = _read(name_or_path)
    if scale not in SCALES:
        raise UsageError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    scaled = (data.get("scales") or {}).get(scale, {}) or {}
    base = {**(data.get("base") or {}), **(scaled.get("base") or {})}
    options = _merge_options(data.get("metric_options"), scaled.get("metric_options"))
    metrics = data.get("metrics") or []
    table = data.get("table", "main")
    if table not in compare.TABLES:
        raise UsageError(f"suite {where!r}: table {table!r} is not one of {', '.join(compare.TABLES)}")
    name = data.get("name") or Path(where).stem
    root = Path(directory) if directory else Path("runs") / "suites" / f"{name}-{scale}"
    cells = []
    raw_cells = _cells(data.get("grid"), where)
    varying = [k for k in dict.fromkeys(k for c in raw_cells for k in c) if k != "label"
               and len({json.dumps(c.get(k)) for c in raw_cells}) > 1]
    for raw in raw_cells:
        values = {**base, **raw, **overrides}
        label = str(values.pop("label", "") or "-".join(
            [str(values.get("optimizer", ""))] + [f"{k}={raw[k]}" for k in varying if k in raw and k != "optimizer"]))
        group = "-".join(part for part in label.split("-") if not part.startswith("seed="))
        optimizer = values.pop("optimizer", None)
        if not optimizer:
            raise UsageError(f"suite {where!r}: cell {label!r} names no optimizer")
        values.setdefault("preset", "tiny" if scale == "tiny" else "paper")
        values.setdefault("metrics", metrics)  # a cell may name its own
        cell_metrics = values["metrics"]
        try:
            cfg = config.resolve(str(optimizer), values, None,
                                 lambda n: plugin_registry.get_optimizer(n, reg), "paper")
            out = RunDir(root / label)
            if not out.is_empty():
                cfg.train.resume = True  # an interrupted cell continues
            checked = runner.check(cfg, out, reg, {f"{m}.{k}": v for m, opts in options.items() if m in cell_metrics
                                                   for k, v in opts.items()})
        except UsageError as exc:
            raise UsageError(f"suite {where!r}, cell {label!r}: {exc}") from None
        cells.append(Cell(label, group, cfg, checked, out))
    published = data.get("published") or {}
    try:
        references = published_series.resolve(",".join(data.get("references") or [])) if data.get("references") else []
    except UsageError as exc:
        raise UsageError(f"suite {where!r}: {exc}") from None
    return Suite(name, data.get("description", ""), scale, table, published if scale == "paper" else {}, root, cells,
                 references)


@contextlib.contextmanager
def lock(directory: Path):
    """Refuse a second suite writing into the same directory while the first is alive."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = path.read_text().strip() or "?"
        if holder.isdigit() and _alive(int(holder)):
            raise UsageError(f"suite directory {str(directory)!r} is in use by process {holder} "
                             "(another geobench bench); wait for it or choose another with --out") from None
        path.unlink(missing_ok=True)  # left behind by a process that is gone
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_of(out: RunDir) -> str | None:
    if not out.report_json.exists():
        return None
    return json.loads(out.report_json.read_text())["run"]["status"]


def run(suite: Suite, reg: plugin_registry.Registry) -> dict[str, str]:
    """Run every cell not done yet; a failing cell is recorded and the others go on. Returns the
    status of every cell."""
    statuses: dict[str, str] = {}
    durations: list[float] = []
    n = len(suite.cells)
    with lock(suite.directory):
        for i, cell in enumerate(suite.cells, 1):
            done = status_of(cell.out)
            if done in DONE:
                statuses[cell.label] = done
                print(f"geobench bench: [{i}/{n}] {cell.label}: already {done}, skipped", flush=True)
                continue
            remaining = n - i + 1
            eta = f"; suite ETA {_duration(sum(durations) / len(durations) * remaining)}" if durations else ""
            print(f"geobench bench: [{i}/{n}] {cell.label}: running{eta}", flush=True)
            start = time.monotonic()
            try:
                doc = runner.execute(cell.cfg, cell.out, reg, f"suite {suite.name}, scale {suite.scale}",
                                     cell.metric_options)
                statuses[cell.label] = doc["run"]["status"]
            except UsageError as exc:
                statuses[cell.label] = f"failed: {exc}"
            except Exception as exc:  # one broken cell must not cost the suite the others
                statuses[cell.label] = f"failed: {type(exc).__name__}: {exc}"
            durations.append(time.monotonic() - start)
            print(f"geobench bench: [{i}/{n}] {cell.label}: {statuses[cell.label]} in {_duration(durations[-1])}",
                  flush=True)
            _write_index(suite, statuses)
            if statuses[cell.label] == "interrupted":
                break
        _write_index(suite, statuses)
        finished = [c for c in suite.cells if status_of(c.out) is not None]
        if finished:
            doc, docs = compare.build([c.out.path for c in finished], f"geobench suite {suite.name} ({suite.scale})",
                                      suite.table, suite.published, {str(c.out.path): c.label for c in finished},
                                      {str(c.out.path): c.group for c in finished},
                                      {"suite": {"name": suite.name, "scale": suite.scale, "cells": statuses}},
                                      suite.references)
            compare.write(suite.directory, doc, docs)
    return statuses


def _write_index(suite: Suite, statuses: dict[str, str]) -> None:
    atomic_write_json(suite.directory / "suite.json", {
        "name": suite.name, "description": suite.description, "scale": suite.scale, "table": suite.table,
        "references": suite.references,
        "cells": [{"label": c.label, "group": c.group, "directory": c.out.path.name,
                   "status": statuses.get(c.label, "pending")} for c in suite.cells]})


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
