"""The one way metric plugins see a run: the analysis context, and running a set of metrics so
that one failing metric is recorded as failed while the others still run."""

from __future__ import annotations

import dataclasses
import functools
import re
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geobench import config as config_mod
from geobench import report
from geobench.checkpoints import CheckpointReader, load_weights
from geobench.device import pick_device
from geobench.errors import UsageError, did_you_mean
from geobench.linalg import PCA, TrajectoryGram, pca
from geobench.params import Param, read_yaml_file
from geobench.registry import Batch, MetricPlugin, ParameterLayout, Registry
from geobench.schedule import first_scheduled
from geobench.trajectory import LOCK_NAME, RunDir, atomic_write_text

if TYPE_CHECKING:
    from geobench.train import Setup

# the option every metric that works on a parameter scope declares
SCOPE = Param("trunk", "parameters: trunk, all or block:I", pattern=r"trunk|all|block:\d+")


@dataclasses.dataclass
class Backbone:
    """The trajectory PCA of a scope over a window anchored at its first checkpoint.

    `pca` is the row-normalized variant (SPEC's tables), `pca_raw` the raw one; v_b, the backbone, is
    the first direction of the row-normalized PCA with ⟨Δθ_final, v_b⟩ > 0. Rows exclude the anchor
    itself (its Δ is zero)."""

    gram: TrajectoryGram
    pca: PCA
    pca_raw: PCA

    @property
    def v_b(self) -> np.ndarray:
        return self.pca.directions[0]


BACKBONE_CHECKPOINTS = 3  # Θ₀ and two more: a trajectory PCA of fewer has no second direction


