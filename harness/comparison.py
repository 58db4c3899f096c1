"""Side-by-side reports of finished runs (`geobench report`, and every suite): one tidy table (a row
per configuration, the mean over its seeds ± a bootstrap interval), a row per run, the published
figures beside ours, the published reference series analysed by the same code, and figures of all
runs on one axis. Written as comparison.json (schema-validated) and as comparison.md and a
self-contained comparison.html with the same content.

A configuration is what a run's config says minus its seed: runs that differ only in `train.seed`
form one group, whatever their labels. How the table names and orders its rows is the `TableSpec`
a suite declares; no table is known here by name."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

import geobench
from geobench import page as pages
from geobench import published
from geobench.api import ComparedRun, UsageError
from geobench.api.documents import always, from_json, to_json
from geobench.documents import COMPARISON_SCHEMA_VERSION, RunReport, SuiteIndex, TableSpec, read_run_report
from geobench.figures import Line, draw, palette, published_lines, pyplot, save_figure
from geobench.files import atomic_write_json, read_json
from geobench.formatting import Estimate, number, plain
from geobench.registry import Registry
from geobench.report import CORE_TERMS as RUN_TERMS
from geobench.report import lambda_switches, load_schema, now
from geobench.series import PROBE_LEARNED, bootstrap_interval

# the columns of every run; metric plugins add theirs (MetricPlugin.columns)
CORE_COLUMNS = {"val_loss": "val loss", "best_p_ood": "best p_ood"}
# a published series' analysis (published.analyze) → the comparison column it stands beside
REFERENCE_VALUES = {"val_loss": "final_val_loss", "best_p_ood": "best_p_ood", "pc1": "pc1", "drift": "drift"}
CORE_TERMS = {"val_loss": RUN_TERMS["val_loss"] + " (at the run's last evaluation)", "best_p_ood": RUN_TERMS["best_p_ood"]}
REFERENCE_TERMS = {
    "PC1 (row-norm., full)": "the share of the trunk drift's energy along its first principal direction, each "
                             "checkpoint's drift scaled to unit length, over the full spectrum of singular values",
    "PC1 (row-norm., top-10)": "the same share over the ten largest singular values only (how the source published "
                               "the seed series' PC1)",
    "as published": "the figure printed in the source's own files, beside ours recomputed from its singular values",
    "switch pairs": "a peak of p_ood followed by a trough (the source's detector), as (peak step → trough step)",
    "γ_a, γ_r": "the power-law exponents of |a(t)| and ‖r(t)‖ in a window, fitted by least squares on logs",
}
# config keys that say where or how a run was executed, not what was trained
NOT_CONFIGURATION = ("name", "metrics", "train.seed", "train.resume", "train.device", "data.cache_dir")


@dataclasses.dataclass
class RunRow:
    run: str
    label: str
    group: str
    optimizer: str
    params: dict[str, Any]
    seed: int
    status: str
    steps: int
    values: dict[str, float | None]
    diverged_at: int | None = None
    settings: dict[str, Any] = always(dict)  # the varying settings (Comparison.varying) of this run
    no_signal: dict[str, str] = dataclasses.field(default_factory=dict)  # column → why its value says nothing


@dataclasses.dataclass
class GroupRow:
    """A configuration: the mean of each column over its runs and, with two or more, the 95%
    bootstrap interval of that mean. `label`: its name and the settings that set it apart."""

    group: str
    runs: int
    statuses: list[str]
    optimizer: str
    params: dict[str, Any]
    values: dict[str, float | None]
    intervals: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    label: str = ""
    settings: dict[str, Any] = always(dict)
    no_signal: dict[str, str] = dataclasses.field(default_factory=dict)  # column → why, where no run has a signal


@dataclasses.dataclass
class Comparison:
    schema_version: str
    geobench_version: str
    title: str
    created: str
    table: TableSpec
    columns: list[str]
    headings: dict[str, str]  # column id → heading
    metric_of: dict[str, str]  # column id → the metric plugin that declares it (absent: a core column)
    runs: list[RunRow]
    groups: list[GroupRow]
    published: dict[str, dict[str, float]]  # group → column → the source's published figure
    variants: dict[str, list[str]]  # column → how its numbers were computed (the runs' metric variants)
    references: list[dict[str, Any]]  # published series, analysed (published.analyze)
    figures: list[str] = always(list)
    suite: SuiteIndex | None = None
    varying: dict[str, str] = always(dict)  # short name → config key, for the settings whose values differ
    headline: list[str] = always(list)  # the sentences the pages open with
    terms: dict[str, str] = always(dict)  # what the columns' names mean
    captions: dict[str, str] = always(dict)  # figure path → what it shows


@dataclasses.dataclass
class Compared:
    """A finished run to compare: its directory, its report and the label it goes by."""

    path: Path
    report: RunReport
    label: str


def load(path: Path, label: str | None = None) -> Compared:
    report = path / "report.json"
    if not report.exists():
        raise UsageError(f"{str(path)!r} has no report.json (not a finished geobench run or suite)")
    return Compared(path, read_run_report(report), label or path.name)


def columns(reg: Registry) -> dict[str, tuple[str | None, str, str]]:
    """Every comparison column: id → (its metric, or None for a core column; the scalar; the
    heading). A metric's columns are the scalars its plugin declares, in registry order."""
    found: dict[str, tuple[str | None, str, str]] = {c: (None, c, heading) for c, heading in CORE_COLUMNS.items()}
    for name, plugin in reg.metrics.items():
        for column, (scalar, heading) in plugin.columns.items():
            if column in found:
                raise UsageError(f"metric {name!r} declares comparison column {column!r}, which another plugin declares")
            found[column] = (name, scalar, heading)
    return found


