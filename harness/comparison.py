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
from geobench.api import MetricResult, UsageError
from geobench.api.documents import always, from_json, to_json
from geobench.documents import COMPARISON_SCHEMA_VERSION, RunReport, SuiteIndex, TableSpec, read_run_report
from geobench.figures import plot_references, pyplot, save_figure
from geobench.files import atomic_write_json, read_json
from geobench.registry import Registry
from geobench.report import fmt, load_schema, now
from geobench.series import bootstrap_interval

# the columns of every run; metric plugins add theirs (MetricPlugin.columns)
CORE_COLUMNS = {"val_loss": "val loss", "best_p_ood": "best p_ood"}
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


@dataclasses.dataclass
class GroupRow:
    """A configuration: the mean of each column over its runs and, with two or more, the 95%
    bootstrap interval of that mean."""

    group: str
    runs: int
    statuses: list[str]
    optimizer: str
    params: dict[str, Any]
    values: dict[str, float | None]
    intervals: dict[str, list[float]] = dataclasses.field(default_factory=dict)


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


def configuration(config: dict[str, Any]) -> str:
    """A run's configuration as a canonical string: its config less the seed and the settings of
    where and how it ran (NOT_CONFIGURATION)."""
    tree = json.loads(json.dumps(config))
    for path in NOT_CONFIGURATION:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return json.dumps(tree, sort_keys=True)


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
    """One row per group: mean over its runs and, with two or more, a bootstrap interval."""
    rng = np.random.default_rng(seed)
    out = []
    for group in dict.fromkeys(r.group for r in rows):
        members = [r for r in rows if r.group == group]
        agg = GroupRow(group=group, runs=len(members), statuses=sorted({r.status for r in members}),
                       optimizer=members[0].optimizer, params=members[0].params, values={})
        for col in shown:
            finite = [v for r in members if (v := r.values.get(col)) is not None and math.isfinite(v)]
            agg.values[col] = float(np.mean(finite)) if finite else None
            if len(finite) >= 2:
                agg.intervals[col] = list(bootstrap_interval(finite, rng))
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


def reference_entry(name: str) -> dict[str, Any]:
    """A published series (geobench.published) with its curves, analysed by geobench's series code."""
    series = published.load(name)
    return {**published.analyze(series),
            "series": {"steps": series.steps, "p_ood": series.p_ood, "val_loss": series.val_loss,
                       "a": series.a, "r_norm": series.r_norm}}


def build(runs: list[Compared], title: str, reg: Registry, table: TableSpec | None = None,
          published_figures: dict[str, dict[str, float]] | None = None, references: list[str] | None = None,
          suite: SuiteIndex | None = None) -> Comparison:
    """The comparison of `runs`: the core columns and every metric column that at least one run has
    a value for; `references` names published series (geobench.published) drawn and tabulated
    beside the runs."""
    known = columns(reg)
    groups = group_names([(r.label, r.report.config) for r in runs])
    rows = [RunRow(run=str(r.path), label=r.label, group=group, optimizer=r.report.optimizer["name"],
                   params=r.report.optimizer["params"], seed=r.report.config["train"]["seed"],
                   status=r.report.run.status, steps=r.report.run.last_step, diverged_at=r.report.run.diverged_at,
                   values={col: value(r.report, where) for col, where in known.items()})
            for r, group in zip(runs, groups)]
    shown = [c for c in known if c in CORE_COLUMNS or any(row.values[c] is not None for row in rows)]
    for row in rows:
        row.values = {c: row.values[c] for c in shown}
    return Comparison(
        schema_version=COMPARISON_SCHEMA_VERSION, geobench_version=geobench.__version__, title=title, created=now(),
        table=table or TableSpec(), columns=shown, headings={c: known[c][2] for c in shown},
        metric_of={c: metric for c in shown if (metric := known[c][0]) is not None}, runs=rows,
        groups=aggregate(rows, shown), published=published_figures or {},
        variants=variants(shown, known, [r.report for r in runs]),
        references=[reference_entry(n) for n in references or []], suite=suite)


def write(directory: Path, doc: Comparison, runs: list[Compared], reg: Registry) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    doc.figures = figures(directory, doc, runs, reg)
    data = to_json(doc)
    jsonschema.validate(data, load_schema("comparison"))
    atomic_write_json(directory / "comparison.json", data)
    pages.write(page(doc), directory, "comparison")


def read(path: Path) -> Comparison:
    return from_json(Comparison, read_json(path, "comparison"), str(path))


def _cell(agg: GroupRow, col: str, figures: dict[str, dict[str, float]]) -> str:
    number, interval = agg.values.get(col), agg.intervals.get(col)
    text = fmt(number)
    if interval:
        text += f" ± {(interval[1] - interval[0]) / 2:.3g}"
    ref = figures.get(agg.group, {}).get(col)
    if ref is not None:
        diff = f", Δ {number - ref:+.3g}" if number is not None else ""
        text += f" (pub. {fmt(ref)}{diff})"
    return text


