"""The standardized run report: assembled from the run as a typed document (`documents.RunReport`),
validated against the shipped JSON Schema, written as report.json (for tools) and as report.md and
a self-contained report.html with figures (for people, one `page.Page` rendered twice).

Metric plugins add their `MetricResult` under `metrics`, which the page renders without knowing
them; lifecycle plugins may add under `extensions`.
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
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import torch

import geobench
from geobench import config, optim
from geobench import page as pages
from geobench.api.documents import EvalRecord, to_json
from geobench.documents import (
    COMPARISON_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Environment,
    FinalSummary,
    MetricOutcome,
    ModelInfo,
    Report,
    RunInfo,
    RunReport,
    Throughput,
    TrajectoryInfo,
    TrajectoryReport,
    report_to_json,
)
from geobench.figures import Line, draw, pyplot, save_figure
from geobench.files import atomic_write_json
from geobench.formatting import duration, number, plain
from geobench.rundir import RunDir

if TYPE_CHECKING:
    from geobench.api import MetricPlugin
    from geobench.registry import Registry
    from geobench.train import Outcome, Setup

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
    """A JSON Schema shipped with geobench: `report` (version 1.0) or `comparison` (2.1)."""
    version = {"report": SCHEMA_VERSION, "comparison": COMPARISON_SCHEMA_VERSION}[name]
    return json.loads(resources.files("geobench.schemas").joinpath(f"{name}-{version}.json").read_text())


def validate(data: dict[str, Any]) -> None:
    """Check a report's JSON form against the schema."""
    jsonschema.validate(data, load_schema("report"))


def metric_problem(outcome: MetricOutcome) -> str | None:
    """Why a metric's outcome would not fit the report schema, or None."""
    root = load_schema("report")
    try:
        jsonschema.validate(to_json(outcome), {"$defs": root["$defs"], "$ref": "#/$defs/metric"})
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


def environment(device: torch.device, processes: int | None = None) -> Environment:
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
    return Environment(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
                       device=name, threads=torch.get_num_threads(), git_revision=git_revision(), packages=packages,
                       processes=processes)


def final_summary(evals: list[EvalRecord]) -> FinalSummary | None:
    if not evals:
        return None
    last = evals[-1]
    scored = [e for e in evals if e.p_ood is not None and math.isfinite(e.p_ood)]
    best = max(scored, key=lambda e: e.p_ood or 0.0) if scored else None
    return FinalSummary(step=last.step, val_loss=last.val_loss, p_in=last.p_in, p_ood=last.p_ood,
                        nll_ood=last.nll_ood, lm_ood=last.lm_ood, r_ood=last.r_ood,
                        best_p_ood=best.p_ood if best else None, best_p_ood_step=best.step if best else None)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def assemble(setup: Setup, out: RunDir, outcome: Outcome, metrics: dict[str, MetricOutcome], started: str,
             preset_reason: str, processes: int = 1) -> RunReport:
    """The report of a finished (or diverged, or interrupted) training run, from the evaluations the
    trainer hands over."""
    cfg = setup.cfg
    seconds = outcome.train_seconds
    return RunReport(
        schema_version=SCHEMA_VERSION, geobench_version=geobench.__version__,
        run=RunInfo(name=out.path.name, status=outcome.status, last_step=outcome.last_step,
                    steps_planned=cfg.train.steps, diverged_at=outcome.diverged_at, divergence=outcome.divergence,
                    stopped_early_at=outcome.stopped_early_at, baseline_val_loss=outcome.baseline_val_loss,
                    resumed_from=outcome.resumed_from, started=started, finished=now(), preset=cfg.preset,
                    preset_reason=preset_reason),
        environment=environment(setup.device, processes),
        corpus=setup.corpus.summary(),
        tokenizer={**setup.tokenizer.summary(), "codewords": len(setup.probe.codewords),
                   "probe": setup.probe.describe()},
        model=ModelInfo(family=cfg.model.family, parameters=setup.parameter_counts()),
        optimizer={"name": cfg.optimizer.name, "source": setup.optimizer_plugin.source, "params": cfg.optimizer.params,
                   **optim.describe(setup.optimizer_plugin, setup.optimizer, setup.parameters)},
        config=config.to_dict(cfg),
        throughput=Throughput(train_seconds=round(seconds, 3), tokens=outcome.tokens,
                              tokens_per_second=outcome.tokens / seconds if seconds else None,
                              compile_seconds=outcome.compile_seconds),
        evals=list(outcome.evals), final=final_summary(outcome.evals), metrics=metrics)


