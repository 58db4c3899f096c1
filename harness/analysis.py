"""How metric plugins see a run: the trajectory view of its checkpoints, the context each metric
receives (built from the needs its plugin declares, `geobench.api.context`), and running a set of
metrics so that one failing metric is recorded as failed while the others still run.

Data flow: the host opens an `Analysis` of a run — its trajectory, its config and, passed in by
the caller (never imported from the trainer), how to rebuild its trained setup and how to train a
derived run — and hands each metric a `Context` that exposes only what the metric declared.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from geobench import config as config_mod
from geobench import formatting, report
from geobench.api import (
    BACKBONE_CHECKPOINTS,
    Batch,
    Config,
    GramView,
    MetricContext,
    MetricPlugin,
    ParameterLayout,
    TrainedSetup,
    TrajectoryView,
    UndeclaredNeed,
    UsageError,
    did_you_mean,
)
from geobench.api.documents import EvalRecord, MetricResult
from geobench.api.params import read_yaml_file
from geobench.checkpoints import CheckpointReader, load_weights
from geobench.device import pick_device
from geobench.documents import MetricOutcome
from geobench.figures import save_figure
from geobench.files import atomic_write_text
from geobench.linalg import PCA, TrajectoryGram, materialize, pca
from geobench.objective import composite_loss, flat_gradient, lambda_at
from geobench.registry import Registry
from geobench.rundir import RunDir
from geobench.schedule import first_scheduled
from geobench.shared_direction import read_manifest, select

if TYPE_CHECKING:
    from geobench.train import Setup


@dataclasses.dataclass
class Backbone:
    """The trajectory PCA of a scope over a window anchored at its first checkpoint.

    `pca` is the row-normalized variant (the published tables'), `pca_raw` the raw one; v_b, the
    backbone, is the first direction of the row-normalized PCA with ⟨Δθ_final, v_b⟩ > 0. Rows
    exclude the anchor itself (its Δ is zero)."""

    gram: TrajectoryGram
    pca: PCA
    pca_raw: PCA

    @property
    def v_b(self) -> np.ndarray:
        return self.pca.directions[0]


class Trajectory:
    """The checkpoints of one run, read parameter by parameter: a geobench run directory's (with its
    model family's `layout`, for the trunk and block scopes) or those a manifest lists (`layout`
    None: only the parameters chosen with --params, scope `all`)."""

    def __init__(self, *, name: str, steps: Sequence[int], open_step: Callable[[int], CheckpointReader],
                 layout: ParameterLayout | None, device: torch.device, chosen: Sequence[str] | None = None):
        self.name, self.device, self.layout = name, device, layout
        self._steps, self._open, self._chosen = sorted(steps), open_step, chosen
        self._grams: dict[tuple, TrajectoryGram] = {}

    @classmethod
    def of_run(cls, run: RunDir, layout: ParameterLayout | None, device: torch.device) -> Trajectory:
        return cls(name=str(run), steps=run.checkpoint_steps(), open_step=lambda s: CheckpointReader(run.checkpoint_path(s)),
                   layout=layout, device=device)

    @classmethod
    def of_manifest(cls, manifest: str | Path, opt: str, pattern: str) -> Trajectory:
        """The checkpoints of optimizer `opt` of a manifest (the energy command's format), restricted
        to the parameters matching `pattern`."""
        runs = read_manifest(manifest)
        if opt not in runs:
            raise UsageError(f"manifest has no optimizer {opt!r}; it lists {', '.join(runs)}")
        readers = {it: CheckpointReader(path) for it, path in runs[opt]}
        first = next(iter(readers.values()))
        names = select(first.names(), pattern)
        if not names:
            raise UsageError(f"--params {pattern!r} matches no parameter of {str(first.path)!r}")
        for reader in readers.values():
            for name in names:
                reader.where(name)  # every checkpoint holds every chosen parameter
        return cls(name=f"{manifest} ({opt})", steps=list(readers), open_step=readers.__getitem__, layout=None,
                   device=pick_device("auto"), chosen=names)

    def checkpoint_steps(self) -> list[int]:
        return list(self._steps)

    def reader(self, step: int) -> CheckpointReader:
        if step not in self._steps:
            raise UsageError(f"run {self.name!r} has no checkpoint at step {step}")
        return self._open(step)

    def load_checkpoint(self, step: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        reader = self.reader(step)
        return {n: reader.get(n) for n in (names or self.parameter_shapes)}

    @functools.cached_property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        if not self._steps:
            raise UsageError(f"run {self.name!r} has no checkpoints")
        reader = self.reader(self._steps[0])
        return {name: reader.shape(name) for name in self._chosen or reader.names()}

    def scope(self, scope: str) -> list[str]:
        """Parameter names of a scope: `trunk`, `all` or `block:I` (docs/science.md#the-model)."""
        names = list(self.parameter_shapes)
        match = re.fullmatch(r"block:(\d+)", scope)
        if self.layout is None and scope != "all":
            raise UsageError(f"scope={scope!r}: a manifest's trajectory has only the parameters chosen with --params "
                             "(scope=all)")
        if scope == "all":
            chosen = names
        elif self.layout is not None and scope == "trunk":
            chosen = self.layout.trunk_names(names)
        elif self.layout is not None and match:
            chosen = self.layout.block_names(names, int(match.group(1)))
        else:
            raise UsageError(f"scope={scope!r} is not one of trunk, all, block:I")
        if not chosen:
            raise UsageError(f"scope={scope!r} matches no parameter of run {self.name!r}")
        return chosen

    def block_indices(self) -> list[int]:
        """The blocks of the run's model (`block:I` scopes); none for a manifest's trajectory."""
        return self.layout.block_indices(list(self.parameter_shapes)) if self.layout is not None else []

    def window(self, window: Sequence[int], minimum: int = 2) -> list[int]:
        steps = self.checkpoint_steps()
        if window:
            if len(window) != 2:
                raise UsageError(f"window={list(window)!r} must be [start, end]")
            steps = [s for s in steps if window[0] <= s <= window[1]]
        if len(steps) < minimum:
            raise UsageError(f"window {list(window) or 'of the whole run'} holds {len(steps)} checkpoints of run "
                             f"{self.name!r}; at least {minimum} are needed")
        return steps

    def gram(self, scope: str, steps: tuple[int, ...], anchor: int) -> TrajectoryGram:
        """Gram matrix of Δ_t = θ_t − θ_anchor over `steps`, streamed from the checkpoints (cached:
        several metrics of one analysis share it)."""
        key = (scope, steps, anchor)
        if key not in self._grams:
            self._grams[key] = TrajectoryGram.build([self.reader(s) for s in steps], steps, self.scope(scope),
                                                    self.reader(anchor), anchor, device=self.device)
        return self._grams[key]

    def backbone(self, scope: str = "trunk", window: Sequence[int] = (), every: int = 0) -> Backbone:
        """The trajectory PCA of `scope` over the checkpoints of `window` (with `every`, only those at
        multiples of `every` steps, plus the window's first and last)."""
        steps = tuple(self.window(window, minimum=BACKBONE_CHECKPOINTS))
        if every:
            steps = tuple(s for i, s in enumerate(steps) if s % every == 0 or i in (0, len(steps) - 1))
        gram = self.gram(scope, steps, steps[0])
        rows = np.eye(len(steps))[1:]
        if not np.diag(gram.gram)[1:].any():
            raise UsageError(f"the weights of scope {scope!r} did not move over steps {steps[0]}..{steps[-1]}")
        return Backbone(gram, pca(gram, rows, normalize_rows=True), pca(gram, rows))

    def spread(self, steps: Sequence[int], count: int, first: int = 0) -> list[int]:
        available = [s for s in self.checkpoint_steps() if s >= first] or self.checkpoint_steps()[-1:]
        if steps:
            missing = [s for s in steps if s not in available]
            if missing:
                raise UsageError(f"run {self.name!r} has no checkpoint at step(s) {missing}; "
                                 f"it has {available[0]}..{available[-1]} ({len(available)} checkpoints)")
            return list(steps)
        picks = np.linspace(len(available) - 1, 0, min(count, len(available))).round().astype(int)
        return [available[i] for i in sorted(set(picks))]

    def materialize(self, gram: GramView, coefficients: np.ndarray) -> dict[str, torch.Tensor]:
        return materialize(gram.names, [self.reader(s) for s in gram.steps], self.reader(gram.anchor), coefficients)


class TrainedModel:
    """The run's model family, data stream and evaluation sets (a `TrainedSetup`): the setup that
    trained the run, or one rebuilt from its config, with the run's checkpoints to load into it."""

    def __init__(self, setup: Setup, trajectory: Trajectory):
        self.trained, self._trajectory = setup, trajectory
        self.device, self.evaluator = setup.device, setup.evaluator

    @property
    def autocast(self):
        return self.trained.autocast

    def model_at(self, step: int) -> torch.nn.Module:
        return load_weights(self.trained.model, self._trajectory.load_checkpoint(step)).eval()

    def batches(self, n: int, first: int = 0) -> Iterator[Batch]:
        stream, after = self.trained.stream, self.trained.cfg.train.steps + 1
        for i in range(n):
            yield Batch(*(x.to(self.device) for x in stream.batch(after + first + i, 0)))

    def batch_gradients(self, step: int, names: Sequence[str], n: int,
                        lam: float | None = None) -> Iterator[torch.Tensor]:
        model = self.model_at(step)
        params = dict(model.named_parameters())
        chosen = [params[name] for name in names]
        lam = lambda_at(self.trained.cfg.train.lambda_schedule, step) if lam is None else lam
        for inputs, targets, mask in self.batches(n):
            with self.autocast:
                logits = model(inputs)
            yield flat_gradient(composite_loss(logits, targets, mask, lam), chosen)

    def flatten(self, tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1).to(self.device, torch.float32) for n in names])


