"""Assembling a run (corpus, tokenizer, probe, model, optimizer) and the training loop.

`prepare` does everything that can fail on bad input before a single file of the run is written;
`train` runs the loop of docs/science.md#training-protocol: λ schedule, warmup + cosine (for
optimizers the harness schedules), gradient accumulation, clipping, evals, weights-only
checkpoints, the full training state for resume, and the lifecycle hooks. Its parts: `schedule` (which step does what),
`stepping.Stepper` (one step's gradient and update), `monitor` (losses, divergence, Ctrl-C) and
`RunWriter` below (checkpoints and states on a background thread).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from geobench import config as config_mod
from geobench import distributed, optim
from geobench.api import Batch, Config, OptimizerPlugin, Parameters, TrainingSchedule, UsageError
from geobench.api.documents import EvalRecord
from geobench.checkpoints import load_weights
from geobench.data.batches import Prefetcher, TrainStream, validation_batches
from geobench.data.corpus import Corpus, load_corpus
from geobench.data.probe import ProbeTask, codeword_pool, select_codewords
from geobench.data.tokenizer import TextTokenizer, load_tokenizer, tokenize_stories
from geobench.device import autocast, pick_device
from geobench.documents import RunStatus
from geobench.evaluate import Evaluator
from geobench.files import atomic_write_text
from geobench.monitor import SYNC_EVERY_CUDA, DivergenceMonitor, LossReader, ctrl_c_at_step_end, early_stop_reached
from geobench.objective import lambda_at
from geobench.registry import Registry
from geobench.rundir import BackgroundWriter, RunDir, snapshot
from geobench.schedule import is_boundary, is_checkpoint_step, is_eval_step, is_state_step, lr_factor
from geobench.stepping import Stepper, rule_summary


@dataclasses.dataclass
class Setup:
    """Everything a run needs — data, model, optimizer, evaluator — built and checked before anything
    is written. (A *run* is its directory, `trajectory.RunDir`; this is what trains into it.)"""

    cfg: Config
    device: torch.device
    corpus: Corpus
    tokenizer: TextTokenizer
    probe: ProbeTask
    stream: TrainStream
    evaluator: Evaluator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_plugin: OptimizerPlugin
    reg: Registry

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

    @property
    def parameters(self) -> Parameters:
        """The model's parameters with the roles its family's layout gives them."""
        return self.reg.model(self.cfg.model.family).layout.parameters(self.model)

    def parameter_counts(self) -> dict[str, int]:
        names = dict(self.model.named_parameters())
        trunk = self.reg.model(self.cfg.model.family).layout.trunk_names(list(names))
        return {"total": sum(p.numel() for p in names.values()), "trunk": sum(names[n].numel() for n in trunk)}


def training_schedule(cfg: Config) -> TrainingSchedule:
    t = cfg.train
    return TrainingSchedule(steps=t.steps, warmup=t.warmup, tokens_per_step=t.batch_size * t.grad_accum * cfg.model.context)


def check_trainable(cfg: Config, plugin: OptimizerPlugin, reg: Registry) -> None:
    """What an optimizer plugin declares it needs, against the run: second derivatives need a model
    autograd can differentiate twice, eagerly."""
    if plugin.second_order:
        family = reg.model(cfg.model.family)
        if not family.differentiable:
            raise UsageError(f"optimizer {plugin.name!r} needs second derivatives, and model family {family.name} "
                             "is not differentiable by autograd")
        if cfg.model.compile:
            raise UsageError(f"optimizer {plugin.name!r} needs second derivatives, which torch.compile does not "
                             "provide (double backward); set model.compile=false")


def build_model_and_optimizer(cfg: Config, vocab_size: int, device: torch.device,
                              reg: Registry) -> tuple[torch.nn.Module, torch.optim.Optimizer, OptimizerPlugin]:
    """A freshly initialized model (seeded by train.seed) and a fresh optimizer of cfg's plugin over
    its roled parameters. A harness-scheduled optimizer is first checked to follow the lr it is given."""
    optimizer_plugin = reg.optimizer(cfg.optimizer.name)
    model_plugin = reg.model(cfg.model.family)
    check_trainable(cfg, optimizer_plugin, reg)
    seed_everything(cfg.train.seed)
    model = model_plugin.build(config=cfg.model, vocab_size=vocab_size).to(device)
    hp, schedule = cfg.optimizer.params, training_schedule(cfg)
    if optimizer_plugin.schedule == "harness":
        optim.check_lr_zero_moves_nothing(optimizer_plugin, model, model_plugin.layout.parameters, hp, device, schedule)
    optimizer = optim.build(optimizer_plugin, model_plugin.layout.parameters(model), hp, device, schedule)
    return model, optimizer, optimizer_plugin


def prepare(cfg: Config, reg: Registry) -> Setup:
    device = pick_device(cfg.train.device)
    reg.optimizer(cfg.optimizer.name)  # an unknown name fails before the data loads
    reg.model(cfg.model.family)

    corpus = load_corpus(cfg.data)
    tokenizer = load_tokenizer(cfg.data, corpus, codeword_pool(cfg.probe.n_codewords))
    probe = ProbeTask(cfg.probe, tokenizer, select_codewords(tokenizer, cfg.probe))
    context = cfg.model.context
    val = tokenize_stories(cfg.data, tokenizer, corpus, "val")
    model, optimizer, optimizer_plugin = build_model_and_optimizer(cfg, tokenizer.vocab_size, device, reg)
    evaluator = Evaluator(
        validation_batches(val, context, cfg.train.val_batches, cfg.train.val_batch_size, tokenizer.eos_id),
        probe.eval_set(ood=False, context=context), probe.eval_set(ood=True, context=context),
        cfg.train.val_batch_size, device, autocast(device),
        lm_ood_padding_eos=tokenizer.eos_id if cfg.probe.lm_ood == "source" else None,
    )
    return Setup(cfg, device, corpus, tokenizer, probe, _stream(cfg, tokenizer, corpus, probe), evaluator,
               model, optimizer, optimizer_plugin, reg)


def _stream(cfg: Config, tokenizer: TextTokenizer, corpus: Corpus, probe: ProbeTask) -> TrainStream:
    return TrainStream(tokenize_stories(cfg.data, tokenizer, corpus, "train"), probe, cfg.model.context,
                       cfg.train.batch_size, cfg.train.grad_accum, cfg.probe.p_probe, cfg.train.seed,
                       tokenizer.eos_id)


def derive(setup: Setup, cfg: Config, weights: dict[str, torch.Tensor]) -> Setup:
    """A setup that starts from `weights` with a fresh optimizer and cfg's training settings, on the
    data, tokenizer, probe and evaluation sets of `setup` (cfg must keep its model, data and probe;
    only the probe rate of the training data, `probe.p_probe`, may change)."""
    kept = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, p_probe=setup.cfg.probe.p_probe))
    for section in ("model", "data", "probe"):
        if getattr(kept, section) != getattr(setup.cfg, section):
            raise UsageError(f"a derived run must keep the {section} settings of its source")
    model, optimizer, plugin = build_model_and_optimizer(cfg, setup.tokenizer.vocab_size, setup.device, setup.reg)
    load_weights(model, weights)
    stream = _stream(cfg, setup.tokenizer, setup.corpus, setup.probe)
    return dataclasses.replace(setup, cfg=cfg, stream=stream, model=model, optimizer=optimizer, optimizer_plugin=plugin)




def seconds_per_step(setup: Setup) -> float:
    """Wall seconds of one training step of `setup` on this machine: the second of two steps (the
    first warms the kernels up), taken eagerly on copies of the model and the optimizer, so that
    the run itself is untouched and torch.compile's gains are not counted."""
    model, optimizer = copy.deepcopy((setup.model, setup.optimizer))
    cfg = dataclasses.replace(setup.cfg, model=dataclasses.replace(setup.cfg.model, compile=False))
    stepper = Stepper(cfg=cfg, model=model, optimizer=optimizer, plugin=setup.optimizer_plugin, device=setup.device,
                      autocast=setup.autocast, here=distributed.World())
    batches = [Batch(*(x.to(setup.device) for x in setup.stream.batch(1, m))) for m in range(cfg.train.grad_accum)]
    lam = lambda_at(cfg.train.lambda_schedule, 1)
    for _ in range(2):
        start = time.perf_counter()
        stepper.gradient(batches, lam)
        stepper.update(batches, lam)
    return time.perf_counter() - start


