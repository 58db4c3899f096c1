"""Assembling a run (corpus, tokenizer, probe, model, optimizer) and the training loop.

`prepare` does everything that can fail on bad input before a single file of the run is written;
`train` runs SPEC §3's loop: λ schedule, warmup + cosine, gradient accumulation, clipping, evals,
weights-only checkpoints, the full training state for resume, and the lifecycle hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from geobench import distributed
from geobench.checkpoints import load_weights
from geobench.config import Config, checkpoint_windows
from geobench.data.batches import Prefetcher, TrainStream, validation_batches
from geobench.data.corpus import Corpus, load_corpus
from geobench.data.probe import ProbeTask, codeword_pool, select_codewords
from geobench.data.tokenizer import TextTokenizer, load_tokenizer, tokenize_stories
from geobench.device import autocast, pick_device
from geobench.errors import UsageError
from geobench.evaluate import Evaluator
from geobench.objective import composite_loss, has_head, head_composite_loss, lambda_at
from geobench.registry import Batch, OptimizerPlugin, Registry
from geobench.trajectory import BackgroundWriter, RunDir, snapshot


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

    def parameter_counts(self) -> dict[str, int]:
        names = dict(self.model.named_parameters())
        trunk = self.reg.model(self.cfg.model.family).layout.trunk_names(list(names))
        return {"total": sum(p.numel() for p in names.values()), "trunk": sum(names[n].numel() for n in trunk)}


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The two parameter groups every optimizer receives: matrices and embeddings with
    `weight_decay`, LayerNorm weights and biases (every parameter of fewer than 2 dimensions)
    without."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay, "decay": True},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "decay": False}]


def build_model_and_optimizer(cfg: Config, vocab_size: int, device: torch.device,
                              reg: Registry) -> tuple[torch.nn.Module, torch.optim.Optimizer, OptimizerPlugin]:
    """A freshly initialized model (seeded by train.seed) and a fresh optimizer of cfg's plugin."""
    optimizer_plugin = reg.optimizer(cfg.optimizer.name)
    model_plugin = reg.model(cfg.model.family)
    torch.manual_seed(cfg.train.seed)
    model = model_plugin.build(config=cfg.model, vocab_size=vocab_size).to(device)
    hp = cfg.optimizer.params
    wd = float(hp[optimizer_plugin.weight_decay]) if optimizer_plugin.weight_decay else 0.0
    optimizer = optimizer_plugin.build(groups=decay_groups(model, wd), hp=hp, device=device)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    return model, optimizer, optimizer_plugin


