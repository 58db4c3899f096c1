"""One command for the first GPU: the whole paper path measured in one call, one summary written.

    python benchmarks/first_gpu.py --data path/to/TinyStories --out gpu-first
    python benchmarks/first_gpu.py --dry-run --out dry        # the same stages, CPU-sized

Three stages, each a subprocess whose wall time is measured:
1. throughput: benchmarks/perf/bench_train_step.py at the paper preset (tokens/s, the harness/plain
   and harness/seed-style ratios, peak memory, compile time, MFU against the matmul rate measured
   on that GPU in the same run);
2. a 400-step `geobench run adamw preset=paper` on the local TinyStories files (its report's
   tokens/s, compile time and status);
3. `geobench bench paper-beta2 scale=short` on the same files (its cells' statuses).
It writes OUT/summary.json and OUT/summary.md. A stage that fails is recorded with its exit code
and the tail of its output, and the next stage still runs. `--dry-run` runs the same stages at CPU
sizes (tiny preset and scale, a few steps) so that the plumbing is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stages(data: str, out: Path, dry_run: bool) -> list[tuple[str, list[str]]]:
    geobench = [sys.executable, "-m", "geobench"]
    if dry_run:
        few = ["steps=6", "warmup=1", "eval_every=3", "checkpoint_every=2", "state_every=6", "train_stories=200",
               "val_stories=20", "eval_examples=16", "n_codewords=32", "val_batches=1", "batch_size=8",
               "val_batch_size=8", "checkpoint_window=[]", "metrics=[]"]
        return [
            ("throughput", [sys.executable, str(HERE / "perf" / "bench_train_step.py"), "--preset", "tiny", "--steps", "4",
                            "--repeats", "1", "--seed-steps", "1", "--json", str(out / "throughput.json")]),
            ("paper run", [*geobench, "run", "adamw", "preset=tiny", f"data={data}", *few, "--out", str(out / "paper-run")]),
            ("paper-beta2 short", [*geobench, "bench", "paper-beta2", "scale=tiny", f"data={data}", *few,
                                   "--out", str(out / "paper-beta2")]),
        ]
    return [
        ("throughput", [sys.executable, str(HERE / "perf" / "bench_train_step.py"), "--preset", "paper", "--steps", "200",
                        "--data", data, "--json", str(out / "throughput.json")]),
        ("paper run", [*geobench, "run", "adamw", "preset=paper", "steps=400", f"data={data}", "--out",
                       str(out / "paper-run")]),
        ("paper-beta2 short", [*geobench, "bench", "paper-beta2", "scale=short", f"data={data}", "--out",
                               str(out / "paper-beta2")]),
    ]


def run_stage(name: str, command: list[str], log: Path) -> dict:
    print(f"first_gpu: {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    print(f"first_gpu: {name}: exit {code} after {wall:.0f} s (log {log})", flush=True)
    return {"stage": name, "command": command, "exit_code": code, "wall_seconds": round(wall, 1),
            "log": str(log), "tail": "" if code == 0 else log.read_text()[-2000:]}


def results(out: Path) -> dict:
    """What each stage left: the throughput numbers, the run's report, the suite's cells."""
    found: dict = {}
    if (out / "throughput.json").exists():
        found["throughput"] = json.loads((out / "throughput.json").read_text())
    report = out / "paper-run" / "report.json"
    if report.exists():
        doc = json.loads(report.read_text())
        found["paper_run"] = {"status": doc["run"]["status"], "last_step": doc["run"]["last_step"],
                              "device": doc["environment"]["device"], **doc.get("throughput", {})}
    index = out / "paper-beta2" / "suite.json"
    if index.exists():
        found["paper_beta2"] = {c["label"]: c["outcome"]["state"] for c in json.loads(index.read_text())["cells"]}
    return found


def markdown(summary: dict) -> str:
    lines = ["# First GPU run", "", f"dry run: {summary['dry_run']}", "", "| stage | exit | wall (s) |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['exit_code']} | {s['wall_seconds']} |" for s in summary["stages"]]
    for name, values in summary["results"].items():
        lines += ["", f"## {name}", ""] + [f"- {k}: {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="local TinyStories files (required unless --dry-run, which uses the embedded corpus)")
    parser.add_argument("--out", required=True, help="folder for the logs, the runs and summary.{json,md}")
    parser.add_argument("--dry-run", action="store_true", help="the same stages at CPU sizes")
    args = parser.parse_args(argv)
    data = args.data or ("embedded" if args.dry_run else None)
    if data is None:
        parser.error("--data is required (local TinyStories files), or --dry-run")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {str(out)!r} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    done = [run_stage(name, command, out / f"{i}-{name.replace(' ', '-')}.log")
            for i, (name, command) in enumerate(stages(data, out, args.dry_run), 1)]
    summary = {"dry_run": args.dry_run, "data": data, "stages": done, "results": results(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(f"first_gpu: wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0 if all(s["exit_code"] == 0 for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