@dataclasses.dataclass
class AnalysisContext:
    """A trajectory of checkpoints and what metrics may ask of it. `run` is where results go: a
    geobench run directory, or the output directory of an analysis of checkpoints geobench did not
    write (`external`: iter → checkpoint, from a manifest; `config` is then None: no model, data or
    evaluations)."""

    run: RunDir
    config: config_mod.Config | None
    reg: Registry
    external: dict[int, CheckpointReader] | None = None
    chosen: list[str] | None = None  # for an external trajectory: the parameters it is restricted to
    _grams: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path, reg: Registry) -> AnalysisContext:
        run = RunDir(path)
        if not run.config.exists():
            raise UsageError(f"{str(path)!r} is not a geobench run directory (no config.yaml)")
        return cls(run, config_mod.build(read_yaml_file(run.config, "run configuration"), reg), reg)

    @classmethod
    def of_manifest(cls, manifest, opt: str, pattern: str, out, reg: Registry) -> AnalysisContext:
        """The checkpoints of optimizer `opt` of a manifest (energy's format), restricted to the
        parameters matching `pattern`; results go to the directory `out`."""
        from geobench.energy import read_manifest, select

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
        return cls(RunDir(out), None, reg, readers, names)

    @functools.cached_property
    def evals(self) -> list[dict]:
        return [] if self.external is not None else self.run.read_evals()

    def checkpoint_steps(self) -> list[int]:
        return sorted(self.external) if self.external is not None else self.run.checkpoint_steps()

    def reader(self, step: int) -> CheckpointReader:
        return self.external[step] if self.external is not None else CheckpointReader(self.run.checkpoint_path(step))

    def load_checkpoint(self, step: int, names=None) -> dict[str, torch.Tensor]:
        if self.external is not None:
            reader = self.reader(step)
            return {n: reader.get(n) for n in (names or self.parameter_shapes)}
        return self.run.load_checkpoint(step, names)

    @functools.cached_property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        steps = self.checkpoint_steps()
        if not steps:
            raise UsageError(f"run {str(self.run)!r} has no checkpoints")
        reader = self.reader(steps[0])
        return {name: reader.shape(name) for name in self.chosen or reader.names()}

    def scope(self, scope: str) -> list[str]:
        """Parameter names of a scope: `trunk`, `all` or `block:I` (SPEC §1)."""
        names = list(self.parameter_shapes)
        match = re.fullmatch(r"block:(\d+)", scope)
        if self.external is not None and scope != "all":
            raise UsageError(f"scope={scope!r}: a manifest's trajectory has only the parameters chosen with --params "
                             "(scope=all)")
        if scope == "trunk":
            chosen = self.layout.trunk_names(names)
        elif scope == "all":
            chosen = names
        elif match:
            chosen = self.layout.block_names(names, int(match.group(1)))
        else:
            raise UsageError(f"scope={scope!r} is not one of trunk, all, block:I")
        if not chosen:
            raise UsageError(f"scope={scope!r} matches no parameter of run {str(self.run)!r}")
        return chosen

    @property
    def layout(self) -> ParameterLayout:
        """Where the run's model family keeps its trunk and blocks."""
        return self.reg.model(self.trained.model.family).layout

    def block_indices(self) -> list[int]:
        """The blocks of the run's model (`block:I` scopes)."""
        return self.layout.block_indices(list(self.parameter_shapes))

    def window(self, window: list, minimum: int = 2) -> list[int]:
        """Checkpoint steps inside [start, end] (all of them for an empty window)."""
        steps = self.checkpoint_steps()
        if window:
            if len(window) != 2:
                raise UsageError(f"window={window!r} must be [start, end]")
            steps = [s for s in steps if window[0] <= s <= window[1]]
        if len(steps) < minimum:
            raise UsageError(f"window {window or 'of the whole run'} holds {len(steps)} checkpoints of run "
                             f"{str(self.run)!r}; at least {minimum} are needed")
        return steps

    def gram(self, scope: str, steps: tuple[int, ...], anchor: int) -> TrajectoryGram:
        """Gram matrix of Δ_t = θ_t − θ_anchor over `steps`, streamed from the checkpoints (cached:
        several metrics of one analysis share it)."""
        key = (scope, steps, anchor)
        if key not in self._grams:
            self._grams[key] = TrajectoryGram.build([self.reader(s) for s in steps], steps, self.scope(scope),
                                                    self.reader(anchor), anchor, device=self.device)
        return self._grams[key]

    def backbone(self, scope: str = "trunk", window: tuple = (), every: int = 0) -> Backbone:
        """The trajectory PCA of `scope` over the checkpoints of `window` (with `every`, only those at
        multiples of `every` steps, plus the window's first and last)."""
        steps = tuple(self.window(list(window), minimum=BACKBONE_CHECKPOINTS))
        if every:
            steps = tuple(s for i, s in enumerate(steps) if s % every == 0 or i in (0, len(steps) - 1))
        gram = self.gram(scope, steps, steps[0])
        rows = np.eye(len(steps))[1:]
        if not np.diag(gram.gram)[1:].any():
            raise UsageError(f"the weights of scope {scope!r} did not move over steps {steps[0]}..{steps[-1]}")
        return Backbone(gram, pca(gram, rows, normalize_rows=True), pca(gram, rows))

    def spread(self, steps: list[int], count: int, first: int = 0) -> list[int]:
        """Up to `count` checkpoints at or after step `first` spread evenly over the run, the last
        included; or `steps` checked."""
        available = [s for s in self.checkpoint_steps() if s >= first] or self.checkpoint_steps()[-1:]
        if steps:
            missing = [s for s in steps if s not in available]
            if missing:
                raise UsageError(f"run {str(self.run)!r} has no checkpoint at step(s) {missing}; "
                                 f"it has {available[0]}..{available[-1]} ({len(available)} checkpoints)")
            return list(steps)
        picks = np.linspace(len(available) - 1, 0, min(count, len(available))).round().astype(int)
        return [available[i] for i in sorted(set(picks))]

    def model_at(self, step: int) -> torch.nn.Module:
        """The run's model with the weights of checkpoint `step`, in eval mode."""
        return load_weights(self.live.model, self.load_checkpoint(step)).eval()

    def batches(self, n: int, first: int = 0) -> Iterator[Batch]:
        """`n` training-distribution batches the run never trained on: the data stream continued
        past its last step."""
        stream, device = self.live.stream, self.live.device
        for i in range(n):
            yield Batch(*(x.to(device) for x in stream.batch(self.trained.train.steps + 1 + first + i, 0)))

    def batch_gradients(self, step: int, names: list[str], n: int, lam: float | None = None):
        """Gradients of the composite loss (λ given, or the schedule's at that step) at checkpoint
        `step` for `n` batches (see `batches`), each flattened over the parameters `names`."""
        from geobench.objective import composite_loss, flat_gradient, lambda_at

        model = self.model_at(step)
        params = dict(model.named_parameters())
        chosen = [params[name] for name in names]
        lam = lambda_at(self.trained.train.lambda_schedule, step) if lam is None else lam
        for inputs, targets, mask in self.batches(n):
            with self.live.autocast:
                logits = model(inputs)
            yield flat_gradient(composite_loss(logits, targets, mask, lam), chosen)

    def flatten(self, tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1).to(self.live.device, torch.float32) for n in names])

    def retrain(self, step: int, name: str, overrides: dict, perturb=None) -> list[dict]:
        """Train from checkpoint `step` with a FRESH optimizer under the run's config changed by
        `overrides` (dotted keys, e.g. {"train.steps": 2000, "optimizer.params.lr": 6e-4}), in a run
        directory of its own, `<run>/derived/<name>/`; the source's checkpoints are not touched.
        `perturb(model)` may change the weights first. Returns the evaluations, the first of them
        (step 0) taken before any training."""
        import shutil

        from geobench.train import derive, train

        if step not in self.checkpoint_steps():
            raise UsageError(f"run {str(self.run)!r} has no checkpoint at step {step}")
        tree = config_mod.to_dict(self.trained)
        tree["metrics"], tree["train"]["resume"] = [], False
        if "optimizer.name" in overrides and overrides["optimizer.name"] != tree["optimizer"]["name"]:
            tree["optimizer"]["params"] = {}
        for key, value in overrides.items():
            config_mod.set_path(tree, key, value)
        cfg = config_mod.build(tree, self.reg)
        setup = derive(self.live, cfg, self.load_checkpoint(step))
        if perturb is not None:
            with torch.no_grad():
                perturb(setup.model)
        out = RunDir(self.run.path / "derived" / name)
        with out.lock("derived run"):
            for entry in out.path.iterdir():  # a derived run always starts afresh
                if entry.name != LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            atomic_write_text(out.config, config_mod.save(cfg))
            out.append_eval({"step": 0, **setup.evaluator(setup.model)})
            outcome = train(setup, out, source_baseline=self.baseline_val_loss)
            evals = out.read_evals()
        if outcome.status == "diverged":
            evals.append({"step": outcome.diverged_at, "diverged": True})
        return evals

    @property
    def baseline_val_loss(self) -> float | None:
        """The run's val_loss before its first update (its step-1 evaluation for a run directory of an
        earlier version): the divergence anchor of the runs derived from it."""
        saved = self.run.read_baseline() or next((e for e in self.evals if e["step"] == 1), None)
        return saved.get("val_loss") if saved else None

    def materialize(self, gram: TrajectoryGram, coefficients: np.ndarray) -> dict[str, torch.Tensor]:
        return gram.materialize([self.reader(s) for s in gram.steps], self.reader(gram.anchor), coefficients)

    @property
    def device(self) -> torch.device:
        return pick_device(self.config.train.device if self.config is not None else "auto")

    def p_ood_at(self, steps: list[int]) -> dict[int, float]:
        by_step = {e["step"]: e["p_ood"] for e in self.evals if e.get("p_ood") is not None}
        return {s: by_step[s] for s in steps if s in by_step}

    def figure(self, fig, name: str) -> str:
        """Save a matplotlib figure under figures/ (atomically) and return its path in the run."""
        return report.save_figure(fig, self.run.path, name)

    @functools.cached_property
    def live(self) -> Setup:
        """The run's model, data and evaluator rebuilt from its config (for metrics that need
        gradients or evaluations); load a checkpoint into `live.model` before use."""
        from geobench.train import prepare

        return prepare(self.trained, self.reg)

    @property
    def trained(self) -> config_mod.Config:
        """The config of the geobench run behind the trajectory; a manifest's trajectory has none."""
        if self.config is None:
            raise UsageError("this metric needs the model and data of a geobench run; a manifest's trajectory has "
                             "checkpoints only")
        return self.config


