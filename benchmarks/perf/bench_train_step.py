"""The harness's training step against a minimal plain loop and a seed-style loop, side by side in one process.

    python benchmarks/perf/bench_train_step.py --preset tiny --steps 60
    python benchmarks/perf/bench_train_step.py --preset paper --steps 200 --vocab 50257 --data path/to/TinyStories

- **Harness**: `geobench.train.train` with everything it does on every step. That is the data stream
  with probe injection, the λ and lr schedules, clipping, hooks, the progress bar, weights-only
  checkpoints and training-state saves at the preset's cadence, and torch.compile where the preset
  turns it on (its first, compiling step is reported apart). Time spent in evaluation is left out:
  evaluation is protocol, not overhead.
- **Plain**: the loop a careful script would write. The same model and optimizer, random token
  batches of the same shape, plain cross-entropy on the full logits, clipping, step.
- **Seed-style**: the research code's recipe. fp32, eager, attention written out (softmax of
  QKᵀ/√d with a causal mask), unfused AdamW.

Each runs `--repeats` times, alternating; the best of each is compared. The benchmark prints
tokens/s, the harness/plain ratio (goal ≥ 0.97), the harness/seed-style ratio (goal ≥ 9× on a GPU)
and peak memory. On a GPU it also prints MFU against the dense bf16 matmul rate measured on that
device in the same run, not a datasheet number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import resource
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from geobench import config
from geobench.registry import installed
from geobench.rundir import RunDir
from geobench.train import Setup, build_model_and_optimizer, prepare, train

COMPILE_SECONDS: list[float] = []


def build_run(args) -> Setup:
    pairs = {"preset": args.preset, "steps": str(args.steps), "data": args.data, "compile": str(args.compile).lower()}
    cfg = config.resolve("adamw", pairs, None, installed(), args.preset)
    run = prepare(cfg, installed())
    if args.vocab and args.vocab != run.tokenizer.vocab_size:  # throughput at the paper's vocabulary
        run.model, run.optimizer, _ = build_model_and_optimizer(cfg, args.vocab, run.device, run.reg)
    return run


def time_harness(run: Setup) -> float:
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
        outcome = train(run, RunDir(tmp))
        _sync(run.device)
        total = time.perf_counter() - start
    run.evaluator = evaluate
    if outcome.compile_seconds is not None:  # compiling is reported apart, not counted as training
        COMPILE_SECONDS.append(outcome.compile_seconds)
        total -= outcome.compile_seconds
    return total - spent_in_eval


def time_plain(run: Setup, steps: int) -> float:
    forward = torch.compile(run.model) if run.cfg.model.compile else run.model
    return time_loop(run, run.model, forward, run.optimizer, steps, run.autocast)


def time_loop(run: Setup, model, forward, optimizer, steps: int, autocast) -> float:
    """Seconds of `steps` plain steps on random token batches of the run's shape."""
    cfg = run.cfg
    vocab = model.wte.weight.shape[0]
    shape = (cfg.train.batch_size, cfg.model.context + 1)
    _sync(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.train.grad_accum):
            tokens = torch.randint(0, vocab, shape, device=run.device)
            with autocast:
                logits = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) / cfg.train.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    _sync(run.device)
    return time.perf_counter() - start


def manual_attention(module, x: torch.Tensor) -> torch.Tensor:
    """The research code's attention: scores, causal mask, softmax, values, all in the open."""
    B, T, C = x.shape
    q, k, v = module.qkv(x).split(C, dim=2)
    q, k, v = (t.view(B, T, module.n_head, C // module.n_head).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return module.proj(y.transpose(1, 2).contiguous().view(B, T, C))


def time_seed_style(run: Setup, steps: int) -> float:
    """fp32, eager, manual attention, unfused AdamW, on a copy of the model."""
    cfg = run.cfg
    model = copy.deepcopy(run.model).float()
    for block in model.blocks:
        block.attn.forward = types.MethodType(manual_attention, block.attn)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    hp = cfg.optimizer.params
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp["wd"]}, {"params": rest, "weight_decay": 0.0}],
                                  lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], foreach=False, fused=False)
    return time_loop(run, model, model, optimizer, steps, contextlib.nullcontext())


def measured_bf16_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 matmul rate of this device, measured now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's resident peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(run: Setup) -> float:
    """6 × (parameters used in matmuls) + attention scores and values (12 · layers · d · context)."""
    m = run.cfg.model
    n = sum(p.numel() for name, p in run.model.named_parameters() if name != "wpe.weight")
    return 6 * n + 12 * m.n_layer * m.d_model * m.context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed-steps", type=int, default=10, help="steps per seed-style run (it is slow)")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--vocab", type=int, default=0, help="model vocabulary (default: the tokenizer's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: the preset's, on for paper)")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    if args.compile is None:
        args.compile = args.preset == "paper"

    run = build_run(args)
    cfg = run.cfg
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.context
    print(f"preset {args.preset}; device {run.device}; {sum(p.numel() for p in run.model.parameters()):,} parameters; "
          f"{tokens_per_step:,} tokens/step; {args.steps} steps; eval every {cfg.train.eval_every}, "
          f"checkpoint every {cfg.train.checkpoint_every}, state every {cfg.train.state_every}")
    time_plain(run, min(5, args.steps))  # warm-up (and compilation)
    time_seed_style(run, 1)
    plain, harness, seed = [], [], []
    initial = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    for _ in range(args.repeats):
        run.model.load_state_dict(initial)
        plain.append(args.steps * tokens_per_step / time_plain(run, args.steps))
        run.model.load_state_dict(initial)
        harness.append(args.steps * tokens_per_step / time_harness(run))
        run.model.load_state_dict(initial)
        seed.append(args.seed_steps * tokens_per_step / time_seed_style(run, args.seed_steps))
    best_plain, best_harness, best_seed = max(plain), max(harness), max(seed)
    print(f"plain loop : {best_plain:12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in plain)})")
    print(f"harness    : {best_harness:12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in harness)})")
    print(f"seed-style : {best_seed:12,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in seed)}; "
          f"{args.seed_steps} steps each)")
    print(f"ratio harness/plain: {best_harness / best_plain:.3f}  (goal >= 0.97)")
    print(f"ratio harness/seed-style: {best_harness / best_seed:.2f}x  (goal >= 9x on a GPU)")
    where = "allocated on the GPU" if run.device.type == "cuda" else "resident"
    measured = {"device": str(run.device), "preset": args.preset, "tokens_per_second": best_harness,
                "plain_tokens_per_second": best_plain, "seed_style_tokens_per_second": best_seed,
                "ratio_plain": best_harness / best_plain, "ratio_seed_style": best_harness / best_seed,
                "peak_memory_gib": peak_memory_gib(run.device), "peak_memory_is": where,
                "compile_seconds": min(COMPILE_SECONDS) if COMPILE_SECONDS else None}
    print(f"peak memory: {measured['peak_memory_gib']:.2f} GiB ({where})")
    if COMPILE_SECONDS:
        print(f"compile (the harness's first step): {min(COMPILE_SECONDS):.1f} s, not counted in its tokens/s")
    if run.device.type == "cuda":
        peak = measured_bf16_tflops(run.device)
        achieved = best_harness * flops_per_token(run) / 1e12
        measured.update(gpu=torch.cuda.get_device_name(run.device), matmul_tflops=peak, mfu=achieved / peak)
        print(f"{measured['gpu']}: measured dense bf16 matmul {peak:.0f} TFLOP/s; harness "
              f"{achieved:.1f} TFLOP/s of model FLOPs, MFU {100 * achieved / peak:.1f}% (goal >= 45%)")
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()