def prepare(cfg: Config, reg: Registry) -> Setup:
    device = pick_device(cfg.train.device)
    reg.optimizer(cfg.optimizer.name)  # an unknown name fails before the data loads
    reg.model(cfg.model.family)

    corpus = load_corpus(cfg.data)
    tokenizer = load_tokenizer(cfg.data, corpus, codeword_pool(cfg.probe.n_codewords))
    probe = ProbeTask(cfg.probe, tokenizer, select_codewords(tokenizer, cfg.probe.n_codewords, cfg.probe.codeword_seed))
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
    data, tokenizer, probe and evaluation sets of `setup` (cfg must keep its model, data and probe)."""
    for section in ("model", "data", "probe"):
        if getattr(cfg, section) != getattr(setup.cfg, section):
            raise UsageError(f"a derived run must keep the {section} settings of its source")
    model, optimizer, plugin = build_model_and_optimizer(cfg, setup.tokenizer.vocab_size, setup.device, setup.reg)
    load_weights(model, weights)
    stream = _stream(cfg, setup.tokenizer, setup.corpus, setup.probe)
    return dataclasses.replace(setup, cfg=cfg, stream=stream, model=model, optimizer=optimizer, optimizer_plugin=plugin)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """SPEC §3: linear warmup to 1 over `warmup` steps, then a cosine from 1 toward 0 over the
    remaining steps, CLAMPED at `floor` (flat from the step where the cosine reaches it, ≈ 83% of the
    decay for a floor of 0.1) — not an interpolation that lands on the floor at the last step."""
    if step <= warmup:
        return step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return max(0.5 * (1 + math.cos(math.pi * min(progress, 1.0))), floor)


def is_checkpoint_step(step: int, cfg: Config) -> bool:
    t = cfg.train
    in_window = any(start <= step <= end and (step - start) % every == 0
                    for start, end, every in checkpoint_windows(t.checkpoint_window))
    return step == 1 or step % t.checkpoint_every == 0 or step == t.steps or in_window


SYNC_EVERY_CUDA = 8  # on CUDA the host reads the step losses this often (and at every eval, checkpoint, state save)


class LossReader:
    """Step losses kept on the device and read by the host in batches, so that a GPU step need not
    wait for the host: every step on a CPU; on CUDA every `SYNC_EVERY_CUDA` steps and at every
    boundary (evaluation, checkpoint, state save). A non-finite loss is therefore found at most
    `every − 1` steps after the step that produced it, and that step is recorded exactly."""

    def __init__(self, every: int):
        self.every = every
        self.pending: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss.detach().reshape(()), lr))

    def due(self, boundary: bool) -> bool:
        return boundary or len(self.pending) >= self.every

    def read(self) -> list[tuple[int, float, float]]:
        values = torch.stack([loss for _, loss, _ in self.pending]).tolist()  # the one host sync
        read = [(step, value, lr) for (step, _, lr), value in zip(self.pending, values)]
        self.pending = []
        return read


def blew_up(record: dict, first_val_loss: float | None, factor: float) -> bool:
    """The declared divergence criterion for finite losses: the evaluated val_loss exceeds
    `factor` × the step-1 val_loss (an LM that is worse than after its first update has lost all it
    learned; the paper's β₂ = 0 run read 1.5e3 at step 200 against 10.8 at step 1)."""
    value = record.get("val_loss")
    if factor <= 0 or first_val_loss is None or value is None:
        return False
    return not math.isfinite(value) or (record["step"] > 1 and value > factor * first_val_loss)


def early_stop_reached(evals: list[dict], threshold: float, count: int) -> bool:
    """The source's early stop: p_ood >= threshold at the last `count` evaluations in a row."""
    recent = [e.get("p_ood") for e in evals[-count:]]
    return len(recent) == count and all(p is not None and p >= threshold for p in recent)


@dataclasses.dataclass
class Outcome:
    status: str  # completed | diverged | interrupted
    last_step: int
    diverged_at: int | None
    train_seconds: float
    tokens: int
    resumed_from: int | None
    divergence: str | None = None  # "non-finite loss" or the val_loss criterion that marked it
    stopped_early_at: int | None = None
    compile_seconds: float | None = None  # the first step with torch.compile on, kept out of the throughput


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


class HiddenStates(torch.nn.Module):
    """A model's forward up to its output head, as a module (what DDP wraps on the head path)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(inputs)


def train(setup: Setup, out: RunDir, *, here: distributed.World = distributed.World(),
          source_val_loss: float | None = None) -> Outcome:
    """Train `setup` into the run directory `out`. Under torchrun (`here` active) every rank calls this; rank 0 alone
    evaluates and writes. A run derived from another one's checkpoint passes that run's step-1
    val_loss as `source_val_loss`: the divergence criterion compares against it, not against the
    derived run's own (already trained) first evaluation."""
    cfg, model, optimizer, hooks = setup.cfg, setup.model, setup.optimizer, setup.reg.hooks
    t = cfg.train
    if here.active:
        distributed.check_trainable(cfg.optimizer.name, setup.optimizer_plugin.gradient)
    micros = here.micro_batches(t.grad_accum)
    start, elapsed, tokens, resumed_from = 0, 0.0, 0, None
    if t.resume and out.has_state():
        meta, weights, training = out.load_state()
        load_weights(model, weights)
        optimizer.load_state_dict(training["optimizer"])
        torch.set_rng_state(training["torch_rng"])
        start, elapsed, tokens, resumed_from = meta["step"], meta["train_seconds"], meta["tokens"], meta["step"]
    if t.resume and here.writer:  # what a killed run wrote after its last state (all, when it saved none) is redone
        out.truncate_evals(start)
        out.drop_checkpoints_after(start)
    distributed.barrier(here)

    headed: Any = model if has_head(model, t.batch_size * cfg.model.context) else None  # no full logits held
    body: torch.nn.Module = HiddenStates(headed) if headed is not None else model
    ddp = distributed.wrap(here, body, setup.device)
    forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(ddp) if cfg.model.compile else ddp
    rule = setup.optimizer_plugin.gradient
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context
    status, diverged_at, divergence, stopped_early_at, done = "completed", None, None, None, start
    compile_seconds: float | None = None
    since_eval: list[float] = []
    rule_reports: list[dict] = []  # what the gradient rule reported for each micro-batch since the last eval
    losses = LossReader(SYNC_EVERY_CUDA if setup.device.type == "cuda" else 1)
    history = out.read_evals() if start else []
    first_val_loss = source_val_loss or next((e["val_loss"] for e in history if e["step"] == 1), None)
    for record in history:  # a resumed run that had already blown up stays marked
        if blew_up(record, first_val_loss, t.diverge_factor):
            status, diverged_at, divergence = "diverged", record["step"], _criterion(
                record, first_val_loss, t.diverge_factor, derived=source_val_loss is not None)
            break

    writer = BackgroundWriter()

    def save_state(at: int) -> None:
        if not here.writer:
            return
        training = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        writer.submit(_write_state, out, at, snapshot(_parameters(model)), snapshot(training),
                      {"train_seconds": elapsed, "tokens": tokens})

    def save_checkpoint(at: int) -> None:
        if here.writer:
            writer.submit(_write_checkpoint, out, at, snapshot(_parameters(model)))

    def announce_checkpoints() -> None:  # lifecycle hooks run on this thread, once a file is in place
        for kind, at, path in writer.done():
            if kind == "checkpoint":
                hooks.geobench_on_checkpoint(run=out, step=at, path=path)

    bar = tqdm(total=t.steps, initial=start, desc=out.path.name, unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not here.writer)
    model.train()
    on_gpu = setup.device.type == "cuda"  # a CPU gains nothing from a second thread competing for its cores
    prefetch = Prefetcher(setup.stream, start + 1, t.steps, depth=2 * len(micros), pin=on_gpu, threaded=on_gpu,
                          micros=micros)
    batches = iter(prefetch)
    held = contextlib.ExitStack()  # under torchrun the ranks keep the default Ctrl-C (they must stop together)
    stop_asked = held.enter_context(_ctrl_c_at_step_end()) if not here.active else threading.Event()
    try:
        for step in range(start + 1, t.steps + 1):
            tick = time.perf_counter()
            factor = lr_factor(step, t.warmup, t.steps, t.lr_floor)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            lam = lambda_at(t.lambda_schedule, step)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=setup.device)
            for i in range(len(micros)):
                inputs, targets, mask = (x.to(setup.device, non_blocking=True) for x in next(batches))
                if rule is not None:  # the optimizer plugin brings its own gradient (EP)
                    info = rule(model=model, optimizer=optimizer, batch=Batch(inputs, targets, mask), lam=lam,
                                hp=cfg.optimizer.params, scale=1 / t.grad_accum)
                    loss_sum += info["loss"] / t.grad_accum
                    rule_reports.append(info)
                    continue
                # DDP averages over the ranks; each rank averages its own share of the micro-batches
                with _no_sync(ddp, last=i == len(micros) - 1):
                    with setup.autocast:
                        features = forward(inputs)
                        loss = (head_composite_loss(features, headed.output_weight, targets, mask, lam)
                                if headed is not None else composite_loss(features, targets, mask, lam)) / len(micros)
                    loss.backward()
                loss_sum += loss.detach()
            losses.add(step, distributed.mean(here, loss_sum), optimizer.param_groups[0]["lr"])
            boundary = step == 1 or step % t.eval_every == 0 or step % t.state_every == 0 or is_checkpoint_step(step, cfg)
            if losses.due(boundary):
                bad = None
                for at, value, lr in losses.read():
                    if not math.isfinite(value):
                        bad = (at, value)
                        break
                    since_eval.append(value)
                    if here.writer:
                        hooks.geobench_on_step(run=out, step=at, loss=value, lr=lr)
                if bad is not None:
                    status, diverged_at, divergence = "diverged", bad[0], "non-finite loss"
                    late = f" (read {step - bad[0]} steps later; the weights after step {bad[0] - 1} are not kept)"
                    bar.write(f"geobench: loss is {bad[1]} at step {bad[0]}: the run diverged; stopping"
                              + (late if bad[0] < step else ""))
                    writer.flush()
                    if bad[0] == step and done and done not in out.checkpoint_steps():
                        save_checkpoint(done)  # the last weights that gave a finite loss
                    break
                bar.set_postfix(loss=f"{since_eval[-1]:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}", refresh=False)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            done = step
            if cfg.model.compile and compile_seconds is None:  # compilation happens in the first step
                compile_seconds = time.perf_counter() - tick
            else:
                elapsed += time.perf_counter() - tick
                tokens += tokens_per_step
            bar.update(1)

            stop = False
            if step == 1 or step % t.eval_every == 0 or step == t.steps:
                record = distributed.agree(here, here.writer and {
                    "step": step, "lambda": lam, "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": float(np.mean(since_eval)), **setup.evaluator(model),
                    **({"gradient_rule": rule_summary(rule_reports)} if rule_reports else {}),
                    "tokens": tokens, "train_seconds": round(elapsed, 3)})
                since_eval, rule_reports = [], []
                history.append(record)
                if here.writer:
                    out.append_eval(record)
                    hooks.geobench_on_eval(run=out, step=step, record=record)
                if step == 1 and source_val_loss is None:
                    first_val_loss = record["val_loss"]
                if diverged_at is None and blew_up(record, first_val_loss, t.diverge_factor):
                    status, diverged_at = "diverged", step
                    divergence = _criterion(record, first_val_loss, t.diverge_factor, derived=source_val_loss is not None)
                    bar.write(f"geobench: the run diverged at step {step}: {divergence}"
                              + ("; stopping" if t.stop_on_diverge else "; training on (train.stop_on_diverge=false)"))
                    stop = t.stop_on_diverge
                if t.early_stop and early_stop_reached(history, t.early_stop_p_ood, t.early_stop_evals):
                    stopped_early_at, stop = step, True
                    bar.write(f"geobench: early stop at step {step}: p_ood >= {t.early_stop_p_ood:g} "
                              f"at {t.early_stop_evals} evaluations in a row")
            if is_checkpoint_step(step, cfg) or stop:
                save_checkpoint(step)
            if step % t.state_every == 0 or step == t.steps or stop:
                save_state(step)
            announce_checkpoints()
            if stop:
                break
            if stop_asked.is_set():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        status = "interrupted"
        save_state(done)
        bar.write(f"geobench: interrupted; state saved at step {done}, continue with resume=true")
    finally:
        held.close()
        prefetch.close()
        writer.close()
        announce_checkpoints()
        bar.close()
    return Outcome(status, done, diverged_at, elapsed, tokens, resumed_from, divergence, stopped_early_at,
                   compile_seconds)