def table_rows(doc: Comparison) -> tuple[list[str], list[list[str]]]:
    spec = doc.table
    header = [spec.heading, "runs"] + [doc.headings[c] for c in doc.columns]
    groups = doc.groups
    if spec.order_by:
        key = spec.order_by
        groups = sorted(groups, key=lambda g: (g.values.get(key) is None, g.values.get(key) or 0.0))
    body = []
    for agg in groups:
        name = str(agg.params[spec.label_by]) if spec.label_by and spec.label_by in agg.params else agg.group
        status = "" if agg.statuses == ["completed"] else f" ({'/'.join(agg.statuses)})"
        body.append([name + status, str(agg.runs)] + [_cell(agg, c, doc.published) for c in doc.columns])
    return header, body


REFERENCE_COLUMNS = [("name", "series"), ("best_p_ood", "best p_ood"), ("best_p_ood_step", "at step"),
                     ("final_val_loss", "final val loss"), ("drift", "drift"), ("pc1", "PC1 (row-norm., full)"),
                     ("pc1_top10", "PC1 (row-norm., top-10)"), ("pc1_raw_as_published", "PC1 (raw, as published)"),
                     ("switch_pairs", "switch pairs (peak→trough)")]


def reference_rows(doc: Comparison) -> tuple[list[str], list[list[str]]]:
    body = []
    for ref in doc.references:
        pairs = ", ".join(f"{p}→{t}" for p, t in ref["switching"]["pairs"]) or "none"
        body.append([fmt(ref.get(key)) if key != "switch_pairs" else pairs for key, _ in REFERENCE_COLUMNS])
    return [title for _, title in REFERENCE_COLUMNS], body


def variant_lines(doc: Comparison) -> list[str]:
    """One line per metric (and variant) naming the columns it produced."""
    by_text: dict[tuple[str, str], list[str]] = {}
    for col, stated in doc.variants.items():
        for text in stated or ["not stated in the runs' reports"]:
            by_text.setdefault((doc.metric_of[col], text), []).append(doc.headings[col])
    return [f"`{metric}` ({', '.join(cols)}): {text}" for (metric, text), cols in by_text.items()]


def _status(row: RunRow) -> str:
    return f"{row.status} at step {row.diverged_at}" if row.diverged_at is not None else row.status


def page(doc: Comparison) -> pages.Page:
    out = pages.Page(doc.title, [pages.Paragraph(f"geobench {doc.geobench_version}, {doc.created}.")])
    if doc.runs:
        out.add(pages.Paragraph("Values are the mean over a configuration's runs (a configuration: the config less "
                                "its seed); ± is half the 95% bootstrap interval over seeds; (pub. X, Δ d) is the "
                                "source study's published figure (the suite file's `published`; sources in "
                                "docs/FIDELITY.md) and our difference."),
                pages.Table(*table_rows(doc)),
                pages.Heading("Runs"),
                pages.Table(["run", "status", "steps", *doc.columns],
                            [[r.label, _status(r), str(r.steps), *(fmt(r.values.get(c)) for c in doc.columns)]
                             for r in doc.runs]),
                pages.Heading("How each column was computed"),
                pages.Bullets(variant_lines(doc)))
    if doc.references:
        out.add(pages.Heading("Published reference series"),
                pages.Paragraph("The source's published outputs (mini_gpt, MIT), analysed by geobench's own series "
                                "code: the source's switch detector on their p_ood, PC1 from their singular values "
                                "with both denominators, power laws in half-open windows."),
                pages.Table(*reference_rows(doc)))
        fit_keys = ("gamma_a", "R2_a", "gamma_r", "R2_r", "corr_p_ood_r", "n")
        for ref in doc.references:
            out.add(pages.Table(["window", *fit_keys],
                                [[f"({f['start']}, {f['end']}]", *(fmt(f[k]) for k in fit_keys)] for f in ref["fits"]],
                                caption=f"{ref['name']}: power laws |a(t)| ∝ t^γ_a, ‖r(t)‖ ∝ t^γ_r in (lo, hi]"))
    out.blocks += [pages.Figure(f, Path(f).stem) for f in doc.figures]
    return out


def figures(directory: Path, doc: Comparison, runs: list[Compared], reg: Registry) -> list[str]:
    """Every run's evaluations on one axis, then the figures each metric plugin contributes."""
    plt = pyplot()
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        made.append(save_figure(fig, directory, name))

    for key, log in (("p_ood", False), ("val_loss", True)):  # every run's evaluations, the references dashed
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for row, run in zip(doc.runs, runs):
            ax.plot([e.step for e in run.report.evals], [getattr(e, key) for e in run.report.evals], label=row.label)
        plot_references(ax, doc.references, key)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
        save(fig, f"{key}_all")

    # the plugins' view of a configuration: its name, runs, statuses, optimizer and params, each
    # column's mean under the column id and its interval under `<id>_interval`
    groups = [{"group": g.group, "runs": g.runs, "statuses": g.statuses, "optimizer": g.optimizer, "params": g.params,
               **g.values, **{f"{c}_interval": i for c, i in g.intervals.items()}} for g in doc.groups]
    for name, plugin in reg.metrics.items():
        if plugin.comparison_figures is None:
            continue
        results: list[tuple[str, MetricResult]] = [(row.label, run.report.metrics[name]) for row, run in zip(doc.runs, runs)
                                                   if name in run.report.metrics
                                                   and run.report.metrics[name].status == "ok"]
        if results or doc.references:
            plugin.comparison_figures(runs=results, groups=groups, references=doc.references, plt=plt, save=save)
    return made