class TrainDerived(Protocol):
    def __call__(self, source: Setup, cfg: Config, weights: dict[str, torch.Tensor], out: RunDir, *,
                 perturb: Callable[[torch.nn.Module], None] | None, baseline: float | None) -> list[EvalRecord]:
        """Train a run of `cfg` from `weights` (on the data of `source`) into `out`, afresh; its
        evaluations, the first (step 0) before any update, a diverged run's ending with a record
        marked `diverged`."""
        ...


@dataclasses.dataclass
class Analysis:
    """What the host knows of one analyzed run. `run` is where results go: a geobench run
    directory, or the output directory of an analysis of a manifest's checkpoints (`config`
    None: no model, data or evaluations). `setup` rebuilds the trained setup (called at most
    once, by the first metric that declared a need of it); `train_derived` trains derived runs."""

    run: RunDir
    trajectory: Trajectory
    config: Config | None
    reg: Registry
    setup_factory: Callable[[], Setup] | None = None
    train_derived: TrainDerived | None = None
    say: Callable[[str], None] | None = None  # progress lines (a derived run takes minutes)

    @functools.cached_property
    def evals(self) -> list[EvalRecord]:
        return self.run.read_evals() if self.config is not None else []

    @functools.cached_property
    def setup(self) -> TrainedModel:
        if self.setup_factory is None:
            raise UsageError("this metric needs the model and data of a geobench run; a manifest's trajectory has "
                             "checkpoints only")
        return TrainedModel(self.setup_factory(), self.trajectory)

    def run_config(self) -> Config:
        if self.config is None:
            raise UsageError(f"{str(self.run)!r} holds a manifest's checkpoints, not a geobench run")
        return self.config

    def baseline_val_loss(self) -> float | None:
        """The run's val_loss before its first update (its step-1 evaluation for a run directory of an
        earlier version): the divergence anchor of the runs derived from it."""
        saved = self.run.read_baseline() or next((e for e in self.evals if e.step == 1), None)
        return saved.val_loss if saved else None

    def retrain(self, *, step: int, name: str, overrides: dict[str, Any],
                perturb: Callable[[torch.nn.Module], None] | None = None) -> list[EvalRecord]:
        if self.config is None or self.train_derived is None:
            raise UsageError("this metric trains from a checkpoint; it needs a geobench run")
        weights = self.trajectory.load_checkpoint(step)
        tree = config_mod.to_dict(self.config)
        tree["metrics"], tree["train"]["resume"] = [], False
        if "optimizer.name" in overrides and overrides["optimizer.name"] != tree["optimizer"]["name"]:
            tree["optimizer"]["params"] = {}
        for key, value in overrides.items():
            config_mod.set_path(tree, key, value)
        cfg = config_mod.build(tree, self.reg)
        started = time.perf_counter()
        if self.say:
            self.say(f"geobench:   derived run {name} (from step {step}, {cfg.train.steps} steps): training")
        evals = self.train_derived(self.setup.trained, cfg, weights, RunDir(self.run.path / "derived" / name),
                                   perturb=perturb, baseline=self.baseline_val_loss())
        if self.say:
            self.say(f"geobench:   derived run {name}: done in {formatting.duration(time.perf_counter() - started)}")
        return evals

    def context(self, plugin: MetricPlugin) -> Context:
        return Context(self, plugin)


