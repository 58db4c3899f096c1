"""The standardized run report: assembled from the run, validated against the shipped JSON Schema,
written as report.json (for tools) and report.md with figures (for people).

Metric plugins add sections under `metrics` in a shape the report renders without knowing them
(`scalars`, `series`, `tables`, `figures`); lifecycle plugins may add under `extensions`.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import torch

import geobench
from geobench import config, optim
from geobench.figures import pyplot, save_figure
from geobench.files import atomic_write_json, atomic_write_text
from geobench.rundir import RunDir

if TYPE_CHECKING:
    from geobench.train import Outcome, Setup

SCHEMA_VERSION = "1.0"
EVAL_KEYS = ("val_loss", "p_in", "p_ood", "nll_ood", "lm_ood", "r_ood")
PACKAGES = ("numpy", "datasets", "tokenizers", "safetensors", "pluggy", "scikit-learn")

# docs/science.md#published-figures, AdamW seed 42 (paper preset): step → published value, shown beside ours.
PUBLISHED_VAL_LOSS = {1: 10.81, 200: 4.35, 4000: 2.18, 10000: 1.216}
PUBLISHED_FINAL = {"p_in": 0.90, "p_ood": 0.166, "best_p_ood": 0.777}


LM_OOD = {"clean": "CE on the OOD examples' non-probe tokens, padding excluded (probe.lm_ood=clean)",
          "source": "CE on the OOD examples' non-probe tokens and the EOS padding after the query, as the "
                    "source counted it (probe.lm_ood=source)"}


@functools.cache
def load_schema(name: str) -> dict:
    """A JSON Schema shipped with geobench: `report` or `comparison`, at schema version 1.0."""
    return json.loads(resources.files("geobench.schemas").joinpath(f"{name}-{SCHEMA_VERSION}.json").read_text())


def validate(report: dict) -> None:
    jsonschema.validate(report, load_schema("report"))


def metric_problem(result: dict) -> str | None:
    """Why a metric result would not fit the report schema, or None."""
    root = load_schema("report")
    try:
        jsonschema.validate(finite(result), {"$defs": root["$defs"], "$ref": "#/$defs/metric"})
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the result"
        return f"{where}: {exc.message}"
    return None


def git_revision() -> str | None:
    """The commit of the geobench source in use, when it is a git checkout."""
    here = Path(geobench.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    packages = {}
    for pkg in PACKAGES:
        try:
            packages[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "device": name, "threads": torch.get_num_threads(), "git_revision": git_revision(),
            "packages": packages}


def finite(value: Any) -> Any:
    """JSON has no NaN or inf: they become null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def final_summary(evals: list[dict]) -> dict:
    if not evals:
        return {}
    last = evals[-1]
    scored = [e for e in evals if e.get("p_ood") is not None and math.isfinite(e["p_ood"])]
    best = max(scored, key=lambda e: e["p_ood"]) if scored else None
    return {"step": last["step"], **{k: last[k] for k in EVAL_KEYS},
            "best_p_ood": best["p_ood"] if best else None, "best_p_ood_step": best["step"] if best else None}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def assemble(setup: Setup, out: RunDir, outcome: Outcome, metrics: dict, started: str, preset_reason: str,
             processes: int = 1) -> dict:
    """The report of a finished (or diverged, or interrupted) training run."""
    cfg = setup.cfg
    evals = out.read_evals()
    seconds = outcome.train_seconds
    return {
        "schema_version": SCHEMA_VERSION,
        "geobench_version": geobench.__version__,
        "run": {"name": out.path.name, "status": outcome.status, "last_step": outcome.last_step,
                "steps_planned": cfg.train.steps, "diverged_at": outcome.diverged_at,
                "divergence": outcome.divergence, "stopped_early_at": outcome.stopped_early_at,
                "baseline_val_loss": outcome.baseline_val_loss,
                "resumed_from": outcome.resumed_from, "started": started, "finished": now(),
                "preset": cfg.preset, "preset_reason": preset_reason},
        "environment": {**environment(setup.device), "processes": processes},
        "corpus": setup.corpus.summary(),
        "tokenizer": {**setup.tokenizer.summary(), "codewords": len(setup.probe.codewords),
                      "probe": setup.probe.describe()},
        "model": {"family": cfg.model.family, "parameters": setup.parameter_counts()},
        "optimizer": {"name": cfg.optimizer.name, "source": setup.optimizer_plugin.source,
                      "params": cfg.optimizer.params,
                      **optim.describe(setup.optimizer_plugin, setup.optimizer, setup.parameters)},
        "config": config.to_dict(cfg),
        "throughput": {"train_seconds": round(seconds, 3), "tokens": outcome.tokens,
                       "tokens_per_second": outcome.tokens / seconds if seconds else None,
                       "compile_seconds": outcome.compile_seconds},
        "evals": evals,
        "final": final_summary(evals),
        "metrics": metrics,
        "extensions": {},
    }