@dataclasses.dataclass
class Progress:
    """The counters a resumed run continues from (saved with the training state): the last step
    whose writes are complete, the training time and tokens so far, and what the next evaluation
    averages (the step losses and gradient-rule reports since the last one)."""

    step: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    since_eval: list[float] = dataclasses.field(default_factory=list)
    rule_reports: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    status: RunStatus
    last_step: int
    diverged_at: int | None
    train_seconds: float
    tokens: int
    resumed_from: int | None
    divergence: str | None = None  # "non-finite loss" or the val_loss criterion that marked it
    stopped_early_at: int | None = None
    compile_seconds: float | None = None  # the first step with torch.compile on, kept out of the throughput
    baseline_val_loss: float | None = None  # the val_loss before the first update: the divergence anchor
    evals: list[EvalRecord] = dataclasses.field(default_factory=list)  # the run's whole history, handed to the report


class RunWriter:
    """Checkpoints and training states of a run, written by one background thread (rank 0 alone
    writes; on other ranks every call does nothing). The lifecycle hook of a checkpoint runs on the
    training thread once its file is in place (`announce`)."""

    def __init__(self, out: RunDir, here: distributed.World, hooks: Any):
        self.out, self.active, self.hooks = out, here.writer, hooks
        self.writer = BackgroundWriter()

    def checkpoint(self, step: int, model: torch.nn.Module) -> None:
        if self.active:
            self.writer.submit(_write_checkpoint, self.out, step, snapshot(dict(model.named_parameters())))

    def state(self, progress: Progress, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.active:
            training = {"optimizer": optimizer.state_dict(), **random_states()}
            meta = dataclasses.asdict(progress)
            self.writer.submit(_write_state, self.out, progress.step, snapshot(dict(model.named_parameters())),
                               snapshot(training), meta)

    def announce(self) -> None:
        for kind, at, path in self.writer.done():
            if kind == "checkpoint":
                self.hooks.geobench_on_checkpoint(run=self.out, step=at, path=path)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.announce()


def _write_checkpoint(out: RunDir, step: int, weights: dict[str, torch.Tensor]) -> tuple[str, int, object]:
    return "checkpoint", step, out.save_checkpoint(step, weights)


def _write_state(out: RunDir, step: int, weights: dict[str, torch.Tensor], training: dict,
                 meta: dict) -> tuple[str, int, object]:
    out.save_state(step, weights, training, meta)
    return "state", step, None


def seed_everything(seed: int) -> None:
    """The global generators a model or an optimizer may draw from: torch's, and numpy's and
    Python's (PSGD Kron decides by numpy's when to rebalance its preconditioner)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def random_states() -> dict[str, Any]:
    """The global random generators an optimizer may draw from (torch's; numpy's and Python's, which
    PSGD Kron uses), as tensors and numbers that a weights-only torch.load reads back."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, python_state, gauss = random.getstate()
    return {"torch_rng": torch.get_rng_state(),
            "numpy_rng": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": pos,
                          "has_gauss": has_gauss, "cached_gaussian": cached},
            "python_rng": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss}}