# which declared needs open which part of the context
SETUP_NEEDS = ("model", "data", "gradients")


class Context:
    """The `MetricContext` one metric receives: the trajectory and the config always, the rest
    only when its plugin declared the need."""

    def __init__(self, analysis: Analysis, plugin: MetricPlugin):
        self._analysis, self._plugin = analysis, plugin
        self.trajectory, self.config, self.directory = analysis.trajectory, analysis.config, analysis.run.path
        self.captions: dict[str, str] = {}  # figure path → caption, from ctx.figure

    def _declared(self, part: str, needs: tuple[str, ...]) -> None:
        if not set(needs) & set(self._plugin.needs):
            raise UndeclaredNeed(f"metric {self._plugin.name!r} uses {part} but declares needs={self._plugin.needs}; "
                                 f"add {' or '.join(repr(n) for n in needs)} to its needs")

    def run_config(self) -> Config:
        if self.config is None:
            raise UsageError(f"metric {self._plugin.name!r} needs a geobench run; a manifest's trajectory has "
                             "checkpoints only")
        return self.config

    @property
    def evals(self) -> list[EvalRecord]:
        self._declared("the evaluation history (ctx.evals)", ("evals",))
        return self._analysis.evals

    @property
    def setup(self) -> TrainedModel:
        self._declared("the trained model and data (ctx.setup)", SETUP_NEEDS)
        return self._analysis.setup

    @property
    def retrain(self) -> Callable[..., list[EvalRecord]]:
        self._declared("training from a checkpoint (ctx.retrain)", ("training",))
        return self._analysis.retrain

    def figure(self, fig: Any, name: str, *, caption: str = "") -> str:
        path = save_figure(fig, self.directory, name)
        if caption:
            self.captions[path] = caption
        return path

    def write_file(self, name: str, text: str) -> str:
        atomic_write_text(self.directory / name, text)
        return name

    def open_run(self, path: str | Path) -> Trajectory:
        self._declared("another geobench run (ctx.open_run)", ("run",))
        other = RunDir(path)
        if not other.config.exists():
            raise UsageError(f"{str(path)!r} is not a geobench run directory (no config.yaml)")
        return Trajectory.of_run(other, self.trajectory.layout, self.trajectory.device)


