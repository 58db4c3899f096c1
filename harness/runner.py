"""One run from a resolved config to its report: the checks that must pass before anything is
written, then training, the end-of-run metrics and the report. `geobench run` and the benchmark
suites both go through here."""

from __future__ import annotations

import yaml

from geobench import config, distributed, report, series
from geobench import registry as plugin_registry
from geobench.errors import UsageError
from geobench.trajectory import RunDir, atomic_write_json, atomic_write_text


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "train.resume":
            keys.append(f"{prefix}{key}")
    return keys


def check(cfg: config.Config, out: RunDir, reg: plugin_registry.Registry, metric_pairs: dict | None = None) -> dict:
    """Everything about the config and the run directory that must hold before a file is written;
    returns the validated options of the end-of-run metrics (`metric_pairs`: {"NAME.option": value})."""
    from geobench.analysis import metric_options

    options = metric_options(cfg.metrics, metric_pairs or {}, reg)
    for name in cfg.metrics:
        plugin = plugin_registry.get_metric(name, reg)
        if plugin.check is not None:
            plugin.check(cfg, options[name])
    if out.path.exists() and not out.path.is_dir():
        raise UsageError(f"run directory {str(out)!r} is a file")
    if out.is_empty():
        return options
    if not cfg.train.resume:
        raise UsageError(f"run directory {str(out)!r} exists and is not empty; "
                         "continue it with resume=true or choose another with --out")
    if out.config.exists():
        changed = _differences(yaml.safe_load(out.config.read_text()), config.to_dict(cfg))
        if changed:
            raise UsageError(f"resume=true but the config differs from {str(out.config)!r} in: {', '.join(changed)}")
    return options


def execute(cfg: config.Config, out: RunDir, reg: plugin_registry.Registry, preset_reason: str,
            metric_options: dict | None = None, *, here: distributed.World = distributed.World()) -> dict | None:
    """Train, measure and report; returns the report. Prints what ran, as the command line shows it.
    `metric_options` are the validated options `check` returned (defaults when None). Under torchrun
    every rank trains and rank 0 alone writes, measures and reports (the others return None)."""
    from geobench.analysis import AnalysisContext, run_metrics
    from geobench.train import pick_device, prepare, train

    say = print if here.writer else (lambda *args, **kwargs: None)
    processes = f"; {here.size} processes (DistributedDataParallel)" if here.active else ""
    say(f"geobench: preset {cfg.preset} ({preset_reason}); device {pick_device(cfg.train.device)}{processes}; "
        f"optimizer {cfg.optimizer.name} {cfg.optimizer.params}; {cfg.train.steps} steps"
        f"{'; torch.compile on' if cfg.model.compile else ''}", flush=True)
    started = report.now()
    run = prepare(cfg, reg)
    counts = run.parameter_counts()
    say(f"geobench: corpus {run.corpus.description}", flush=True)
    say(f"geobench: tokenizer {run.tokenizer.summary()['description']} (vocab {run.tokenizer.vocab_size}); "
        f"model {counts['total']:,} parameters (trunk {counts['trunk']:,})", flush=True)
    say(f"geobench: run directory {out}", flush=True)

    if here.writer:
        out.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.config, config.save(cfg))
        atomic_write_text(out.path / "tokenizer.json", run.tokenizer.tokenizer.to_str())
        atomic_write_json(out.path / "codewords.json", run.probe.codewords)

    outcome = train(run, out, reg.manager.hook, here=here)
    if not here.writer:
        return None
    metrics = {}
    if cfg.metrics:
        ctx = AnalysisContext(out, cfg)
        ctx.live = run  # the metrics that need the model and data reuse this run's
        metrics = run_metrics(ctx, cfg.metrics, reg, metric_options)
    doc = report.assemble(run, out, outcome, metrics, started=started, preset_reason=preset_reason,
                          processes=here.size)
    report.write(out, doc, reg.manager.hook)

    final = doc["final"]
    summary = f"geobench: {outcome.status}"
    if outcome.diverged_at is not None:
        summary += f" at step {outcome.diverged_at} ({outcome.divergence})"
    if outcome.stopped_early_at is not None:
        summary += f", stopped early at step {outcome.stopped_early_at}"
    if final:
        summary += (f"; step {final['step']}: val_loss {final['val_loss']:.4f}, "
                    f"p_in {final['p_in']:.3f}, p_ood {final['p_ood']:.3f}")
    print(summary)
    failed = [name for name, result in metrics.items() if result["status"] == "failed"]
    if failed:
        print(f"geobench: metrics failed: {', '.join(failed)} (see the report)")
    print(f"geobench: report {out.report_md}")
    not_learned = series.probe_not_learned(doc["evals"])
    if not_learned:
        print(f"geobench: warning: {not_learned}; switching, re-entry and basin depth have nothing to measure "
              "(more steps or a higher probe.p_probe help)")
    return doc
