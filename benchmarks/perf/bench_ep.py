"""EP step vs BPTT step of the same equilibrium transformer and batch, side by side in one run.

    python benchmarks/perf/bench_ep.py                      # tiny width, CPU
    python benchmarks/perf/bench_ep.py --d-model 512 --n-head 16 --d-ff 2048 --batch 64   # paper width, GPU

For each number of free-phase steps T1 it times one gradient computation of each rule (symmetric
EP, holomorphic EP, implicit differentiation, BPTT) and measures the memory autograd holds for the
backward pass (bytes of the tensors saved for backward, counted with saved-tensor hooks: exact on
any device), plus the CUDA peak when on a GPU. EP's promise: memory independent of T1; BPTT's grows
with it.
"""

from __future__ import annotations

import argparse
import time

import torch

from geobench.api import Batch, ModelConfig
from geobench.plugins.ep import relaxation as ep
from geobench.plugins.ep.eqformer import EqFormer


def measure(fn) -> tuple[float, int]:
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--t1", type=int, nargs="+", default=[10, 30, 60])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=args.n_head, d_model=args.d_model, d_ff=args.d_ff, context=args.context,
                      params={"relax_tol": 0.0})
    model = EqFormer(cfg, args.vocab).to(device)
    inputs = torch.randint(0, args.vocab, (args.batch, args.context), device=device)
    targets = torch.randint(0, args.vocab, (args.batch, args.context), device=device)
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, -1] = True
    print(f"eqformer d={args.d_model} heads={args.n_head} d_ff={args.d_ff}, batch {args.batch}×{args.context}, {device}")
    print(f"{'T1':>4} {'rule':>10} {'seconds':>9} {'saved for backward':>20} {'vs EP':>7}")
    batch = Batch(inputs, targets, mask)

    def free() -> dict:
        e, h, _ = ep.free_phase(model, inputs)
        return {"e": e, "h": h}

    for t1 in args.t1:
        model.relax_steps = t1
        rules = {
            "ep-sym": lambda t1=t1: ep.ep_gradient(model, **free(), batch=batch, lam=2.0, estimator="symmetric",
                                                   nudge_steps=t1 // 2),
            "ep-holo": lambda t1=t1: ep.ep_gradient(model, **free(), batch=batch, lam=2.0, estimator="holo",
                                                    nudge_steps=t1 // 2),
            "implicit": lambda t1=t1: ep.implicit_gradient(model, **free(), batch=batch, lam=2.0, steps=t1),
            "bptt": lambda: ep.bptt_gradient(model, batch=batch, lam=2.0),
        }
        results = {}
        for name, rule in rules.items():
            model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            results[name] = measure(rule)
            peak = f", CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if torch.cuda.is_available() else ""
            seconds, saved = results[name]
            ratio = saved / max(results["ep-sym"][1], 1)
            print(f"{t1:>4} {name:>10} {seconds:>9.3f} {saved / 2**20:>16.1f} MiB {ratio:>6.1f}x{peak}")
        print(f"     BPTT/EP time {results['bptt'][0] / results['ep-sym'][0]:.2f}, "
              f"memory {results['bptt'][1] / max(results['ep-sym'][1], 1):.1f}")


if __name__ == "__main__":
    main()
