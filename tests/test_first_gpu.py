"""benchmarks/first_gpu.py, the one command for the first GPU, in its CPU dry-run mode: every stage
runs (throughput, a run, the β₂ suite) at CPU sizes and the summary holds what each left."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "first_gpu.py"


def test_the_dry_run_measures_every_stage_and_writes_one_summary(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "dry")],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "dry" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["throughput", "paper run", "paper-beta2 short"]
    assert all(s["exit_code"] == 0 and s["wall_seconds"] > 0 for s in summary["stages"])
    found = summary["results"]
    assert found["throughput"]["tokens_per_second"] > 0 and found["throughput"]["ratio_plain"] > 0
    assert found["paper_run"]["status"] == "completed" and found["paper_run"]["tokens_per_second"] > 0
    assert found["paper_beta2"]["adamw-beta2=0.0"] == "diverged" and len(found["paper_beta2"]) == 5
    assert "| paper-beta2 short | 0 |" in (tmp_path / "dry" / "summary.md").read_text()


def test_a_real_run_needs_the_data(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "--data is required" in result.stderr
