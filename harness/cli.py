"""The `geobench` command line.

Bad input — an unknown optimizer or key, a value of the wrong type or out of range, a malformed
YAML file, an unreadable data path, a non-empty run directory without resume — is one line on
stderr and exit code 2, before anything of the run is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from geobench import __version__, config, distributed, formatting, report, runner
from geobench import registry as plugin_registry
from geobench.api import Config, Param, UsageError
from geobench.api.documents import from_json
from geobench.documents import MetricOutcome, RunReport, SuiteIndex, TableSpec
from geobench.files import read_json
from geobench.rundir import RunDir, in_use, lock_holder


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="geobench", description="Benchmark harness for optimizer geometry.")
    parser.add_argument("--version", action="version", version=f"geobench {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = commands.add_parser("run", help="train with an optimizer plugin, measure, and write a report")
    run.add_argument("optimizer", nargs="?", help="optimizer plugin name (see `geobench plugins`)")
    run.add_argument("pairs", nargs="*", metavar="key=value",
                     help="config overrides (beta2=0.9 steps=4000) and options of the end-of-run metrics (reheat.lrs=[6e-4])")
    run.add_argument("--config", help="YAML file of overrides (below the command line, above the preset)")
    run.add_argument("--out", help="run directory (default: runs/<name>)")
    run.set_defaults(handler=cmd_run)

    analyze = commands.add_parser("analyze", help="(re)compute metric plugins on a finished run and update its report, "
                                                  "or analyse a manifest's checkpoints")
    analyze.add_argument("run", nargs="?", help="run directory")
    analyze.add_argument("--manifest", help="instead of a run: checkpoints listed in a manifest (the format of "
                                            "`geobench energy`), analysed by the checkpoint-only metrics")
    analyze.add_argument("--opt", help="with --manifest: the optimizer whose checkpoints are analysed")
    analyze.add_argument("--params", default=".", help="with --manifest: regular expression choosing the parameters")
    analyze.add_argument("--out", help="with --manifest: the directory for report.json, report.md and figures")
    analyze.add_argument("--metric", action="append", dest="metrics", metavar="NAME",
                         help="metric to compute (repeatable; default: the run's configured set)")
    analyze.add_argument("pairs", nargs="*", metavar="NAME.option=value", help="metric options, e.g. backbone.scope=all")
    analyze.set_defaults(handler=cmd_analyze)

    bench = commands.add_parser("bench", help="run a benchmark suite (a grid of runs) and write its comparison report")
    bench.add_argument("suite", nargs="?", help="built-in suite name or a suite .yaml file")
    bench.add_argument("pairs", nargs="*", metavar="key=value",
                       help="scale=tiny|short|paper; executor=inline|local|slurm|ray and executor.OPTION=value; "
                            "fail_fast=true; config keys applied to every cell; or the word `status`: each cell's state")
    bench.add_argument("--list", action="store_true", help="list the built-in suites")
    bench.add_argument("--no-wait", action="store_true",
                       help="submit and return (executor=slurm); run the same command again to assemble the comparison")
    bench.add_argument("--out", help="suite directory (default: runs/suites/<suite>-<scale>)")
    bench.set_defaults(handler=cmd_bench)

    compare_ = commands.add_parser("report", help="side-by-side report of finished runs or suites")
    compare_.add_argument("runs", nargs="*", help="run directories and/or suite directories")
    compare_.add_argument("--published", metavar="NAME[,NAME]",
                          help="published series to draw and tabulate beside the runs: mini_gpt-s42, mini_gpt-s271, "
                               "mini_gpt-beta2-0.99 ... -0.0, or the groups mini_gpt, mini_gpt-beta2")
    compare_.add_argument("--label-by", metavar="PARAM",
                          help="name each configuration by this optimizer hyperparameter's value (e.g. beta2; default: "
                               "the suite's table, else the group name)")
    compare_.add_argument("--order-by", metavar="COLUMN", help="rank the configurations by this column (e.g. val_loss)")
    compare_.add_argument("--out", help="directory for comparison.{json,md,html} (default: the suite's, else runs/comparison)")
    compare_.set_defaults(handler=cmd_report)

    energy = commands.add_parser("energy", help="shared-direction energy of Hugging Face style checkpoints")
    energy.add_argument("--manifest", required=True,
                        help='JSON: {"optimizers": {NAME: {"checkpoints": [{"iter": N, "hf_path": DIR}]}}}')
    energy.add_argument("--opt", required=True, help="optimizer(s) of the manifest to measure: NAME, A,B or all")
    energy.add_argument("--theta0", help="θ₀: a directory of per-parameter .npz files, a .safetensors file or an HF "
                                         "checkpoint directory (default: the first checkpoint of --ref)")
    energy.add_argument("--phi-hat", help="φ̂, in the same forms as --theta0 (default: the unit last − first drift of --ref)")
    energy.add_argument("--ref", help="optimizer whose checkpoints give the default θ₀ and φ̂ (default: the first --opt)")
    energy.add_argument("--params", help="regular expression selecting parameter names (default: those of --phi-hat, "
                                         "else all)")
    for flag, default, what in (("--healthy-cos", 0.9, "healthy: cos_eff at least this at every checkpoint"),
                                ("--spike-factor", 10.0, "collapse: a step's energy per iter above this × the median before it"),
                                ("--decline", 0.1, "diffuse: cos_eff falls by at least this"),
                                ("--perp-ratio", 3.0, "diffuse: E_perp at least this × E_phi at the end")):
        energy.add_argument(flag, type=float, default=default, help=f"{what} (default {default:g})")
    energy.add_argument("--out", required=True, help="CSV to write; <stem>.md, <stem>.html and figures/ go beside it")
    energy.set_defaults(handler=cmd_energy)

    plugins = commands.add_parser("plugins", help="list every optimizer, metric and model plugin")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(handler=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    distributed.join_launch()
    return distributed.handled_exit(_main(argv))


def _main(argv: list[str] | None) -> int:
    try:
        args, extra = build_parser().parse_known_args(argv)
        # key=value pairs (and bench's word `status`) may also follow the options (`run adamw --out d steps=5`)
        pairs = [a for a in extra if ("=" in a or a == "status") and not a.startswith("-")]
        unknown = [a for a in extra if a not in pairs]
        if unknown or (pairs and not hasattr(args, "pairs")):
            raise UsageError(f"unrecognized arguments: {' '.join(unknown or pairs)}")
        if pairs:
            args.pairs += pairs
        if getattr(args, "out", None) == "":
            raise UsageError("--out must name a path, not an empty string")
        return args.handler(args)
    except UsageError as exc:
        if distributed.world().writer:  # the processes of a launch fail alike: rank 0 says it once
            print(f"geobench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if distributed.world().writer:
            print("geobench: interrupted", file=sys.stderr)
        return 130


def default_name(cfg: Config, pairs: dict[str, str], optimizer_params) -> str:
    """The optimizer, the hyperparameters given on the command line and the seed if given:
    `adamw-beta2=0.9`, `sgd-lr=1e-2-momentum=0.9-s271`."""
    shown = [f"{k.removeprefix('optimizer.')}={v}" for k, v in pairs.items()
             if k.removeprefix("optimizer.").removeprefix("params.") in optimizer_params]
    seed = [f"s{cfg.train.seed}"] if {"seed", "train.seed"} & set(pairs) else []
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", "-".join([cfg.optimizer.name, *shown, *seed]))


def cmd_run(args: argparse.Namespace) -> int:
    reg = plugin_registry.installed()
    pairs = config.parse_pairs(args.pairs)
    metric_pairs = {key: pairs.pop(key) for key in list(pairs) if key.partition(".")[0] in reg.metrics}
    devices = Param(1, "training processes", low=1).check("devices", pairs.pop("devices", 1))
    has_cuda = torch.cuda.is_available()
    cfg = config.resolve(args.optimizer, pairs, args.config, reg, auto_preset="paper" if has_cuda else "tiny")
    explicit = "preset" in pairs or (args.config and "preset" in config.read_yaml(args.config))
    preset_reason = "as asked" if explicit else ("auto: a CUDA device is present" if has_cuda else "auto: no CUDA device")
    optimizer = reg.optimizer(cfg.optimizer.name)
    out = RunDir(args.out or Path("runs") / (cfg.name or default_name(cfg, pairs, optimizer.params)))
    here = distributed.world()
    if here.active:
        return run_as_rank(cfg, out, reg, preset_reason, here, metric_pairs)
    if devices > 1:
        distributed.check_devices(devices, cfg.train.device)
        distributed.check_trainable(optimizer)
        distributed.World(0, devices).micro_batches(cfg.train.grad_accum)
        runner.check(cfg, out, reg, metric_pairs)
        from geobench.data.corpus import load_corpus

        load_corpus(cfg.data)  # a data source that cannot load is one line here, not one per process
        holder = lock_holder(out.path)
        if holder:
            raise in_use(out.path, holder)
        argv = ["run", cfg.optimizer.name, *[f"{k}={v}" for k, v in {**pairs, **metric_pairs}.items()],
                "--out", str(out)]
        return distributed.launch(argv + (["--config", args.config] if args.config else []), devices)
    with out.lock("run"):
        plan = runner.check(cfg, out, reg, metric_pairs)
        doc = runner.execute(cfg, out, reg, preset_reason, plan)
    assert doc is not None
    return exit_code(doc)


def exit_code(doc: RunReport) -> int:
    """0: the run's report is complete; 1: written, but a metric failed; 130: interrupted (resume it)."""
    if doc.run.status == "interrupted":
        return 130
    return 1 if any(result.status == "failed" for result in doc.metrics.values()) else 0