def rule_summary(reports: list[dict]) -> dict[str, float | int | None]:
    """A gradient rule's diagnostics over an evaluation interval: for each flag it reported, how
    many micro-batches raised it (`skipped`: 3); for each number, its mean over the finite values."""
    summary: dict[str, float | int | None] = {"batches": len(reports)}
    for key in dict.fromkeys(k for info in reports for k in info if k != "loss"):
        values = [info[key] for info in reports if key in info]
        if all(isinstance(v, bool) for v in values):
            summary[key] = sum(values)
        elif all(isinstance(v, (int, float)) for v in values):
            finite = [float(v) for v in values if math.isfinite(v)]
            summary[key] = float(np.mean(finite)) if finite else None
    return summary


@contextlib.contextmanager
def _ctrl_c_at_step_end() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) while training sets an event that the loop reads at the end of a step, where
    the weights, the optimizer and the writer thread are consistent; a second Ctrl-C interrupts at
    once. An interrupt raised anywhere in a step could land inside a half-applied optimizer update
    or a queue operation shared with the writer thread."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def ask(signum: int, frame: Any) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def _no_sync(ddp: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce waits for the last micro-batch of a step."""
    no_sync = getattr(ddp, "no_sync", None)
    return no_sync() if no_sync is not None and not last else contextlib.nullcontext()


def _write_checkpoint(out: RunDir, step: int, weights: dict[str, torch.Tensor]) -> tuple[str, int, object]:
    return "checkpoint", step, out.save_checkpoint(step, weights)


def _write_state(out: RunDir, step: int, weights: dict[str, torch.Tensor], training: dict,
                 meta: dict) -> tuple[str, int, object]:
    out.save_state(step, weights, training, meta)
    return "state", step, None


def _criterion(record: dict, first_val_loss: float | None, factor: float, *, derived: bool) -> str:
    return (f"val_loss {record['val_loss']:.4g} > {factor:g} × the step-1 val_loss {first_val_loss:.4g}"
            f"{' of the source run' if derived else ''} (train.diverge_factor)")