def assemble_trajectory(source: str, optimizer: str, params: str, steps: list[int], shapes: dict,
                        metrics: dict[str, MetricOutcome], started: str) -> TrajectoryReport:
    """The report of checkpoints geobench did not write (a manifest's trajectory): no training sections."""
    return TrajectoryReport(
        schema_version=SCHEMA_VERSION, geobench_version=geobench.__version__,
        environment=environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        trajectory=TrajectoryInfo(kind="manifest", source=source, optimizer=optimizer, params=params, steps=steps,
                                  parameters=len(shapes), dimension=sum(math.prod(s) for s in shapes.values()),
                                  started=started, finished=now()),
        metrics=metrics)


def write(out: RunDir, report: Report, reg: Registry) -> None:
    """Let lifecycle plugins extend it (`report.extensions`), validate it, then write report.json
    and its page, report.md and report.html, with the figures."""
    reg.hooks.geobench_on_report(run=out, report=report)
    data = report_to_json(report)
    validate(data)
    figures = [plot_training(out, report)] if isinstance(report, RunReport) and report.evals else []
    atomic_write_json(out.report_json, data)
    pages.write(page(report, figures, reg.metrics), out.path, "report")


def lambda_switches(config: dict[str, Any]) -> list[int]:
    """The steps where the run's λ schedule changes λ."""
    schedule = config.get("train", {}).get("lambda_schedule") or []
    return [int(step) for (step, lam), (_, before) in zip(schedule[1:], schedule) if lam != before]


TRAINING_CAPTION = ("Left: validation cross-entropy (nats) at each evaluation. Middle: the training objective, the "
                    "language-model cross-entropy plus λ × the probe's (λ-weighted, so it jumps where λ changes). "
                    "Right: probe exact match in distribution (p_in) and on out-of-distribution gaps (p_ood).")


def plot_training(out: RunDir, report: RunReport) -> str:
    plt = pyplot()
    evals = report.evals
    steps = [e.step for e in evals]
    events = {f"λ switch (step {s})": s for s in lambda_switches(report.config)}
    marks = {"diverged": report.run.diverged_at} if report.run.diverged_at is not None else {}
    fig, (val, objective, probe) = plt.subplots(1, 3, figsize=(13, 3.6))
    draw(val, [Line("val_loss", steps, [e.val_loss for e in evals], colour="#1f77b4", marks=marks)],
         ylabel="validation CE (nats)", events=events)
    draw(objective, [Line("training objective", steps, [e.train_loss for e in evals], colour="#7f7f7f", marks=marks)],
         ylabel="CE + λ · probe CE (nats)", events=events)
    draw(probe, [Line("p_in", steps, [e.p_in for e in evals], colour="#2ca02c"),
                 Line("p_ood", steps, [e.p_ood for e in evals], colour="#d62728", marks=marks)],
         ylabel="probe exact match", events=events, ylim=(-0.02, 1.02))
    fig.tight_layout()
    return save_figure(fig, out.path, "training")