def run_as_rank(cfg: Config, out: RunDir, reg: plugin_registry.Registry, preset_reason: str,
                here: distributed.World, metric_pairs: dict[str, str]) -> int:
    """One process of a torchrun launch: rank 0 takes the lock and checks, every rank trains."""
    from geobench.device import pick_device

    distributed.start(here, pick_device(cfg.train.device))
    try:
        with contextlib.ExitStack() as held:
            problem, plan = None, runner.MetricPlan([], {})
            if here.writer:
                try:
                    held.enter_context(out.lock(f"run (rank 0 of {here.size} processes)"))
                    plan = runner.check(cfg, out, reg, metric_pairs)
                except UsageError as exc:
                    problem = str(exc)
            problem = distributed.agree(here, problem)
            if problem is not None:
                if here.writer:
                    raise UsageError(problem)
                return 2
            doc = runner.execute(cfg, out, reg, preset_reason, plan, here=here)
    finally:
        distributed.stop()
    return exit_code(doc) if doc is not None else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from geobench.analysis import metric_options, plan_metrics, run_metrics

    reg = plugin_registry.installed()
    if args.run and "=" in args.run and not Path(args.run).exists():  # a NAME.option=value pair, not a run
        args.pairs.insert(0, args.run)
        args.run = None
    if args.manifest:
        return analyze_manifest(args, reg)
    if not args.run:
        raise UsageError("name a run directory, or --manifest M.json --opt NAME --out DIR")
    holder = lock_holder(args.run)
    if holder:
        raise in_use(args.run, holder)
    analysis = runner.open_analysis(args.run, reg)
    run, cfg = analysis.run, analysis.run_config()
    if not run.report_json.exists():
        raise UsageError(f"run {args.run!r} has no report.json (was it killed? finish it with resume=true)")
    previous = run.read_report()
    names, skipped = plan_metrics(dataclasses.replace(cfg, metrics=args.metrics) if args.metrics else cfg, reg)
    if not names:
        raise UsageError(f"name a metric with --metric (available: {', '.join(reg.metrics) or 'none installed'})")
    options = metric_options(names, config.parse_pairs(args.pairs), reg)
    with run.lock("analyze"):
        results = run_metrics(analysis, names, options, strict=True, skipped=skipped, say=print)
        kept = [name for name, result in results.items() if result.status != "ok"
                and name in previous.metrics and previous.metrics[name].status == "ok"]
        previous.metrics.update({name: result for name, result in results.items() if name not in kept})
        report.write(run, previous, reg)
    code = print_results(results, kept)
    print(f"geobench: report {run.report_md}")
    return code