def check_checkpoint_steps(cfg: config_mod.Config, steps, option: str) -> None:
    """For a metric's `check`: every step in `steps` will be a checkpoint of a run of `cfg`."""
    from geobench.schedule import is_checkpoint_step

    for step in steps:
        if not 1 <= step <= cfg.train.steps or not is_checkpoint_step(step, cfg):
            raise UsageError(f"{option}: the run will have no checkpoint at step {step} "
                             f"({cfg.train.steps} steps, a checkpoint every {cfg.train.checkpoint_every})")


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


def plan_metrics(cfg: config_mod.Config, reg: Registry) -> tuple[list[str], dict[str, str]]:
    """The end-of-run metrics of a run of `cfg` and those skipped, with the reason. Metrics named
    in `cfg.metrics` must all apply (a UsageError names the one that cannot); the default set
    (config.DEFAULT_METRICS plus those the optimizer plugin adds) keeps those that apply and
    skips the others."""
    def unmet(name: str) -> str | None:
        return reg.unmet_need(name, cfg) or too_short(reg.metric(name), cfg)

    if cfg.metrics is not None:
        for name in cfg.metrics:
            reason = unmet(name)
            if reason:
                raise UsageError(f"metric {name!r} cannot apply to this run: {reason}")
        return list(cfg.metrics), {}
    defaults = list(dict.fromkeys([*config_mod.DEFAULT_METRICS, *reg.optimizer(cfg.optimizer.name).metrics]))
    skipped = {name: reason for name in defaults if (reason := unmet(name))}
    return [name for name in defaults if name not in skipped], skipped