# what the evaluation columns of a run mean (docs/science.md#the-probe-task)
CORE_TERMS = {
    "val_loss": "cross-entropy per token (nats) of next-token prediction on validation stories without probes",
    "p_in": "probe exact match (the model's most likely token is the codeword at every masked position), averaged "
            "over the in-distribution set (key–query gaps as in training)",
    "p_ood": "the same over the out-of-distribution set (gaps longer than any in training)",
    "nll_ood": "cross-entropy (nats) at the OOD set's masked positions",
    "lm_ood": "cross-entropy (nats) at the OOD set's other positions",
    "r_ood": "nll_ood / lm_ood",
    "best_p_ood": "the highest p_ood over the run's evaluations",
}


def _settings(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={plain(v)}" for k, v in params.items())


HEADLINE_COLUMNS = 3  # of each metric's declared columns, in the headline


def run_headline(report: RunReport, metrics: Mapping[str, MetricPlugin]) -> list[str]:
    """What ran and how it ended; where the loss and the probe ended; what each metric found."""
    run, opt = report.run, report.optimizer
    what = f"`{opt['name']}` ({_settings(opt['params'])})" if opt["params"] else f"`{opt['name']}`"
    if run.status == "diverged":
        how = (f"diverged at step {run.diverged_at} ({run.divergence or 'non-finite loss'}) and stopped at step "
               f"{run.last_step} of {run.steps_planned}")
    elif run.stopped_early_at:
        how = f"stopped early at step {run.stopped_early_at} of {run.steps_planned} (train.early_stop)"
    elif run.status == "completed":
        how = f"completed all {run.steps_planned} steps"
    else:
        how = f"was {run.status} at step {run.last_step} of {run.steps_planned}"
    sentences = [f"{what} {how} on the {report.corpus['kind']} corpus, {report.run.preset} preset, on "
                 f"{report.environment.device}."]
    final = report.final
    if final:
        best = (f" (best {number(final.best_p_ood)} at step {final.best_p_ood_step})"
                if final.best_p_ood is not None else "")
        sentences.append(f"At step {final.step}: val_loss {number(final.val_loss)} nats, p_in {number(final.p_in)}, "
                         f"p_ood {number(final.p_ood)}{best}.")
    found, silent, failed = [], [], []
    for name, result in report.metrics.items():
        if result.status == "failed":
            failed.append(f"`{name}`")
        elif result.no_signal:
            silent.append(f"`{name}`")
        elif result.status == "ok" and name in metrics:
            shown = [f"{heading} {number(result.scalars[scalar])}" for scalar, heading in metrics[name].columns.values()
                     if result.scalars.get(scalar) is not None][:HEADLINE_COLUMNS]
            if shown:
                found.append(f"`{name}` {', '.join(shown)}")
    parts = ["; ".join(found)] if found else []
    if silent:
        parts.append(f"no signal from {', '.join(silent)} (the reason is under each)")
    if failed:
        parts.append(f"failed: {', '.join(failed)}")
    if parts:
        sentences.append("Metrics: " + "; ".join(parts) + ".")
    return sentences


def page(report: Report, figures: list[str], metrics: Mapping[str, MetricPlugin]) -> pages.Page:
    """The human-readable page of a report (report.md and report.html)."""
    if isinstance(report, TrajectoryReport):
        return trajectory_page(report, metrics)
    run, env = report.run, report.environment
    status: str = run.status
    if run.status == "diverged":
        status += f" at step {run.diverged_at} ({run.divergence or 'non-finite loss'})"
    if run.stopped_early_at:
        status += f", stopped early at step {run.stopped_early_at} (train.early_stop)"
    opt, tok, throughput = report.optimizer, report.tokenizer, report.throughput
    compiled = (f" (first step with torch.compile: {throughput.compile_seconds:.1f} s, not counted)"
                if throughput.compile_seconds is not None else "")
    train = report.config.get("train", {})
    out = pages.Page(f"geobench run `{run.name}`", headline=run_headline(report, metrics))
    out.add(pages.Paragraph(f"**Status:** {status} — {run.last_step} of {run.steps_planned} steps"
                            + (f" (resumed from step {run.resumed_from})" if run.resumed_from else "")),
            pages.Table(["", ""], [
                ["preset", f"{run.preset} ({run.preset_reason})"],
                ["optimizer", f"`{opt['name']}` {_settings(opt['params'])} ({opt['source']})"],
                ["schedule", f"{run.steps_planned} steps of {train.get('batch_size')} sequences, warmup "
                             f"{train.get('warmup')}, λ {train.get('lambda_schedule')} (step, λ), evaluation every "
                             f"{train.get('eval_every')}, seed {train.get('seed')}"],
                ["corpus", report.corpus["description"]],
                ["tokenizer", f"{tok['description']}, vocab {tok['vocab_size']}"],
                ["probe", tok.get("probe", "clean codewords")],
                ["model", f"{report.model.family}: {report.model.parameters['total']:,} parameters "
                          f"(trunk {report.model.parameters['trunk']:,})"],
                ["device", f"{env.device}, torch {env.torch}, {env.threads} threads"],
                ["throughput", f"{number(throughput.tokens_per_second)} tokens/s over {throughput.train_seconds:.1f} s "
                               f"of training{compiled}"],
                ["lm_ood", LM_OOD[report.config.get("probe", {}).get("lm_ood", "clean")]],
                ["divergence criterion", f"val_loss > {train.get('diverge_factor', 1.0):g} × "
                                         f"the val_loss before the first update ({number(run.baseline_val_loss)}), "
                                         "or a non-finite loss"],
                ["git revision", env.git_revision or "—"]]))
    out.blocks += optimizer_blocks(opt)
    final = report.final
    if final:
        paper = run.preset == "paper"
        rows: list[list[Any]] = []
        for key in (*EVAL_KEYS, "best_p_ood", "best_p_ood_step"):
            row: list[Any] = [key, getattr(final, key)]
            if paper:
                row.append(PUBLISHED_FINAL.get(key) if run.last_step == 10000 or key == "best_p_ood" else None)
            rows.append(row)
        out.add(pages.Heading("Final evaluation"),
                pages.Table(["metric", "value"] + (["published"] if paper else []),
                            [[r[0], *(number(v) for v in r[1:])] for r in rows]))
    for fig in figures:
        out.add(pages.Figure(fig, TRAINING_CAPTION))
    if report.evals:
        rule = any(e.gradient_rule for e in report.evals)  # what the optimizer's gradient rule reported
        published = run.preset == "paper" and any(e.step in PUBLISHED_VAL_LOSS for e in report.evals)
        body = []
        for e in report.evals:
            cells: list[Any] = [e.step, *(getattr(e, k) for k in EVAL_KEYS)]
            if published:
                cells.append(PUBLISHED_VAL_LOSS.get(e.step))
            if rule:
                cells.append(", ".join(f"{k} {number(v)}" for k, v in e.gradient_rule.items()))
            body.append(cells)
        out.add(pages.Heading("Evaluations"),
                pages.table(["step", *EVAL_KEYS] + (["val_loss (published)"] if published else [])
                            + (["gradient rule since the last"] if rule else []), body))
    for name, result in report.metrics.items():
        out.blocks += metric_blocks(name, result)
    out.add(pages.Heading("Terms"), pages.Terms(page_terms(report, metrics)))
    return out


def page_terms(report: Report, metrics: Mapping[str, MetricPlugin]) -> dict[str, str]:
    """The evaluation columns' terms (a run's page) and those of every metric on the page."""
    out = dict(CORE_TERMS) if isinstance(report, RunReport) else {}
    for name in report.metrics:
        if name in metrics:
            out.update(metrics[name].terms)
    return out


def optimizer_blocks(opt: dict[str, Any]) -> list[pages.Block]:
    """How the optimizer was driven and which parameters each of its groups held."""
    if "groups" not in opt:  # a report of an earlier version
        return []
    schedule = opt["schedule"]
    rows = [["libraries", ", ".join(f"{k} {v}" for k, v in opt["libraries"].items())],
            ["schedule", "the harness's warmup + clamped cosine; lr is " + schedule["lr"]
             if schedule["owner"] == "harness" else "the optimizer's own (the harness sets no lr)"],
            ["trajectory", opt["trajectory"]],
            ["state", f"{opt['state_floats_per_parameter']:.3g} floats per parameter"]]
    extras = [what for flag, what in (("closure", "a closure recomputing the step's loss and gradient"),
                                      ("second_order", "second derivatives (create_graph, math attention)"))
              if opt[flag]]
    if extras:
        rows.append(["the step uses", "; ".join(extras)])
    if not opt["deterministic"]:
        rows.append(["resume", "not bit-identical to an uninterrupted run (the plugin declares it non-deterministic)"])
    groups = [[str(i), f"`{group['optimizer']}`", f"{group['parameters']:,}", ", ".join(group["roles"]), f"`{group['names']}`",
               ", ".join(f"{k}={plain(v)}" for k, v in group["hyperparameters"].items() if v is not False)]  # flags off: noise
              for i, group in enumerate(opt["groups"])]
    return [pages.Heading("Optimizer"), pages.Table(["", ""], rows),
            pages.Table(["group", "optimizer", "parameters", "roles", "names", "hyperparameters"], groups)]


def trajectory_page(report: TrajectoryReport, metrics: Mapping[str, MetricPlugin]) -> pages.Page:
    t, env = report.trajectory, report.environment
    ok = [f"`{n}`" for n, r in report.metrics.items() if r.status == "ok" and not r.no_signal]
    out = pages.Page(f"geobench analysis of `{t.optimizer}` from `{t.source}`",
                     headline=[f"{len(t.steps)} checkpoints of `{t.optimizer}` (iter {t.steps[0]} … {t.steps[-1]}), "
                               f"{t.dimension:,} values in {t.parameters} tensors, analysed by "
                               f"{', '.join(ok) or 'no metric that found a signal'}."])
    out.add(pages.Paragraph("Checkpoints geobench did not write: no training section."),
            pages.Table(["", ""], [["checkpoints", f"{len(t.steps)} (iter {t.steps[0]} … {t.steps[-1]})"],
                                   ["parameters", f"{t.parameters} tensors matching `{t.params}`, {t.dimension:,} values"],
                                   ["device", f"{env.device}, torch {env.torch}"]]))
    for name, result in report.metrics.items():
        out.blocks += metric_blocks(name, result)
    terms = page_terms(report, metrics)
    if terms:
        out.add(pages.Heading("Terms"), pages.Terms(terms))
    return out


def metric_blocks(name: str, result: MetricOutcome) -> list[pages.Block]:
    took = f" ({duration(result.seconds)})" if result.seconds is not None else ""
    blocks: list[pages.Block] = [pages.Heading(f"Metric `{name}`{took}")]
    if result.status == "failed":
        return blocks + [pages.Paragraph(f"**failed:** {result.error or ''}")]
    if result.status == "skipped":
        return blocks + [pages.Paragraph(f"**skipped:** {result.reason or ''}")]
    if result.variant:
        blocks.append(pages.Paragraph(f"*Computed as:* {result.variant}"))
    blocks += [pages.Paragraph(f"*Note:* {note}") for note in result.notes]
    figures = [pages.Figure(fig, result.captions.get(fig) or f"{name}: {Path(fig).stem.replace('_', ' ')}")
               for fig in result.figures]
    if result.no_signal:
        return blocks + [pages.Paragraph(f"**No signal:** {result.no_signal}. The numbers stay in report.json."),
                         *figures]
    if result.scalars:
        blocks.append(pages.Table(["quantity", "value"], [[k, number(v)] for k, v in result.scalars.items()]))
    for table_name, rows in result.tables.items():
        if rows:
            cols = list(dict.fromkeys(c for r in rows for c in r))
            blocks.append(pages.table(cols, [[r.get(c) for c in cols] for r in rows], caption=table_name))
    return blocks + figures