def print_results(results: dict[str, MetricOutcome], kept: Sequence[str] = ()) -> int:
    """One line per metric (its headline scalars, or why it failed or was skipped, and the time it
    took); the exit code: 1 when a metric failed, else 0."""
    for name, result in results.items():
        line = f"geobench: {name}: {result.status}"
        if result.status == "failed":
            line += f" ({result.error})"
        elif result.status == "skipped":
            line += f" ({result.reason})"
        else:
            line += "; " + ", ".join(f"{k} {formatting.number(v)}" for k, v in list(result.scalars.items())[:6])
        if name in kept:
            line += "; the report keeps its earlier result"
        if result.seconds is not None:
            line += f"; {formatting.duration(result.seconds)}"
        print(line)
    return 1 if any(r.status == "failed" for r in results.values()) else 0


def analyze_manifest(args: argparse.Namespace, reg: plugin_registry.Registry) -> int:
    """Checkpoint-only metrics (default: backbone) on a manifest's trajectory, streamed parameter by
    parameter from its shards; a report of the run schema without training sections."""
    from geobench.analysis import metric_options, of_manifest, run_metrics

    if args.run or not args.opt or not args.out:
        raise UsageError("--manifest analyses a manifest's checkpoints: give --opt NAME and --out DIR, and no run")
    names = args.metrics or ["backbone"]
    for name in names:
        reason = reg.unmet_need(name, None)
        if reason:
            raise UsageError(f"metric {name!r} cannot apply to a manifest: {reason}; checkpoint-only metrics: "
                             + ", ".join(n for n in reg.metrics if reg.unmet_need(n, None) is None))
    pairs = config.parse_pairs(args.pairs)
    for name in names:  # a manifest has no model layout: the chosen parameters are the scope
        declared = reg.metric(name).options
        for option, value in (("scope", "all"), ("per_block", "false")):
            if option in declared:
                pairs.setdefault(f"{name}.{option}", value)
    options = metric_options(names, pairs, reg)
    out = RunDir(args.out)
    with out.lock("analyze"):
        if not out.is_empty():
            raise UsageError(f"output directory {args.out!r} exists and is not empty; choose another with --out")
        analysis = of_manifest(args.manifest, args.opt, args.params, args.out, reg)
        started = report.now()
        results = run_metrics(analysis, names, options, strict=True)
        failed = [name for name, result in results.items() if result.status == "failed"]
        if not failed:  # a report with a failed metric would only block the rerun into --out
            doc = report.assemble_trajectory(str(args.manifest), args.opt, args.params,
                                             analysis.trajectory.checkpoint_steps(),
                                             analysis.trajectory.parameter_shapes, results, started)
            report.write(out, doc, reg)
    code = print_results(results)
    print(f"geobench: nothing written to {str(out)!r}: {', '.join(failed)} failed" if failed
          else f"geobench: report {out.report_md}")
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from geobench import executors, suites

    if args.list:
        for name, description in suites.builtin().items():
            print(f"{name:<14} {description}")
        return 0
    if not args.suite:
        raise UsageError("name a suite (see `geobench bench --list`)")
    reg = plugin_registry.installed()
    show_status = "status" in args.pairs
    pairs = config.parse_pairs([p for p in args.pairs if p != "status"])
    has_cuda = torch.cuda.is_available()
    scale = pairs.pop("scale", "paper" if has_cuda else "tiny")
    suite = suites.load(args.suite, scale, pairs, args.out, reg)
    if show_status:
        for label, outcome in suites.states(suite).items():
            print(f"{label:<28} {outcome.state:<11} {outcome.detail}")
        return 0
    print(f"geobench bench: suite {suite.name}, scale {scale}"
          f"{'' if 'scale' in config.parse_pairs(args.pairs) else ' (auto: ' + ('CUDA' if has_cuda else 'no CUDA') + ')'}; "
          f"{len(suite.cells)} cells into {suite.directory}; executor {suite.executor.name}", flush=True)
    if args.no_wait:
        executors.check_no_wait(suite.executor)
    statuses = suites.run(suite, wait=not args.no_wait)
    if args.no_wait:
        print(f"geobench bench: submitted; `geobench bench {args.suite} {' '.join(args.pairs)} status` shows the cells, "
              "the same command without --no-wait assembles the comparison")
        return 0
    failed = {k: v for k, v in statuses.items() if not v.finished}
    metric_failures = [f"{cell.label} ({', '.join(names)})" for cell in suite.cells if cell.label not in failed
                       and cell.out.status() is not None
                       and (names := [n for n, r in cell.out.read_report().metrics.items() if r.status == "failed"])]
    print(f"geobench bench: {len(statuses) - len(failed)} of {len(suite.cells)} cells finished"
          + (f"; not finished: {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else "")
          + (f"; metrics failed in {', '.join(metric_failures)}" if metric_failures else "")
          + f"; report {suite.directory / 'comparison.md'}")
    if any(v.state == "interrupted" for v in statuses.values()):
        return 130
    return 1 if failed or metric_failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    from geobench import comparison, published, suites

    runs: list[comparison.Compared] = []
    references = published.resolve(args.published) if args.published is not None else []
    if not args.runs and not references:
        raise UsageError("name runs or suites to compare, or --published series")
    index = None
    for given in args.runs:
        path = Path(given)
        if (path / "suite.json").exists():
            index = from_json(SuiteIndex, read_json(path / "suite.json", "suite index"), str(path / "suite.json"))
            for cell in index.cells:
                cell_path = path / suites.path_component(cell.directory, f"suite index {str(path / 'suite.json')!r}: cell")
                if RunDir(cell_path).status() is not None:
                    runs.append(comparison.load(cell_path, cell.label))
            references += [r for r in index.references if r not in references]
        elif (path / "report.json").exists():
            runs.append(comparison.load(path))
        else:
            raise UsageError(f"{given!r} is neither a run directory (report.json) nor a suite directory (suite.json)")
    if args.runs and not runs:
        raise UsageError("no finished runs to compare")
    single_suite = index if len(args.runs) == 1 else None  # a suite's own table and published figures apply
    table = dataclasses.replace(single_suite.table if single_suite else TableSpec(),
                                **({"label_by": args.label_by, "heading": args.label_by} if args.label_by else {}),
                                **({"order_by": args.order_by} if args.order_by else {}))
    out = Path(args.out) if args.out else (Path(args.runs[0]) if single_suite else Path("runs") / "comparison")
    title = (f"geobench suite {single_suite.name} ({single_suite.scale})" if single_suite else
             "geobench comparison" if runs else "published reference series")
    reg = plugin_registry.installed()
    doc = comparison.build(runs, title, reg, table, single_suite.published if single_suite else {}, references,
                           single_suite)
    comparison.write(out, doc, runs, reg)
    print(f"geobench: compared {len(runs)} runs" + (f" with {len(references)} published series" if references else "")
          + f"; {out / 'comparison.md'}, {out / 'comparison.html'}")
    return 0


def cmd_energy(args: argparse.Namespace) -> int:
    from geobench.energy_report import Thresholds, write
    from geobench.shared_direction import manifest_energy

    limits = Thresholds(args.healthy_cos, args.spike_factor, args.decline, args.perp_ratio)
    for flag, value in vars(limits).items():
        if not value > 0:
            raise UsageError(f"--{flag.replace('_', '-')}={value:g} must be > 0")
    out = Path(args.out)
    if out.suffix != ".csv":
        raise UsageError(f"--out {args.out!r} must name a .csv file")
    measurement = manifest_energy(args.manifest, args.opt, args.ref, args.params, args.theta0, args.phi_hat,
                                  notice=lambda text: print(f"geobench: notice: {text}", file=sys.stderr))
    reference = args.ref or measurement.opts[0]
    judged = write(measurement, out, limits, {
        "theta0": args.theta0 or f"the first checkpoint of {reference!r}",
        "phi_hat": args.phi_hat or f"the unit drift last − first of {reference!r}"},
        reference=None if args.phi_hat else reference)
    for verdict in judged:
        print(f"geobench: {verdict['opt']}: {verdict['checkpoints']} checkpoints, final cos_eff "
              f"{formatting.number(verdict['cos_eff_final'])}: {verdict['verdict']}"
              + (f" at iter {verdict['spike_iter']}" if verdict["spike_iter"] is not None else ""))
    print(f"geobench: {len(measurement.rows)} rows, {measurement.rows[0]['n_params']} parameter tensors; wrote {out}, "
          f"{out.with_suffix('.md')}, {out.with_suffix('.html')}")
    return 0


def declared(params: Mapping[str, Param]) -> dict[str, dict[str, Any]]:
    """The declarations of a plugin's parameters or options, as `geobench plugins` lists them."""
    return {k: {"default": v.default, "allowed": v.allowed(), "help": v.help} for k, v in params.items()}


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = plugin_registry.installed()
    listing: dict[str, dict[str, Any]] = {
        "optimizers": {name: {"source": p.source, "help": p.help, "unavailable": p.unavailable(),
                              "schedule": p.schedule, "closure": p.closure, "second_order": p.second_order,
                              "requires": list(p.requires),
                              "params": declared(p.params)}
                       for name, p in reg.optimizers.items()},
        "metrics": {name: {"source": p.source, "help": p.help, "needs": list(p.needs), "default": p.default,
                           "options": declared(p.options)}
                    for name, p in reg.metrics.items()},
        "models": {name: {"source": p.source, "help": p.help, "differentiable": p.differentiable,
                          "params": declared(p.params)}
                   for name, p in reg.models.items()},
    }
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for kind, plugins in listing.items():
        print(f"{kind}:")
        if not plugins:
            print("  (none installed)")
        for name, info in plugins.items():
            print(f"  {name:<12} {info['help']}  [{info['source']}]")
            if info.get("unavailable"):
                print(f"      UNAVAILABLE: {info['unavailable']}")
            drives = [what for flag, what in (("closure", "a closure"), ("second_order", "second derivatives"))
                      if info.get(flag)] + (["its own schedule"] if info.get("schedule") == "self" else [])
            if drives:
                print(f"      its step takes {', '.join(drives)}")
            if info.get("default"):
                print("      in the default metric set (metrics=[-NAME] leaves it out)")
            for key, spec in {**info.get("params", {}), **info.get("options", {})}.items():
                print(f"      {key} = {spec['default']!r}  ({spec['allowed']})  {spec['help']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