def set_random_states(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch_rng"])
    if "numpy_rng" in saved:  # a state of an earlier version holds torch's alone
        n = saved["numpy_rng"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        r = saved["python_rng"]
        random.setstate((r["version"], tuple(r["state"].tolist()), r["gauss"]))


def resume(setup: Setup, out: RunDir, here: distributed.World) -> Progress:
    """Where the run continues: from its saved training state (weights, optimizer, RNG, counters)
    when resuming, else from scratch. What a killed run wrote after its last state is removed,
    so that it is redone exactly."""
    t = setup.cfg.train
    progress = Progress()
    if t.resume and out.has_state():
        meta, weights, training = out.load_state()
        load_weights(setup.model, weights)
        setup.optimizer.load_state_dict(training["optimizer"])
        set_random_states(training)
        progress = Progress(**{f.name: meta[f.name] for f in dataclasses.fields(Progress) if f.name in meta})
        problem = None
        if here.writer:
            try:
                check_complete(setup.cfg, out, progress.step)
            except UsageError as exc:
                problem = str(exc)
        problem = distributed.agree(here, problem)  # every rank stops, not only the one that checked
        if problem is not None:
            raise UsageError(problem)
    if t.resume and here.writer:
        out.truncate_evals(progress.step)
        out.drop_checkpoints_after(progress.step)
    distributed.barrier(here)
    return progress


def check_complete(cfg: Config, out: RunDir, step: int) -> None:
    """A state at `step` continues a run only if everything the run wrote up to it is there: the
    evaluation before the first update, and every scheduled checkpoint and evaluation (Θ₀, the
    divergence anchor and the trajectory the metrics read). Otherwise a UsageError says what is missing."""
    checkpoints, evals = set(out.checkpoint_steps()), {record.step for record in out.read_evals()}
    missing = [f"checkpoint {s}" for s in range(1, step + 1) if is_checkpoint_step(s, cfg) and s not in checkpoints]
    missing += [f"evaluation {s}" for s in range(1, step + 1) if is_eval_step(s, cfg) and s not in evals]
    if out.read_baseline() is None and 1 not in evals:
        missing.insert(0, "the evaluation before the first update (baseline.json)")
    if missing:
        raise UsageError(f"cannot resume {str(out)!r}: its training state is at step {step} but "
                         f"{', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''} "
                         "of the steps before it are missing; train it again into a new directory")


def baseline(setup: Setup, out: RunDir, here: distributed.World, progress: Progress) -> float | None:
    """The val_loss of the model before its first update, evaluated (and written to the run
    directory) when the run starts, read back when it resumes; a run directory of an earlier
    version without it falls back to its step-1 evaluation."""
    if progress.step == 0:
        record = distributed.agree(here, here.writer and EvalRecord.of(0, setup.evaluator(setup.model)))
        if here.writer:
            out.save_baseline(record)
        return record.val_loss
    saved = out.read_baseline() or next((e for e in out.read_evals() if e.step == 1), None)
    return saved.val_loss if saved else None


def train(setup: Setup, out: RunDir, *, here: distributed.World = distributed.World(),
          source_baseline: float | None = None) -> Outcome:
    """Train `setup` into the run directory `out`. Under torchrun (`here` active) every rank calls
    this; rank 0 alone evaluates and writes. A run derived from another one's checkpoint passes
    that run's val_loss before its first update as `source_baseline`, the divergence anchor."""
    cfg, model, optimizer, plugin = setup.cfg, setup.model, setup.optimizer, setup.optimizer_plugin
    t, hooks = cfg.train, setup.reg.hooks
    if here.active:
        distributed.check_trainable(plugin)
    progress = resume(setup, out, here)
    resumed_from = progress.step or None
    optim.set_mode(optimizer, train=True)  # a state is saved in eval mode
    model.train()
    monitor = DivergenceMonitor(t.diverge_factor, derived=source_baseline is not None,
                                baseline=source_baseline if source_baseline is not None else baseline(setup, out, here, progress))
    history = out.read_evals() if progress.step else []
    for record in history:  # a resumed run that had already blown up stays marked
        if monitor.observe(record):
            break
    stepper = Stepper(cfg=cfg, model=model, optimizer=optimizer, plugin=plugin, device=setup.device,
                      autocast=setup.autocast, here=here)
    stepper.diagnostics = progress.rule_reports
    writer = RunWriter(out, here, hooks)
    losses = LossReader(SYNC_EVERY_CUDA if setup.device.type == "cuda" else 1)
    micros = here.micro_batches(t.grad_accum)
    on_gpu = setup.device.type == "cuda"  # a CPU gains nothing from a second thread competing for its cores
    prefetch = Prefetcher(setup.stream, progress.step + 1, t.steps, depth=2 * len(micros), pin=on_gpu,
                          threaded=on_gpu, micros=micros)
    stream = iter(prefetch)
    bar = tqdm(total=t.steps, initial=progress.step, desc=out.path.name, unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not here.writer)

    def say(line: str) -> None:  # rank 0 speaks for all
        if here.writer:
            bar.write(line)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context
    status: RunStatus = "completed"
    stopped_early_at, compile_seconds = None, None
    moved_to = progress.step  # the step the weights are at (ahead of progress.step while a step's writes are pending)

    def read_losses() -> tuple[int, float] | None:
        """Hand the step losses read so far to the on_step hook and the evaluation's mean; the first
        non-finite one (step, value) stops the reading (the hook sees it: a watcher learns of the
        divergence at the step that caused it)."""
        for at, value, lr in losses.read():
            if here.writer:
                hooks.geobench_on_step(run=out, step=at, loss=value, lr=lr)
            if not math.isfinite(value):
                return at, value
            progress.since_eval.append(value)
        return None

    held = contextlib.ExitStack()  # under torchrun the ranks keep the default Ctrl-C (they must stop together)
    stop_asked = held.enter_context(ctrl_c_at_step_end()) if not here.active else threading.Event()
    try:
        for step in range(progress.step + 1, t.steps + 1):
            tick = time.perf_counter()
            moved_to = -1  # from here until the update is applied, the weights and optimizer state are in between
            if plugin.schedule == "harness":
                optim.set_lr(optimizer, lr_factor(step, t.warmup, t.steps, t.lr_floor))
            lam = lambda_at(t.lambda_schedule, step)
            batches = [Batch(*(x.to(setup.device, non_blocking=True) for x in next(stream))) for _ in micros]
            stepper.prepare(step=step, batches=batches)
            loss = stepper.gradient(batches, lam)
            losses.add(step, distributed.mean(here, loss), optimizer.param_groups[0]["lr"])
            if losses.due(is_boundary(step, cfg)):
                bad = read_losses()
                if bad is not None:
                    status = "diverged"
                    monitor.non_finite(bad[0])
                    late = f" (read {step - bad[0]} steps later; the weights after step {bad[0] - 1} are not kept)"
                    say(f"geobench: loss is {bad[1]} at step {bad[0]}: the run diverged; stopping"
                              + (late if bad[0] < step else ""))
                    writer.flush()
                    if bad[0] == step and progress.step and progress.step not in out.checkpoint_steps():
                        with optim.eval_mode(optimizer):
                            writer.checkpoint(progress.step, model)  # the last weights that gave a finite loss
                    break
                bar.set_postfix(loss=f"{progress.since_eval[-1]:.3f}",
                                tok_s=f"{progress.tokens / max(progress.train_seconds, 1e-9):,.0f}", refresh=False)
            stepper.update(batches, lam)
            moved_to = step
            if cfg.model.compile and compile_seconds is None:  # compilation happens in the first step
                compile_seconds = time.perf_counter() - tick
            else:
                progress.train_seconds += time.perf_counter() - tick
                progress.tokens += tokens_per_step
            bar.update(1)

            stop = False
            if is_boundary(step, cfg):
                with optim.eval_mode(optimizer):  # evaluations, checkpoints and states hold the eval-mode weights
                    if is_eval_step(step, cfg):
                        record = distributed.agree(here, here.writer and EvalRecord.of(
                            step, setup.evaluator(model), lam=lam, lr=optimizer.param_groups[0]["lr"],
                            train_loss=float(np.mean(progress.since_eval)), tokens=progress.tokens,
                            train_seconds=round(progress.train_seconds, 3),
                            gradient_rule=rule_summary(stepper.diagnostics) if stepper.diagnostics else {}))
                        progress.since_eval.clear()
                        stepper.diagnostics.clear()
                        history.append(record)
                        if here.writer:
                            out.append_eval(record)
                            hooks.geobench_on_eval(run=out, step=step, record=record)
                        if monitor.observe(record):
                            status = "diverged"
                            say(f"geobench: the run diverged at step {step}: {monitor.divergence}"
                                      + ("; stopping" if t.stop_on_diverge else
                                         "; training on (train.stop_on_diverge=false)"))
                            stop = t.stop_on_diverge
                        if t.early_stop and early_stop_reached(history, t.early_stop_p_ood, t.early_stop_evals):
                            stopped_early_at, stop = step, True
                            say(f"geobench: early stop at step {step}: p_ood >= {t.early_stop_p_ood:g} "
                                      f"at {t.early_stop_evals} evaluations in a row")
                    if is_checkpoint_step(step, cfg) or stop:
                        writer.checkpoint(step, model)
                    progress.step = step  # the step's evaluation and checkpoint are in: a state here is complete
                    if is_state_step(step, cfg) or stop:
                        writer.state(progress, model, optimizer)
            else:
                progress.step = step
            writer.announce()
            if stop:
                break
            if stop_asked.is_set():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        status = "interrupted"
        if moved_to == progress.step:  # at the end of a step: the state is consistent
            bad = read_losses()  # the losses not yet read belong to the next evaluation's train_loss
            if bad is not None:
                monitor.non_finite(bad[0])
            with optim.eval_mode(optimizer):
                writer.state(progress, model, optimizer)
            say(f"geobench: interrupted; state saved at step {progress.step}, continue with resume=true")
        else:  # inside a step's evaluation or writes: its evaluation or checkpoint may be missing
            say(f"geobench: interrupted during step {progress.step + 1}; no state saved there (resume=true continues "
                      "from the last saved state)")
    finally:
        held.close()
        prefetch.close()
        writer.close()
        bar.close()
    if monitor.diverged and status == "completed":
        status = "diverged"
    return Outcome(status, progress.step, monitor.diverged_at, progress.train_seconds, progress.tokens, resumed_from,
                   monitor.divergence, stopped_early_at, compile_seconds, monitor.baseline, history)


def train_derived(source: Setup, cfg: Config, weights: dict[str, torch.Tensor], out: RunDir, *,
                  perturb: Callable[[torch.nn.Module], None] | None, baseline: float | None) -> list[EvalRecord]:
    """Train a run of `cfg` from `weights` with a fresh optimizer, on the data of `source`, into the
    derived run directory `out` (emptied first: a derived run always starts afresh); `perturb(model)`
    may change the weights first. Its evaluations, the first (step 0) before any update; a
    diverged run's end with a record marked `diverged`. `baseline` is the source run's val_loss
    before its first update, the divergence anchor."""
    setup = derive(source, cfg, weights)
    if perturb is not None:
        with torch.no_grad():
            perturb(setup.model)
    with out.lock("derived run"):
        out.clear()
        atomic_write_text(out.config, config_mod.save(cfg))
        start = EvalRecord.of(0, setup.evaluator(setup.model))
        out.append_eval(start)
        outcome = train(setup, out, source_baseline=baseline)
    evals = [start, *outcome.evals]
    if outcome.status == "diverged" and outcome.diverged_at is not None:
        evals.append(EvalRecord(step=outcome.diverged_at, diverged=True))
    return evals
