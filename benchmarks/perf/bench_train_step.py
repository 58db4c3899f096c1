"""Harness training step vs a minimal plain-PyTorch loop, side by side in one process.

    python benchmarks/perf/bench_train_step.py --preset tiny --steps 60
    python benchmarks/perf/bench_train_step.py --preset paper --steps 200 --data path/to/TinyStories

The harness side is `geobench.train.train` with everything it does on every step — the data stream
with probe injection, the λ and lr schedules, clipping, hooks, the progress bar, weights-only
checkpoints and training-state saves at the preset's cadence — minus the time spent in evaluation
(evaluation is protocol, not overhead). The plain side is the loop a research script would write:
the same model and optimizer, random token batches of the same shape, plain cross-entropy,
clipping, step. Both run `--repeats` times, alternating; the best of each is compared.
Prints tokens/s of each, their ratio (goal: harness >= 0.97x plain), peak memory and, on a GPU,
MFU against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from geobench import config
from geobench.registry import get_optimizer, registry
from geobench.train import Run, prepare, train
from geobench.trajectory import RunDir

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_run(args) -> Run:
    pairs = {"preset": args.preset, "steps": str(args.steps), "data": args.data, "compile": str(args.compile).lower()}
    cfg = config.resolve("adamw", pairs, None, lambda n: get_optimizer(n), args.preset)
    run = prepare(cfg)
    if args.vocab and args.vocab != run.tokenizer.vocab_size:  # throughput at the paper's vocabulary
        reg = registry()
        torch.manual_seed(cfg.train.seed)
        run.model = reg.models[cfg.model.family].build(cfg.model, args.vocab).to(run.device)
        groups = [{"params": [p for p in run.model.parameters() if p.ndim >= 2], "decay": True},
                  {"params": [p for p in run.model.parameters() if p.ndim < 2], "decay": False}]
        run.optimizer = get_optimizer("adamw").build(groups, cfg.optimizer.params, run.device)
        for group in run.optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return run


def time_harness(run: Run) -> float:
    """Seconds of `train()` outside evaluation."""
    spent_in_eval = 0.0
    evaluate = run.evaluator

    def timed_eval(model):
        nonlocal spent_in_eval
        start = time.perf_counter()
        result = evaluate(model)
        spent_in_eval += time.perf_counter() - start
        return result

    run.evaluator = timed_eval  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(run, RunDir(tmp), registry().manager.hook)
        _sync(run.device)
        total = time.perf_counter() - start
    run.evaluator = evaluate
    return total - spent_in_eval


def time_plain(run: Run, steps: int) -> float:
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    vocab = model.wte.weight.shape[0]
    forward = torch.compile(model) if cfg.model.compile else model
    shape = (cfg.train.batch_size, cfg.model.context + 1)
    _sync(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.train.grad_accum):
            tokens = torch.randint(0, vocab, shape, device=run.device)
            with run.autocast:
                logits = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) / cfg.train.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    _sync(run.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(run: Run) -> float:
    """6 × (parameters used in matmuls) + attention scores and values (12 · layers · d · context)."""
    m = run.cfg.model
    n = sum(p.numel() for name, p in run.model.named_parameters() if name != "wpe.weight")
    return 6 * n + 12 * m.n_layer * m.d_model * m.context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--vocab", type=int, default=0, help="model vocabulary (default: the tokenizer's)")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    run = build_run(args)
    cfg = run.cfg
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.context
    print(f"preset {args.preset}; device {run.device}; {sum(p.numel() for p in run.model.parameters()):,} parameters; "
          f"{tokens_per_step:,} tokens/step; {args.steps} steps; eval every {cfg.train.eval_every}, "
          f"checkpoint every {cfg.train.checkpoint_every}, state every {cfg.train.state_every}")
    time_plain(run, min(5, args.steps))  # warm-up (and compilation)
    plain, harness = [], []
    initial = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    for _ in range(args.repeats):
        run.model.load_state_dict(initial)
        plain.append(args.steps * tokens_per_step / time_plain(run, args.steps))
        run.model.load_state_dict(initial)
        harness.append(args.steps * tokens_per_step / time_harness(run))
    best_plain, best_harness = max(plain), max(harness)
    print(f"plain loop : {best_plain:12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in plain)})")
    print(f"harness    : {best_harness:12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in harness)})")
    print(f"ratio harness/plain: {best_harness / best_plain:.3f}  (goal >= 0.97)")
    if run.device.type == "cuda":
        name = torch.cuda.get_device_name(run.device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        achieved = best_harness * flops_per_token(run) / 1e12
        mfu = f"{100 * achieved / peak:.1f}% of {peak:.0f}" if peak else "unknown peak"
        print(f"{name}: {achieved:.1f} TFLOP/s model FLOPs, MFU {mfu}; "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