def open_run(path: str | Path, reg: Registry, *, setup_factory: Callable[[Config], Setup] | None = None,
             train_derived: TrainDerived | None = None) -> Analysis:
    """An analysis of the geobench run at `path`; `setup_factory(config)` rebuilds its trained setup."""
    run = RunDir(path)
    if not run.config.exists():
        raise UsageError(f"{str(path)!r} is not a geobench run directory (no config.yaml)")
    cfg = config_mod.build(read_yaml_file(run.config, "run configuration"), reg)
    return of_run(run, cfg, reg, setup_factory=(lambda: setup_factory(cfg)) if setup_factory else None,
                  train_derived=train_derived)


def of_run(run: RunDir, cfg: Config, reg: Registry, *, setup_factory: Callable[[], Setup] | None = None,
           train_derived: TrainDerived | None = None) -> Analysis:
    layout = reg.model(cfg.model.family).layout
    return Analysis(run, Trajectory.of_run(run, layout, pick_device(cfg.train.device)), cfg, reg, setup_factory,
                    train_derived)


def of_manifest(manifest: str | Path, opt: str, pattern: str, out: str | Path, reg: Registry) -> Analysis:
    """An analysis of the checkpoints of optimizer `opt` of a manifest; results go to `out`."""
    return Analysis(RunDir(out), Trajectory.of_manifest(manifest, opt, pattern), None, reg)