def value(report: RunReport, where: tuple[str | None, str, str]) -> float | None:
    metric, scalar, _ = where
    if metric is None:
        number = getattr(report.final, scalar, None) if report.final else None
    else:
        outcome = report.metrics.get(metric)
        number = outcome.scalars.get(scalar) if outcome and outcome.status == "ok" else None
    return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None


def no_signal(report: RunReport, where: tuple[str | None, str, str]) -> str | None:
    """Why the column's value says nothing on this run: its metric's no-signal reason."""
    outcome = report.metrics.get(where[0]) if where[0] else None
    return outcome.no_signal if outcome and outcome.status == "ok" else None


def _without(config: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    tree = json.loads(json.dumps(config))
    for path in paths:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return tree


def configuration(config: dict[str, Any]) -> str:
    """A run's configuration as a canonical string: its config less the seed and the settings of
    where and how it ran (NOT_CONFIGURATION)."""
    return json.dumps(_without(config, NOT_CONFIGURATION), sort_keys=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in tree.items():
        if isinstance(item, dict) and item:
            out.update(_flat(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _short(key: str, n: int) -> str:
    """The last `n` parts of a config key; `optimizer.name` reads as `optimizer`."""
    parts = key.split(".")
    if parts[-1] == "name" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts[-n:])


def varying(configs: list[dict[str, Any]]) -> dict[str, str]:
    """The settings whose values differ between the configurations: short name → config key
    (`lr` → `optimizer.params.lr`; the shortest unambiguous suffix), in the config's order."""
    flat = [_flat(_without(c, NOT_CONFIGURATION)) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    out: dict[str, str] = {}
    for key in differ:
        n = 1
        while n < len(key.split(".")) and any(_short(other, n) == _short(key, n) for other in differ if other != key):
            n += 1
        out[_short(key, n)] = key
    return out


def settings_of(config: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    flat = _flat(config)
    return {short: flat.get(key) for short, key in keys.items()}


def describe(settings: dict[str, Any], name: str = "") -> str:
    """The settings not already spelled out in `name`, as `lr=0.001, wd=0.5`."""
    shown = [f"{k}={plain(v)}" for k, v in settings.items() if v is not None]  # None: not a setting of this run
    return ", ".join(s for s in shown if s not in name)


def group_names(members: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The group of each (label, config): runs of one configuration share one, named after the
    first member's label less its seed (`-s271`, `-seed=271`, `-train.seed=271`)."""
    names: dict[str, str] = {}
    out = []
    for label, config in members:
        key = configuration(config)
        if key not in names:
            seed = config.get("train", {}).get("seed")
            names[key] = re.sub(rf"-(s|seed=|train\.seed=){seed}(?=-|$)", "", label) or label
        out.append(names[key])
    return out


def aggregate(rows: list[RunRow], shown: list[str], seed: int = 0) -> list[GroupRow]:
    """One row per group: mean over its runs and, with two or more, a bootstrap interval; a column
    no run of the group has a signal in carries the first run's reason."""
    rng = np.random.default_rng(seed)
    out = []
    for group in dict.fromkeys(r.group for r in rows):
        members = [r for r in rows if r.group == group]
        settings = members[0].settings
        extra = describe(settings, group)
        agg = GroupRow(group=group, runs=len(members), statuses=sorted({r.status for r in members}),
                       optimizer=members[0].optimizer, params=members[0].params, values={},
                       label=f"{group} ({extra})" if extra else group, settings=settings)
        for col in shown:
            finite = [v for r in members if (v := r.values.get(col)) is not None and math.isfinite(v)]
            agg.values[col] = float(np.mean(finite)) if finite else None
            if len(finite) >= 2:
                agg.intervals[col] = list(bootstrap_interval(finite, rng))
            reasons = [r.no_signal.get(col) for r in members]
            if all(reasons):
                agg.no_signal[col] = str(reasons[0])
        out.append(agg)
    return out


def variants(shown: list[str], known: dict, reports: list[RunReport]) -> dict[str, list[str]]:
    """Per metric column, how its numbers were computed: the `variant` each run's result states."""
    out = {}
    for col in shown:
        metric = known[col][0]
        if metric is not None:
            stated = {r.metrics[metric].variant for r in reports if metric in r.metrics}
            out[col] = sorted(v for v in stated if v)
    return out


def pairs(groups: list[GroupRow], references: list[dict[str, Any]]) -> dict[str, str]:
    """group → the published series it pairs with: the one whose β₂ its optimizer's beta2 equals."""
    out = {}
    for ref in references:
        if ref.get("beta2") is None:
            continue
        matching = [g.group for g in groups if g.params.get("beta2") == ref["beta2"]]
        if len(matching) == 1:
            out[matching[0]] = ref["name"]
    return out


def published_figures(groups: list[GroupRow], references: list[dict[str, Any]], shown: list[str],
                      given: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The published figure beside each configuration's column: the suite's own (`given`, paper
    scale) and, for the columns a published series also has, the series it pairs with."""
    out = {group: dict(figures) for group, figures in given.items()}
    by_name = {ref["name"]: ref for ref in references}
    for group, name in pairs(groups, references).items():
        for col, key in REFERENCE_VALUES.items():
            if col in shown and by_name[name].get(key) is not None:
                out.setdefault(group, {}).setdefault(col, float(by_name[name][key]))
    return out


def reference_entry(name: str) -> dict[str, Any]:
    """A published series (geobench.published) with its curves, analysed by geobench's series code."""
    series = published.load(name)
    return {**published.analyze(series), "steps": series.steps[-1],
            "series": {"steps": series.steps, "p_ood": series.p_ood, "val_loss": series.val_loss,
                       "a": series.a, "r_norm": series.r_norm}}


def terms(shown: list[str], known: dict, reg: Registry) -> dict[str, str]:
    """The definitions of the shown columns' terms: the core ones, then each metric's."""
    out = {heading: CORE_TERMS[col] for col, (metric, _, heading) in known.items() if col in shown and metric is None}
    for metric in dict.fromkeys(known[c][0] for c in shown if known[c][0] is not None):
        out.update(reg.metrics[str(metric)].terms)
    return out


def check_table(spec: TableSpec, shown: list[str], rows: list[RunRow]) -> None:
    """The table's order_by is a column these runs have and its label_by a hyperparameter one of
    them has, or a UsageError naming what is allowed (before anything is written)."""
    if spec.order_by is not None and spec.order_by not in shown:
        raise UsageError(f"order_by {spec.order_by!r} is not a column of these runs; allowed: {', '.join(shown)}")
    params = sorted({k for r in rows for k in r.params})
    if spec.label_by is not None and rows and spec.label_by not in params:
        raise UsageError(f"label_by {spec.label_by!r} is no optimizer hyperparameter of these runs; allowed: "
                         f"{', '.join(params)}")


def build(runs: list[Compared], title: str, reg: Registry, table: TableSpec | None = None,
          suite_figures: dict[str, dict[str, float]] | None = None, references: list[str] | None = None,
          suite: SuiteIndex | None = None) -> Comparison:
    """The comparison of `runs`: the core columns and every metric column that at least one run has
    a value for; `references` names published series (geobench.published) drawn and tabulated
    beside the runs, and `suite_figures` the suite's published figures (group → column → value)."""
    known = columns(reg)
    names = group_names([(r.label, r.report.config) for r in runs])
    keys = varying([r.report.config for r in runs])
    rows = [RunRow(run=str(r.path), label=r.label, group=group, optimizer=r.report.optimizer["name"],
                   params=r.report.optimizer["params"], seed=r.report.config["train"]["seed"],
                   status=r.report.run.status, steps=r.report.run.last_step, diverged_at=r.report.run.diverged_at,
                   values={col: value(r.report, where) for col, where in known.items()},
                   settings=settings_of(r.report.config, keys),
                   no_signal={col: why for col, where in known.items() if (why := no_signal(r.report, where))})
            for r, group in zip(runs, names)]
    shown = [c for c in known if c in CORE_COLUMNS or any(row.values[c] is not None for row in rows)]
    check_table(table or TableSpec(), shown, rows)
    for row in rows:
        row.values = {c: row.values[c] for c in shown}
        row.no_signal = {c: why for c, why in row.no_signal.items() if c in shown}
    groups = aggregate(rows, shown)
    entries = [reference_entry(n) for n in references or []]
    doc = Comparison(
        schema_version=COMPARISON_SCHEMA_VERSION, geobench_version=geobench.__version__, title=title, created=now(),
        table=table or TableSpec(), columns=shown, headings={c: known[c][2] for c in shown},
        metric_of={c: metric for c in shown if (metric := known[c][0]) is not None}, runs=rows,
        groups=groups, published=published_figures(groups, entries, shown, suite_figures or {}),
        variants=variants(shown, known, [r.report for r in runs]), references=entries, suite=suite, varying=keys,
        terms=terms(shown, known, reg) if rows else {})
    doc.headline = headline(doc)
    return doc


def write(directory: Path, doc: Comparison, runs: list[Compared], reg: Registry) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    doc.figures, doc.captions = figures(directory, doc, runs, reg)
    data = to_json(doc)
    jsonschema.validate(data, load_schema("comparison"))
    atomic_write_json(directory / "comparison.json", data)
    pages.write(page(doc), directory, "comparison")


def read(path: Path) -> Comparison:
    return from_json(Comparison, read_json(path, "comparison"), str(path))


# ---- the page ------------------------------------------------------------------------------------

def name_of(doc: Comparison, agg: GroupRow) -> str:
    """What the tables and sentences call a configuration: `β₂ 0.99` (the table's label_by), else its group."""
    spec = doc.table
    if spec.label_by and spec.label_by in agg.params:
        return f"{spec.heading} {plain(agg.params[spec.label_by])}"
    return agg.group


def _setting_columns(doc: Comparison) -> list[str]:
    """The varying settings the tables show in their own columns (a label_by setting names the rows already)."""
    return [k for k in doc.varying if k != doc.table.label_by]


def _status(row: RunRow) -> str:
    return f"{row.status} at step {row.diverged_at}" if row.diverged_at is not None else row.status


def _group_status(doc: Comparison, agg: GroupRow) -> str:
    members = [r for r in doc.runs if r.group == agg.group]
    return ", ".join(dict.fromkeys(_status(r) for r in members))


def _setting(value: Any) -> str | None:
    return None if value is None else plain(value)  # None: not a setting of this run, shown as —


def _signal_cell(reason: str | None, number: Any) -> Any:
    return "no signal" if reason else number


def table_rows(doc: Comparison, shown: list[str]) -> tuple[list[str], list[list[Any]]]:
    """A configurations table: name, the settings that differ, status, runs, then each column of
    `shown` (the mean ± half its seed interval) with the published figure beside it where there is one."""
    spec = doc.table
    settings = _setting_columns(doc)
    wide = len(settings) > WIDE_SETTINGS
    with_published = [c for c in shown if any(c in figs for figs in doc.published.values())]
    header = [spec.heading] + (["settings"] if wide else settings) + ["status", "runs"]
    for c in shown:
        header += [doc.headings[c]] + ([f"{doc.headings[c]} (published)"] if c in with_published else [])
    groups = doc.groups
    if spec.order_by:
        key = spec.order_by
        groups = sorted(groups, key=lambda g: (g.values.get(key) is None, g.values.get(key) or 0.0))
    body = []
    for agg in groups:
        row: list[Any] = [name_of(doc, agg)]
        row += [describe({k: agg.settings.get(k) for k in settings})] if wide else [
            _setting(agg.settings.get(k)) for k in settings]
        row += [_group_status(doc, agg), agg.runs]
        for c in shown:
            interval = agg.intervals.get(c)
            half = (interval[1] - interval[0]) / 2 if interval else None
            row.append(_signal_cell(agg.no_signal.get(c), Estimate(agg.values.get(c), half)))
            if c in with_published:
                row.append(doc.published.get(agg.group, {}).get(c))
        body.append(row)
    return header, body


def split_columns(doc: Comparison) -> tuple[list[str], list[str]]:
    """(the results table's columns, the further metrics'): the core columns and those with a
    published figure first, so that neither table is wider than about a dozen columns."""
    first = [c for c in doc.columns if c in CORE_COLUMNS or any(c in figs for figs in doc.published.values())]
    rest = [c for c in doc.columns if c not in first]
    if len(first) + len(rest) <= SINGLE_TABLE_COLUMNS:
        return first + rest, []
    return first, rest


def run_rows(doc: Comparison) -> tuple[list[str], list[list[Any]]]:
    settings = list(doc.varying)
    wide = len(settings) > WIDE_SETTINGS
    header = ["run", *(["settings"] if wide else settings), "seed", "status", "steps",
              *(doc.headings[c] for c in doc.columns)]
    body = [[r.label, *([describe(r.settings)] if wide else [_setting(r.settings.get(k)) for k in settings]), r.seed,
             _status(r), r.steps, *(_signal_cell(r.no_signal.get(c), r.values.get(c)) for c in doc.columns)]
            for r in doc.runs]
    return header, body


WIDE_SETTINGS = 4  # more varying settings than this share one "settings" column
HEADLINE_SETTINGS = 5  # varying settings the headline names; more are counted
SINGLE_RUN_COLUMNS = 6  # the columns a one-run comparison's headline names
SINGLE_TABLE_COLUMNS = 8  # more metric columns than this: a results table and a further-metrics table
REFERENCE_COLUMNS = [("name", "series"), ("steps", "steps"), ("best_p_ood", "best p_ood"),
                     ("best_p_ood_step", "at step"), ("final_val_loss", "final val loss"), ("drift", "drift"),
                     ("pc1", "PC1 (row-norm., full)"), ("pc1_top10", "PC1 (row-norm., top-10)"),
                     ("pc1_as_published", "PC1 (row-norm., as published)"),
                     ("pc1_raw_as_published", "PC1 (raw, as published)"), ("switch_pairs", "switch pairs (peak→trough)")]


def reference_rows(doc: Comparison) -> tuple[list[str], list[list[Any]]]:
    body = []
    for ref in doc.references:
        pairs = ", ".join(f"{p}→{t}" for p, t in ref["switching"]["pairs"]) or "none"
        body.append([ref.get(key) if key != "switch_pairs" else pairs for key, _ in REFERENCE_COLUMNS])
    return [title for _, title in REFERENCE_COLUMNS], body


def variant_lines(doc: Comparison) -> list[str]:
    """One line per metric (and variant) naming the columns it produced."""
    by_text: dict[tuple[str, str], list[str]] = {}
    for col, stated in doc.variants.items():
        for text in stated or ["not stated in the runs' reports"]:
            by_text.setdefault((doc.metric_of[col], text), []).append(doc.headings[col])
    return [f"`{metric}` ({', '.join(cols)}): {text}" for (metric, text), cols in by_text.items()]


def _ordering(doc: Comparison, col: str) -> tuple[list[str], int] | None:
    """(the pairs of configurations ordered unlike the published figures, the pairs compared)."""
    both = [(name_of(doc, agg), ours, doc.published[agg.group][col]) for agg in doc.groups
            if (ours := agg.values.get(col)) is not None and col in doc.published.get(agg.group, {})]
    compared = [(a, b) for i, a in enumerate(both) for b in both[i + 1:] if a[2] != b[2]]
    if len(both) < 2 or not compared:
        return None
    return [f"{a[0]} vs {b[0]}" for a, b in compared if (a[1] - b[1]) * (a[2] - b[2]) <= 0], len(compared)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def headline(doc: Comparison) -> list[str]:
    """Two or three sentences: what ran and how it ended, which published orderings held, the best
    configuration (or, for published series alone, what their analysis found)."""
    if not doc.runs:
        return published_headline(doc)
    groups = doc.groups
    counts = {g.runs for g in groups}
    seeds = f", {counts.pop()} seeds each" if len(counts) == 1 and groups[0].runs > 1 else ""
    names = list(doc.varying)
    if len(names) > HEADLINE_SETTINGS:
        names = names[:HEADLINE_SETTINGS - 1] + [f"{len(names) - HEADLINE_SETTINGS + 1} more settings (in the tables)"]
    differ = f" differing in {_and(names)}" if names else ""
    first = f"{len(doc.runs)} runs of {len(groups)} configurations{differ}{seeds}."
    if len(doc.runs) == 1:
        only = doc.runs[0]
        first = f"One run, {groups[0].label}"
        measured = [f"{doc.headings[c]} {number(v)}" for c in doc.columns
                    if (v := only.values.get(c)) is not None and c not in only.no_signal]
        if measured:
            first += f": {', '.join(measured[:SINGLE_RUN_COLUMNS])}"
        first += "."
    diverged = [r for r in doc.runs if r.status == "diverged"]
    ended = {r.status for r in doc.runs} - {"diverged"}
    group_of = {g.group: g for g in groups}
    if diverged:
        first += " " + "; ".join(f"{name_of(doc, group_of[r.group])}"
                                 + (f" (seed {r.seed})" if group_of[r.group].runs > 1 else "")
                                 + f" diverged at step {r.diverged_at}" for r in diverged)
        first += f"; the others {'/'.join(sorted(ended))}." if ended else "."
    elif ended == {"completed"}:
        steps = ', '.join(str(s) for s in sorted({r.steps for r in doc.runs}))
        first += f" All completed ({steps} steps)." if len(doc.runs) > 1 else f" It completed {steps} steps."
    sentences = [first]
    held, missed = [], []
    for col in doc.columns:
        counted = _ordering(doc, col)
        if counted:
            reversed_pairs, total = counted
            if reversed_pairs:
                which = f": {reversed_pairs[0]}" if len(reversed_pairs) == 1 else ""
                missed.append(f"{doc.headings[col]} ({len(reversed_pairs)} of {total} pairs reversed{which})")
            else:
                held.append(doc.headings[col])
    if held or missed:
        parts = ([f"held for {_and(held)}"] if held else []) + ([f"not for {_and(missed)}"] if missed else [])
        sentences.append("Against the published figures, the ordering of the configurations " + ", and ".join(parts)
                         + ".")
    best = []
    healthy = [g for g in groups if g.statuses != ["diverged"]]
    for col, lowest in (("val_loss", True), ("best_p_ood", False)) if len(groups) > 1 else ():
        scored = [g for g in healthy if g.values.get(col) is not None and col not in g.no_signal]
        if col == "best_p_ood" and scored and max(g.values[col] or 0.0 for g in scored) < PROBE_LEARNED:
            best.append(f"no configuration learned the probe (best p_ood at most "
                        f"{number(max(g.values[col] or 0.0 for g in scored))})")
        elif len({g.values[col] for g in scored}) >= 2:
            top = (min if lowest else max)(scored, key=lambda g: g.values[col] or 0.0)
            best.append(f"{'lowest' if lowest else 'highest'} {doc.headings[col]}: {name_of(doc, top)} "
                        f"({number(top.values[col])})")
    if best:
        sentences.append(best[0][0].upper() + "; ".join(best)[1:] + ".")
    return sentences


def published_headline(doc: Comparison) -> list[str]:
    refs = doc.references
    if not refs:
        return ["No runs and no published series."]
    best = max(refs, key=lambda r: r["best_p_ood"])
    recovered = sum(min(abs(r["pc1"] - r["pc1_as_published"]), abs(r["pc1_top10"] - r["pc1_as_published"])) < 0.005
                    for r in refs)
    switching = [r["name"] for r in refs if r["switching"]["pairs"]]
    return [f"{len(refs)} published series of the source study, analysed by geobench's own series code.",
            f"The published trunk PC1 is recovered from the published singular values for {recovered} of {len(refs)} "
            f"series; the highest best p_ood is {number(best['best_p_ood'])} ({best['name']}).",
            f"Switch pairs (peak → trough) in {len(switching)} of {len(refs)}"
            + (f": {', '.join(switching)}." if switching else ".")]


def page(doc: Comparison) -> pages.Page:
    out = pages.Page(doc.title, [pages.Paragraph(f"geobench {doc.geobench_version}, {doc.created}.")],
                     headline=doc.headline)
    if doc.runs:
        results, further = split_columns(doc)
        out.add(pages.Paragraph("Values are the mean over a configuration's runs (a configuration: the config less "
                                "its seed); ± is half the 95% bootstrap interval over seeds; a column marked "
                                "(published) holds the source study's figure for that configuration: the suite file's "
                                "`published` figures, or the published series of the same β₂ as analysed below; "
                                "\"no signal\": the metric found nothing to measure on those runs (the "
                                "reason is in the run's report)."),
                pages.table(*table_rows(doc, results)))
        if further:
            out.add(pages.Heading("Further metrics"), pages.table(*table_rows(doc, further)))
        out.add(pages.Heading("Runs"),
                pages.table(*run_rows(doc)),
                pages.Heading("How each column was computed"),
                pages.Bullets(variant_lines(doc)),
                pages.Heading("Terms"),
                pages.Terms(doc.terms))
    if doc.references:
        out.add(pages.Heading("Published reference series"),
                pages.Paragraph("The source's published outputs (mini_gpt, MIT), analysed by geobench's own series "
                                "code: the source's switch detector on their p_ood, PC1 from their singular values "
                                "with both denominators, power laws in half-open windows. Their steps are the source's "
                                "own (4000 for the β₂ series, 10000 for the seeds); where our runs are shorter the "
                                "figures put both on a fraction-of-training axis."),
                pages.table(*reference_rows(doc)))
        fit_keys = ("gamma_a", "R2_a", "gamma_r", "R2_r", "corr_p_ood_r", "n")
        for ref in doc.references:
            out.add(pages.table(["window", *fit_keys],
                                [[f"({f['start']}, {f['end']}]", *(f[k] for k in fit_keys)] for f in ref["fits"]],
                                caption=f"{ref['name']}: power laws |a(t)| ∝ t^γ_a, ‖r(t)‖ ∝ t^γ_r in (lo, hi]"))
        if not doc.runs:
            out.add(pages.Heading("Terms"), pages.Terms(REFERENCE_TERMS))
    if doc.figures:
        out.add(pages.Heading("Figures"))
        out.blocks += [pages.Figure(f, doc.captions.get(f, Path(f).stem)) for f in doc.figures]
    return out


# ---- the figures ---------------------------------------------------------------------------------

def colours(doc: Comparison) -> dict[str, str]:
    """A colour per configuration; a published series takes the colour of the configuration whose
    optimizer hyperparameters match its own (β₂), or one of its own."""
    by_group = palette([g.group for g in doc.groups] + [r["name"] for r in doc.references])
    for group, name in pairs(doc.groups, doc.references).items():
        by_group[name] = by_group[group]
    return by_group


def figures(directory: Path, doc: Comparison, runs: list[Compared], reg: Registry) -> tuple[list[str], dict[str, str]]:
    """Every run's evaluations on one axis, then the figures each metric plugin contributes."""
    plt = pyplot()
    made: list[str] = []
    captions: dict[str, str] = {}

    def save(fig, name: str, *, caption: str) -> None:
        fig.tight_layout()
        path = save_figure(fig, directory, name)
        made.append(path)
        captions[path] = caption

    colour = colours(doc)
    references = [{**ref, "colour": colour[ref["name"]]} for ref in doc.references]
    group_of = {g.group: g for g in doc.groups}
    switches = {tuple(lambda_switches(run.report.config)) for run in runs}  # marked when every run shares them
    events = {f"λ switch (step {s})": s for s in switches.pop()} if len(switches) == 1 else {}
    for key, label in (("p_ood", "p_ood (probe exact match, OOD gaps)"), ("val_loss", "val_loss (nats)")):
        lines = [Line(group_of[row.group].label if group_of[row.group].runs == 1 else row.label,
                      [e.step for e in run.report.evals], [getattr(e, key) for e in run.report.evals],
                      colour=colour[row.group], group=group_of[row.group].label, length=run.report.run.steps_planned,
                      marks={"diverged": row.diverged_at} if row.diverged_at is not None else {})
                 for row, run in zip(doc.runs, runs)] + published_lines(references, key)
        fig, ax = plt.subplots(figsize=(8, 4))
        said = draw(ax, lines, ylabel=label, events=events, ylim=(-0.02, 1.02) if key == "p_ood" else None)
        what = "probe exact match on out-of-distribution gaps" if key == "p_ood" else "validation cross-entropy"
        save(fig, f"{key}_all", caption=f"{what} at every evaluation of every run"
             + (", the published series dashed in the colour of the run they pair with" if references else "")
             + "".join(f"; {s}" for s in said) + ".")

    # the plugins' view of a configuration: its name, label, colour, runs, statuses, optimizer and
    # params, each column's mean under the column id and its interval under `<id>_interval`
    groups = [{"group": g.group, "label": g.label, "colour": colour[g.group], "runs": g.runs, "statuses": g.statuses,
               "optimizer": g.optimizer, "params": g.params, **g.values,
               **{f"{c}_interval": i for c, i in g.intervals.items()}} for g in doc.groups]
    for name, plugin in reg.metrics.items():
        if plugin.comparison_figures is None:
            continue
        results = [ComparedRun(label=row.label if group_of[row.group].runs > 1 else group_of[row.group].label,
                               group=group_of[row.group].label, colour=colour[row.group], status=row.status,
                               steps=run.report.run.steps_planned, params=row.params, result=run.report.metrics[name],
                               diverged_at=row.diverged_at)
                   for row, run in zip(doc.runs, runs)
                   if name in run.report.metrics and run.report.metrics[name].status == "ok"]
        if results or references:
            plugin.comparison_figures(runs=results, groups=groups, references=references, plt=plt, save=save)
    return made, captions
