"""One run from a resolved config to its report: the checks that must pass before anything is
written, then training, the end-of-run metrics and the report. `geobench run` and the benchmark
suites both go through here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from geobench import analysis, config, distributed, formatting, report, series
from geobench.api import Config, UsageError
from geobench.api.params import read_yaml_file
from geobench.device import pick_device
from geobench.documents import RunReport
from geobench.files import atomic_write_json, atomic_write_text
from geobench.memory import check_fits
from geobench.registry import Registry
from geobench.rundir import RunDir
from geobench.schedule import inconsistencies


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "train.resume":
            keys.append(f"{prefix}{key}")
    return keys


@dataclasses.dataclass
class MetricPlan:
    """The end-of-run metrics of a run: those to compute with their validated options, and those
    of the default set skipped because they cannot apply (name → reason)."""

    names: list[str]
    options: dict[str, dict]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def check(cfg: Config, out: RunDir, reg: Registry, metric_pairs: dict | None = None) -> MetricPlan:
    """Everything about the config and the run directory that must hold before a file is written;
    returns the plan of the end-of-run metrics (`metric_pairs`: {"NAME.option": value})."""
    check_fits(cfg, pick_device(cfg.train.device))
    names, skipped = analysis.plan_metrics(cfg, reg)
    plan = MetricPlan(names, analysis.metric_options(names, metric_pairs or {}, reg), skipped)
    for name in names:
        plugin = reg.metric(name)
        if plugin.check is not None:
            plugin.check(config=cfg, options=plan.options[name], reg=reg)
    if out.path.exists() and not out.path.is_dir():
        raise UsageError(f"run directory {str(out)!r} is a file")
    if out.is_empty():
        return plan
    if not cfg.train.resume:
        raise UsageError(f"run directory {str(out)!r} exists and is not empty; "
                         "continue it with resume=true or choose another with --out")
    if out.config.exists():
        changed = _differences(read_yaml_file(out.config, "run configuration"), config.to_dict(cfg))
        if changed:
            raise UsageError(f"resume=true but the config differs from {str(out.config)!r} in: {', '.join(changed)}")
    return plan


def execute(cfg: Config, out: RunDir, reg: Registry, preset_reason: str, plan: MetricPlan, *,
            here: distributed.World = distributed.World()) -> RunReport | None:
    """Train, measure and report; returns the report. Prints what ran, as the command line shows it.
    `plan` is what `check` returned. Under torchrun
    every rank trains and rank 0 alone writes, measures and reports (the others return None)."""
    from geobench.train import prepare, seconds_per_step, train, train_derived

    say = print if here.writer else (lambda *args, **kwargs: None)
    processes = f"; {here.size} processes (DistributedDataParallel)" if here.active else ""
    say(f"geobench: preset {cfg.preset} ({preset_reason}); device {pick_device(cfg.train.device)}{processes}; "
        f"optimizer {cfg.optimizer.name} {cfg.optimizer.params}; {cfg.train.steps} steps"
        f"{'; torch.compile on' if cfg.model.compile else ''}", flush=True)
    started = report.now()
    setup = prepare(cfg, reg)
    counts = setup.parameter_counts()
    say(f"geobench: corpus {setup.corpus.description}", flush=True)
    say(f"geobench: tokenizer {setup.tokenizer.summary()['description']} (vocab {setup.tokenizer.vocab_size}); "
        f"model {counts['total']:,} parameters (trunk {counts['trunk']:,})", flush=True)
    say(f"geobench: probe {setup.probe.describe()}", flush=True)
    if cfg.preset == "paper" and setup.device.type == "cpu" and here.writer:
        step = seconds_per_step(setup)
        say(f"geobench: warning: preset=paper on a CPU: one step takes {step:.1f} s here (measured, eager), so "
            f"{cfg.train.steps} steps take about {formatting.duration(step * cfg.train.steps)} before evaluations and "
            "checkpoints; "
            "the preset is meant for a CUDA GPU", flush=True)
    for problem in inconsistencies(cfg):
        say(f"geobench: warning: {problem}", flush=True)
    say(f"geobench: run directory {out}", flush=True)

    if here.writer:
        out.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.config, config.save(cfg))
        atomic_write_text(out.path / "tokenizer.json", setup.tokenizer.tokenizer.to_str())
        atomic_write_json(out.path / "codewords.json", setup.probe.codewords)

    outcome = train(setup, out, here=here)
    if not here.writer:
        return None
    # the metrics that need the model and data reuse the setup that trained the run
    measured = analysis.of_run(out, cfg, reg, setup_factory=lambda: setup, train_derived=train_derived)
    metrics = analysis.run_metrics(measured, plan.names, plan.options, skipped=plan.skipped,
                                   say=lambda line: print(line, flush=True))
    doc = report.assemble(setup, out, outcome, metrics, started=started, preset_reason=preset_reason,
                          processes=here.size)
    report.write(out, doc, reg)

    final = doc.final
    summary = f"geobench: {outcome.status}"
    if outcome.diverged_at is not None:
        summary += f" at step {outcome.diverged_at} ({outcome.divergence})"
    if outcome.stopped_early_at is not None:
        summary += f", stopped early at step {outcome.stopped_early_at}"
    if final:
        def shown(value: float | None, decimals: int) -> str:  # a NaN read back from evals.jsonl is None
            return "nan" if value is None else f"{value:.{decimals}f}"

        summary += (f"; step {final.step}: val_loss {shown(final.val_loss, 4)}, "
                    f"p_in {shown(final.p_in, 3)}, p_ood {shown(final.p_ood, 3)}")
    print(summary)
    if plan.skipped:
        print("geobench: metrics skipped: " + "; ".join(f"{name} ({why})" for name, why in plan.skipped.items()))
    failed = [name for name, result in metrics.items() if result.status == "failed"]
    if failed:
        print(f"geobench: metrics failed: {', '.join(failed)} (see the report)")
    print(f"geobench: report {out.report_md}")
    not_learned = series.probe_not_learned(doc.evals)
    if not_learned:
        print(f"geobench: warning: {not_learned}; switching, re-entry and basin depth have nothing to measure "
              "(more steps or a higher probe.p_probe help)")
    return doc


def open_analysis(path: str | Path, reg: Registry) -> analysis.Analysis:
    """An analysis of the finished run at `path`: its trained setup is rebuilt from its config when a
    metric needs it, and derived runs train with the trainer."""
    from geobench.train import prepare, train_derived

    return analysis.open_run(path, reg, setup_factory=lambda cfg: prepare(cfg, reg), train_derived=train_derived)