def metric_options(names: list[str], given: dict[str, str], reg: Registry) -> dict[str, dict]:
    """Validated options per metric from `NAME.option=value` pairs (defaults for the rest)."""
    chosen = {name: reg.metric(name) for name in names}
    options = {name: {k: spec.default for k, spec in plugin.options.items()} for name, plugin in chosen.items()}
    for key, raw in given.items():
        name, _, option = key.partition(".")
        if name not in chosen:
            raise UsageError(f"option {key!r} names metric {name!r}, which is not being computed "
                             f"({', '.join(names) or 'none'})")
        declared = chosen[name].options
        if option not in declared:
            raise UsageError(f"metric {name!r} has no option {option!r}{did_you_mean(option, declared)}; "
                             f"options: {', '.join(declared) or 'none'}")
        options[name][option] = declared[option].check(key, raw)
    return options


def default_metrics(cfg: Config, reg: Registry) -> list[str]:
    """The metrics whose plugins mark them default, then those the optimizer plugin adds."""
    marked = [name for name, plugin in reg.metrics.items() if plugin.default]
    return list(dict.fromkeys([*marked, *reg.optimizer(cfg.optimizer.name).metrics]))


def plan_metrics(cfg: Config, reg: Registry) -> tuple[list[str], dict[str, str]]:
    """The end-of-run metrics of a run of `cfg` and those skipped, with the reason.

    `cfg.metrics` None: the default set (`default_metrics`), less those that cannot apply (skipped).
    A list of names: exactly those, and each must apply (a UsageError names the one that cannot).
    A list of `+NAME` / `-NAME`: the default set with NAME added (it must apply) or removed."""
    def unmet(name: str) -> str | None:
        return reg.unmet_need(name, cfg) or too_short(reg.metric(name), cfg)

    def required(names: list[str]) -> None:
        for name in names:
            reason = unmet(name)
            if reason:
                raise UsageError(f"metric {name!r} cannot apply to this run: {reason}")

    asked = cfg.metrics
    relative = asked is not None and any(str(m).startswith(("+", "-")) for m in asked)
    if asked is not None and not relative:
        required(asked)
        return list(asked), {}
    added, removed = [], set()
    for item in asked or []:
        name = str(item)[1:]
        if not str(item).startswith(("+", "-")):
            raise UsageError(f"metrics={asked!r} mixes names with +NAME/-NAME: list the metrics, or change the "
                             "defaults with +NAME and -NAME only")
        reg.metric(name)  # an unknown name is refused, with did-you-mean
        (added.append(name) if str(item).startswith("+") else removed.add(name))
    required(added)
    defaults = [n for n in default_metrics(cfg, reg) if n not in removed]
    skipped = {name: reason for name in defaults if (reason := unmet(name))}
    chosen = [name for name in defaults if name not in skipped]
    return chosen + [name for name in added if name not in chosen], skipped