def assemble_trajectory(source: str, optimizer: str, params: str, steps: list[int], shapes: dict, metrics: dict,
                        started: str) -> dict:
    """The report of checkpoints geobench did not write (a manifest's trajectory): no training sections."""
    return {
        "schema_version": SCHEMA_VERSION,
        "geobench_version": geobench.__version__,
        "environment": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "trajectory": {"kind": "manifest", "source": source, "optimizer": optimizer, "params": params, "steps": steps,
                       "parameters": len(shapes), "dimension": sum(math.prod(s) for s in shapes.values()),
                       "started": started, "finished": now()},
        "metrics": metrics,
        "extensions": {},
    }


def write(out: RunDir, report: dict, hooks) -> None:
    """Let lifecycle plugins extend it, validate it, then write report.json, report.md, figures."""
    hooks.geobench_on_report(run=out, report=report)
    report = finite(report)
    validate(report)
    figures = [plot_training(out, report["evals"])] if report.get("evals") else []
    atomic_write_json(out.report_json, report)
    atomic_write_text(out.report_md, render_markdown(report, figures))


def plot_training(out: RunDir, evals: list[dict]) -> str:
    plt = pyplot()
    steps = [e["step"] for e in evals]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, [e["val_loss"] for e in evals], marker="o", ms=3, label="val_loss")
    left.plot(steps, [e.get("train_loss") for e in evals], alpha=0.7, label="train loss (composite)")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats)")
    left.legend()
    right.plot(steps, [e["p_in"] for e in evals], marker="o", ms=3, label="p_in")
    right.plot(steps, [e["p_ood"] for e in evals], marker="o", ms=3, label="p_ood")
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("probe exact match")
    right.legend()
    fig.tight_layout()
    return save_figure(fig, out.path, "training")


def duration(seconds: float) -> str:
    """`seconds` in the largest unit that keeps the number readable: 40 s, 12.5 min, 5.3 h, 2.1 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def fmt(value: Any) -> str:
    """A value as a table cell: 4 significant digits, — for missing."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(report: dict, figures: list[str]) -> str:
    if "trajectory" in report:
        return render_trajectory(report)
    run, env = report["run"], report["environment"]
    lines = [f"# geobench run `{run['name']}`", ""]
    status = run["status"]
    if status == "diverged":
        status += f" at step {run['diverged_at']} ({run.get('divergence') or 'non-finite loss'})"
    if run.get("stopped_early_at"):
        status += f", stopped early at step {run['stopped_early_at']} (train.early_stop)"
    lines += [
        f"**Status:** {status} — {run['last_step']} of {run['steps_planned']} steps"
        + (f" (resumed from step {run['resumed_from']})" if run["resumed_from"] else ""), "",
        "| | |", "|---|---|",
        f"| preset | {run['preset']} ({run['preset_reason']}) |",
        f"| optimizer | `{report['optimizer']['name']}` {report['optimizer']['params']} ({report['optimizer']['source']}) |",
        f"| corpus | {report['corpus']['description']} |",
        f"| tokenizer | {report['tokenizer']['description']}, vocab {report['tokenizer']['vocab_size']} |",
        f"| probe | {report['tokenizer'].get('probe', 'clean codewords')} |",
        f"| model | {report['model']['family']}: {report['model']['parameters']['total']:,} parameters "
        f"(trunk {report['model']['parameters']['trunk']:,}) |",
        f"| device | {env['device']}, torch {env['torch']}, {env['threads']} threads |",
        f"| throughput | {fmt(report['throughput']['tokens_per_second'])} tokens/s over "
        f"{report['throughput']['train_seconds']:.1f} s of training"
        + (f" (first step with torch.compile: {report['throughput']['compile_seconds']:.1f} s, not counted)"
           if report["throughput"].get("compile_seconds") is not None else "") + " |",
        f"| lm_ood | {LM_OOD[report['config'].get('probe', {}).get('lm_ood', 'clean')]} |",
        f"| divergence criterion | val_loss > {report['config'].get('train', {}).get('diverge_factor', 1.0):g} × the "
        f"val_loss before the first update ({fmt(run.get('baseline_val_loss'))}), or a non-finite loss |",
        f"| git revision | {env['git_revision'] or '—'} |", "",
    ]
    lines += render_optimizer(report["optimizer"])
    final = report["final"]
    if final:
        paper = run["preset"] == "paper"
        lines += ["## Final evaluation", "", "| metric | value |" + (" published |" if paper else ""),
                  "|---|---|" + ("---|" if paper else "")]
        for key in (*EVAL_KEYS, "best_p_ood", "best_p_ood_step"):
            ref = ""
            if paper:
                ref = f" {fmt(PUBLISHED_FINAL.get(key)) if run['last_step'] == 10000 or key == 'best_p_ood' else '—'} |"
            lines.append(f"| {key} | {fmt(final.get(key))} |{ref}")
        lines.append("")
    for fig in figures:
        lines += [f"![training curves]({fig})", ""]
    if report["evals"]:
        rule = any("gradient_rule" in e for e in report["evals"])  # what the optimizer's gradient rule reported
        lines += ["## Evaluations", "", "| step | " + " | ".join(EVAL_KEYS) + (" | gradient rule since the last |"
                                                                          if rule else " |"),
                  "|---|" + "---|" * (len(EVAL_KEYS) + rule)]
        for e in report["evals"]:
            cells = [fmt(e.get(k)) for k in EVAL_KEYS]
            if run["preset"] == "paper" and e["step"] in PUBLISHED_VAL_LOSS:
                cells[0] += f" (published {PUBLISHED_VAL_LOSS[e['step']]})"
            if rule:
                cells.append(", ".join(f"{k} {fmt(v)}" for k, v in e.get("gradient_rule", {}).items()))
            lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, result in report["metrics"].items():
        lines += render_metric(name, result)
    return "\n".join(lines)