def too_short(plugin: MetricPlugin, cfg: config_mod.Config) -> str | None:
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


def run_metrics(ctx: AnalysisContext, names: list[str], options: dict[str, dict] | None = None, *,
                strict: bool = False, skipped: dict[str, str] | None = None) -> dict:
    """Compute each metric; a failure is recorded and the others still run. With `strict`, a metric
    that finds the run lacking what it needs (a UsageError) stops everything instead. `skipped`
    metrics (name → reason) are recorded as such."""
    options = options or metric_options(names, {}, ctx.reg)
    results: dict[str, dict[str, Any]] = {name: {"status": "skipped", "source": ctx.reg.metric(name).source, "reason": reason}
               for name, reason in (skipped or {}).items()}
    for name in names:
        plugin = ctx.reg.metric(name)
        try:
            output = plugin.compute(ctx=ctx, options=options[name])
            results[name] = {"status": "ok", "source": plugin.source, "options": options[name], **output}
            problem = report.metric_problem(results[name])
            if problem:
                results[name] = {"status": "failed", "source": plugin.source, "options": options[name],
                                 "error": f"the metric's result does not fit the report schema: {problem}"}
        except UsageError as exc:
            if strict:
                raise UsageError(f"metric {name!r}: {exc}") from None
            results[name] = {"status": "failed", "source": plugin.source, "options": options[name],
                             "error": f"UsageError: {exc}"}
        except Exception as exc:  # one broken metric must not cost the others their results
            results[name] = {"status": "failed", "source": plugin.source, "options": options[name],
                             "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(limit=5)}
    return results