def too_short(plugin: MetricPlugin, cfg: Config) -> str | None:
    """Why the schedule of `cfg` leaves `plugin` too few checkpoints or evaluations, or None."""
    t = cfg.train
    for kind, needed, settings in (("checkpoint", plugin.min_checkpoints, f"train.checkpoint_every={t.checkpoint_every}"),
                                   ("eval", plugin.min_evals, f"train.eval_every={t.eval_every}")):
        planned = len(first_scheduled(cfg, kind, needed)) if needed else 0
        if planned < needed:
            what = "checkpoints" if kind == "checkpoint" else "evaluations"
            return (f"it needs at least {needed} {what}, and the schedule writes {planned} "
                    f"(train.steps={t.steps}, {settings}); lower the interval or train longer")
    return None


def run_metrics(analysis: Analysis, names: list[str], options: dict[str, dict] | None = None, *,
                strict: bool = False, skipped: dict[str, str] | None = None,
                say: Callable[[str], None] | None = None) -> dict[str, MetricOutcome]:
    """Compute each metric; a failure is recorded and the others still run. With `strict`, a metric
    that finds the run lacking what it needs (a UsageError) stops everything instead. `skipped`
    metrics (name → reason) are recorded as such. A metric that uses an undeclared part of the
    context fails (a defect of the plugin, found by its conformance test). `say` gets a line as each
    metric starts and ends (the metric phase of a run can take minutes)."""
    reg = analysis.reg
    options = options or metric_options(names, {}, reg)
    results = {name: MetricOutcome(status="skipped", source=reg.metric(name).source, reason=reason)
               for name, reason in (skipped or {}).items()}
    analysis.say = say
    for i, name in enumerate(names, 1):
        if say:
            say(f"geobench: metric {i}/{len(names)} {name}: computing")
        results[name] = compute(analysis, reg.metric(name), options[name], strict=strict)
        if say:
            say(f"geobench: metric {i}/{len(names)} {name}: {results[name].status} in "
                f"{formatting.duration(results[name].seconds or 0.0)}")
    return results


def compute(analysis: Analysis, plugin: MetricPlugin, options: dict[str, Any], *, strict: bool) -> MetricOutcome:
    """One metric's outcome on `analysis`, with the time it took."""
    started = time.perf_counter()

    def failed(error: str, trace: str | None = None) -> MetricOutcome:
        return MetricOutcome(status="failed", source=plugin.source, options=options, error=error, traceback=trace,
                             seconds=round(time.perf_counter() - started, 3))

    try:
        context = analysis.context(plugin)
        output = plugin.compute(ctx=context, options=options)
        if not isinstance(output, MetricResult):
            raise TypeError(f"compute returned {type(output).__name__}, not a geobench.api.MetricResult")
        output = dataclasses.replace(output, captions={**context.captions, **output.captions})
        outcome = MetricOutcome.ok(output, source=plugin.source, options=options, seconds=time.perf_counter() - started)
        problem = report.metric_problem(outcome)
        return failed(f"the metric's result does not fit the report schema: {problem}") if problem else outcome
    except UsageError as exc:
        if strict:
            raise UsageError(f"metric {plugin.name!r}: {exc}") from None
        return failed(f"UsageError: {exc}")
    except Exception as exc:  # one broken metric must not cost the others their results
        return failed(f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5))



def _conforms(trajectory: Trajectory, setup: TrainedModel, context: Context) -> None:
    """The concrete views are the api's protocols (checked by mypy; never called)."""
    views: tuple[TrajectoryView, TrainedSetup, MetricContext] = (trajectory, setup, context)
    del views