def render_optimizer(opt: dict) -> list[str]:
    """How the optimizer was driven and which parameters each of its groups held."""
    if "groups" not in opt:  # a report of an earlier version
        return []
    schedule = opt["schedule"]
    lines = ["## Optimizer", "", "| | |", "|---|---|",
             "| libraries | " + ", ".join(f"{k} {v}" for k, v in opt["libraries"].items()) + " |",
             "| schedule | " + ("the harness's warmup + clamped cosine; lr is " + schedule["lr"]
                                if schedule["owner"] == "harness" else "the optimizer's own (the harness sets no lr)") + " |",
             f"| trajectory | {opt['trajectory']} |",
             f"| state | {opt['state_floats_per_parameter']:.3g} floats per parameter |"]
    extras = [what for flag, what in (("closure", "a closure recomputing the step's loss and gradient"),
                                      ("second_order", "second derivatives (create_graph, math attention)"))
              if opt[flag]]
    if extras:
        lines.append(f"| the step uses | {'; '.join(extras)} |")
    if not opt["deterministic"]:
        lines.append("| resume | not bit-identical to an uninterrupted run (the plugin declares it non-deterministic) |")
    lines += ["", "| group | optimizer | parameters | roles | names | hyperparameters |", "|---|---|---|---|---|---|"]
    for i, group in enumerate(opt["groups"]):
        hyper = ", ".join(f"{k}={fmt(v)}" for k, v in group["hyperparameters"].items() if v is not False)  # flags off: noise
        lines.append(f"| {i} | `{group['optimizer']}` | {group['parameters']:,} | {', '.join(group['roles'])} | "
                     f"{group['names']} | {hyper} |")
    return lines + [""]


def render_trajectory(report: dict) -> str:
    t, env = report["trajectory"], report["environment"]
    lines = [f"# geobench analysis of `{t['optimizer']}` from `{t['source']}`", "",
             "Checkpoints geobench did not write: no training section.", "", "| | |", "|---|---|",
             f"| checkpoints | {len(t['steps'])} (iter {t['steps'][0]} … {t['steps'][-1]}) |",
             f"| parameters | {t['parameters']} tensors matching `{t['params']}`, {t['dimension']:,} values |",
             f"| device | {env['device']}, torch {env['torch']} |", ""]
    for name, result in report["metrics"].items():
        lines += render_metric(name, result)
    return "\n".join(lines)


def render_metric(name: str, result: dict) -> list[str]:
    lines = [f"## Metric `{name}`", ""]
    if result["status"] == "failed":
        return lines + [f"**failed:** {result.get('error', '')}", ""]
    if result["status"] == "skipped":
        return lines + [f"**skipped:** {result.get('reason', '')}", ""]
    if result.get("variant"):
        lines += [f"*Computed as:* {result['variant']}", ""]
    if result.get("no_signal"):
        lines += [f"**No signal:** {result['no_signal']}. The numbers stay in report.json.", ""]
        return lines + [line for fig in result.get("figures", []) for line in (f"![{name}]({fig})", "")]
    scalars = result.get("scalars", {})
    if scalars:
        lines += ["| quantity | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in scalars.items()] + [""]
    for table_name, rows in result.get("tables", {}).items():
        if rows:
            cols = list(rows[0])
            lines += [f"**{table_name}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows] + [""]
    for fig in result.get("figures", []):
        lines += [f"![{name}]({fig})", ""]
    return lines
