"""Side-by-side reports of finished runs: one tidy table (a row per run), the paper-style tables
with the published figures beside ours, a mean ± bootstrap interval over seeds where a configuration
ran with several, and figures of all runs on one axis. Written as comparison.json (schema-validated),
comparison.md and a self-contained comparison.html."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import jsonschema
import numpy as np

import geobench
from geobench import published
from geobench.api import UsageError
from geobench.figures import plot_references, pyplot, save_figure
from geobench.files import atomic_write_json, atomic_write_text, read_json
from geobench.registry import Registry
from geobench.report import SCHEMA_VERSION, finite, fmt, load_schema, now

# the columns of every run; metric plugins add theirs (MetricPlugin.columns)
CORE_COLUMNS = {"val_loss": (("final", "val_loss"), "val loss"), "best_p_ood": (("final", "best_p_ood"), "best p_ood")}
# a table's kind says what its first column shows for each configuration
TABLES = {"main": "configuration", "beta2": "β₂", "sgd": "run", "reheat": "configuration", "ep": "configuration",
          "leaderboard": "optimizer"}
ORDERED_BY = {"leaderboard": "val_loss"}  # tables whose rows are ranked by a column (ascending, missing last)


def columns(reg: Registry) -> dict[str, tuple[tuple[str, ...], str]]:
    """Every comparison column: id → (where in a run's report, heading); a metric's columns are
    the scalars its plugin declares, in registry order."""
    found: dict[str, tuple[tuple[str, ...], str]] = dict(CORE_COLUMNS)
    for name, plugin in reg.metrics.items():
        for column, (scalar, heading) in plugin.columns.items():
            if column in found:
                raise UsageError(f"metric {name!r} declares comparison column {column!r}, which another plugin declares")
            found[column] = (("metrics", name, "scalars", scalar), heading)
    return found


def _dig(doc: dict, path: tuple) -> float | None:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc if isinstance(doc, (int, float)) and not isinstance(doc, bool) else None


def load_run(path: Path) -> dict:
    report = path / "report.json"
    if not report.exists():
        raise UsageError(f"{str(path)!r} has no report.json (not a finished geobench run or suite)")
    doc = read_json(report, "report")
    if not isinstance(doc, dict) or not isinstance(doc.get("run"), dict) or "evals" not in doc:
        raise UsageError(f"{str(report)!r} is not the report of a training run (an `analyze --manifest` report has no "
                         "training to compare)")
    return doc


def run_row(path: Path, doc: dict, known: dict, label: str | None = None, group: str | None = None) -> dict:
    params = doc["optimizer"]["params"]
    seed = doc["config"]["train"]["seed"]
    name = label or path.name
    # runs that differ only in their seed (`-s271`, `-seed=271` in the name) form one group
    default_group = re.sub(rf"-(s|seed=){seed}(?=-|$)", "", name)
    row = {"run": str(path), "label": name, "group": group or default_group,
           "optimizer": doc["optimizer"]["name"], "params": params, "seed": seed,
           "status": doc["run"]["status"], "steps": doc["run"]["last_step"], "diverged_at": doc["run"]["diverged_at"]}
    row.update({col: _dig(doc, where) for col, (where, _) in known.items()})
    return row


def bootstrap_interval(values: list[float], rng, resamples: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of the mean."""
    data = np.asarray(values, dtype=float)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def aggregate(rows: list[dict], columns: list[str], seed: int = 0) -> list[dict]:
    """One row per group: mean over its runs and, with two or more, a bootstrap interval."""
    rng = np.random.default_rng(seed)
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        agg = {"group": group, "runs": len(members), "statuses": sorted({r["status"] for r in members}),
               "params": members[0]["params"], "optimizer": members[0]["optimizer"]}
        for col in columns:
            values = [r[col] for r in members if r[col] is not None and math.isfinite(r[col])]
            agg[col] = float(np.mean(values)) if values else None
            agg[f"{col}_interval"] = list(bootstrap_interval(values, rng)) if len(values) >= 2 else None
        out.append(agg)
    return out


def _cell(agg: dict, col: str, figures: dict) -> str:
    value, interval = agg[col], agg.get(f"{col}_interval")
    text = fmt(value)
    if interval:
        text += f" ± {(interval[1] - interval[0]) / 2:.3g}"
    ref = figures.get(agg["group"], {}).get(col)
    if ref is not None:
        diff = f", Δ {value - ref:+.3g}" if value is not None else ""
        text += f" (pub. {fmt(ref)}{diff})"
    return text


def variants(columns: list[str], known: dict, docs: list[dict]) -> dict[str, list[str]]:
    """Per column, how its numbers were computed: the `variant` each run's metric result states."""
    out = {}
    for col in columns:
        where = known[col][0]
        if where[0] != "metrics":
            continue
        stated = {d["metrics"].get(where[1], {}).get("variant") for d in docs}
        out[col] = sorted(v for v in stated if v)
    return out


def reference_entry(name: str) -> dict:
    """A published series (geobench.published) with its curves, analysed by geobench's series code."""
    series = published.load(name)
    return {**published.analyze(series),
            "series": {"steps": series.steps, "p_ood": series.p_ood, "val_loss": series.val_loss,
                       "a": series.a, "r_norm": series.r_norm}}


def build(paths: list[Path], title: str, reg: Registry, table: str = "main", published_figures: dict | None = None,
          labels: dict | None = None, groups: dict | None = None, extra: dict | None = None,
          references: list[str] | None = None) -> tuple[dict, list[dict]]:
    """The comparison document and the loaded run reports: the core columns and every metric
    column that at least one run has a value for; `references` names published series
    (geobench.published) drawn and tabulated beside the runs."""
    if table not in TABLES:
        raise UsageError(f"table {table!r} is not one of {', '.join(TABLES)}")
    known = columns(reg)
    docs = [load_run(p) for p in paths]
    rows = [run_row(p, d, known, (labels or {}).get(str(p)), (groups or {}).get(str(p))) for p, d in zip(paths, docs)]
    shown = [c for c in known if c in CORE_COLUMNS or any(r[c] is not None for r in rows)]
    doc = {"schema_version": SCHEMA_VERSION, "geobench_version": geobench.__version__, "title": title,
           "created": now(), "table": table, "columns": shown, "headings": {c: known[c][1] for c in shown},
           "metric_of": {c: known[c][0][1] for c in shown if known[c][0][0] == "metrics"}, "runs": rows,
           "groups": aggregate(rows, shown), "published": published_figures or {},
           "variants": variants(shown, known, docs), "references": [reference_entry(n) for n in references or []],
           "figures": [], **(extra or {})}
    return finite(doc), docs


def write(directory: Path, doc: dict, docs: list[dict], reg: Registry) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    doc["figures"] = figures(directory, doc, docs, reg)
    jsonschema.validate(doc, load_schema("comparison"))
    atomic_write_json(directory / "comparison.json", doc)
    atomic_write_text(directory / "comparison.md", markdown(doc))
    atomic_write_text(directory / "comparison.html", to_html(doc, directory))


def _table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = [TABLES[doc["table"]], "runs"] + [doc["headings"][c] for c in doc["columns"]]
    body = []
    groups = doc["groups"]
    if doc["table"] in ORDERED_BY:
        key = ORDERED_BY[doc["table"]]
        groups = sorted(groups, key=lambda g: (g.get(key) is None, g.get(key) or 0.0))
    for agg in groups:
        name = str(agg["params"].get("beta2")) if doc["table"] == "beta2" and "beta2" in agg["params"] else agg["group"]
        status = "" if agg["statuses"] == ["completed"] else f" ({'/'.join(agg['statuses'])})"
        body.append([name + status, str(agg["runs"])] + [_cell(agg, c, doc["published"]) for c in doc["columns"]])
    return header, body


REFERENCE_COLUMNS = [("name", "series"), ("best_p_ood", "best p_ood"), ("best_p_ood_step", "at step"),
                     ("final_val_loss", "final val loss"), ("drift", "drift"), ("pc1", "PC1 (row-norm., full)"),
                     ("pc1_top10", "PC1 (row-norm., top-10)"), ("pc1_raw_as_published", "PC1 (raw, as published)"),
                     ("switch_pairs", "switch pairs (peak→trough)")]


def _reference_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    body = []
    for ref in doc.get("references", []):
        pairs = ", ".join(f"{p}→{t}" for p, t in ref["switching"]["pairs"]) or "none"
        body.append([fmt(ref.get(key)) if key != "switch_pairs" else pairs for key, _ in REFERENCE_COLUMNS])
    return [title for _, title in REFERENCE_COLUMNS], body


def _variant_lines(doc: dict) -> list[str]:
    """One line per metric (and variant) naming the columns it produced."""
    by_text: dict[tuple[str, str], list[str]] = {}
    for col, stated in doc.get("variants", {}).items():
        for text in stated or ["not stated in the runs' reports"]:
            by_text.setdefault((doc["metric_of"][col], text), []).append(doc["headings"][col])
    return [f"- `{metric}` ({', '.join(cols)}): {text}" for (metric, text), cols in by_text.items()]


def _status(row: dict) -> str:
    return f"{row['status']} at step {row['diverged_at']}" if row.get("diverged_at") is not None else row["status"]


def markdown(doc: dict) -> str:
    lines = [f"# {doc['title']}", "", f"geobench {doc['geobench_version']}, {doc['created']}."]
    if doc["runs"]:
        header, body = _table_rows(doc)
        lines += ["Values are the mean over a configuration's runs; ± is half the 95% bootstrap interval over seeds; "
                  "(pub. X, Δ d) is the source study's published figure (the suite file's `published`; sources in "
                  "docs/FIDELITY.md) and our difference.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines += ["", "## Runs", "", "| run | status | steps | " + " | ".join(doc["columns"]) + " |",
                  "|---|---|---|" + "---|" * len(doc["columns"])]
        lines += [f"| {r['label']} | {_status(r)} | {r['steps']} | " + " | ".join(fmt(r[c]) for c in doc["columns"])
                  + " |" for r in doc["runs"]]
        lines += ["", "## How each column was computed", ""] + _variant_lines(doc)
    if doc.get("references"):
        header, body = _reference_rows(doc)
        lines += ["", "## Published reference series", "",
                  "The source's published outputs (mini_gpt, MIT), analysed by geobench's own series code: the "
                  "source's switch detector on their p_ood, PC1 from their singular values with both denominators, "
                  "power laws in half-open windows.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        fit_keys = ("gamma_a", "R2_a", "gamma_r", "R2_r", "corr_p_ood_r", "n")
        for ref in doc["references"]:
            lines += ["", f"**{ref['name']}: power laws |a(t)| ∝ t^γ_a, ‖r(t)‖ ∝ t^γ_r in (lo, hi]**", "",
                      "| window | " + " | ".join(fit_keys) + " |", "|---|" + "---|" * len(fit_keys)]
            lines += [f"| ({f['start']}, {f['end']}] | " + " | ".join(fmt(f[k]) for k in fit_keys) + " |"
                      for f in ref["fits"]]
    lines.append("")
    lines += [f"![{Path(f).stem}]({f})\n" for f in doc["figures"]]
    return "\n".join(lines)


def to_html(doc: dict, directory: Path) -> str:
    esc = html.escape

    def table(header: list[str], body: list[list[str]]) -> list[str]:
        return (["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
                + ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body] + ["</table>"])

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(doc['title'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}</style></head><body>",
             f"<h1>{esc(doc['title'])}</h1><p>geobench {esc(doc['geobench_version'])}, {esc(doc['created'])}</p>"]
    if doc["runs"]:
        parts += table(*_table_rows(doc))
        parts += ["<h2>How each column was computed</h2><ul>"]
        parts += [f"<li>{esc(line.removeprefix('- ').replace('`', ''))}</li>" for line in _variant_lines(doc)]
        parts.append("</ul>")
    if doc.get("references"):
        parts.append("<h2>Published reference series</h2>")
        parts += table(*_reference_rows(doc))
    for fig in doc["figures"]:
        data = base64.b64encode((directory / fig).read_bytes()).decode()
        parts.append(f"<h3>{esc(Path(fig).stem)}</h3><img alt='{esc(fig)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def figures(directory: Path, doc: dict, docs: list[dict], reg: Registry) -> list[str]:
    """Every run's evaluations on one axis, then the figures each metric plugin contributes."""
    plt = pyplot()
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        made.append(save_figure(fig, directory, name))

    for key, log in (("p_ood", False), ("val_loss", True)):  # every run's evaluations, the references dashed
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for row, run in zip(doc["runs"], docs):
            ax.plot([e["step"] for e in run["evals"]], [e[key] for e in run["evals"]], label=row["label"])
        plot_references(ax, doc.get("references", []), key)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
        save(fig, f"{key}_all")

    for name, plugin in reg.metrics.items():
        if plugin.comparison_figures is None:
            continue
        runs = [(row["label"], run["metrics"][name]) for row, run in zip(doc["runs"], docs)
                if run["metrics"].get(name, {}).get("status") == "ok"]
        if runs or doc.get("references"):
            plugin.comparison_figures(runs=runs, groups=doc["groups"], references=doc.get("references", []),
                                      plt=plt, save=save)
    return made
