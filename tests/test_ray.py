"""A suite's cells as Ray tasks on a local Ray instance (the `ray` extra; tox -e ray)."""

import json

import pytest
from test_scale import write_suite

from conftest import run_cli

pytest.importorskip("ray", reason='Ray is an extra: pip install "geobench[ray]" (tox -e ray runs this file)')


def test_a_suite_runs_as_ray_tasks_and_compares_like_inline(tmp_path):
    suite = write_suite(tmp_path)
    result = run_cli("bench", str(suite), "scale=tiny", "executor=ray", "--out", "ray", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "handed to Ray (a local instance)" in result.stdout
    inline = run_cli("bench", str(suite), "scale=tiny", "--out", "inline", cwd=tmp_path)
    assert inline.returncode == 0, inline.stderr
    by_ray, by_inline = (json.loads((tmp_path / d / "comparison.json").read_text()) for d in ("ray", "inline"))
    assert [r["label"] for r in by_ray["runs"]] == [r["label"] for r in by_inline["runs"]] == ["adamw", "sgd"]
    for a, b in zip(by_ray["runs"], by_inline["runs"]):  # the same cells, whatever executed them
        assert a["values"]["val_loss"] == pytest.approx(b["values"]["val_loss"], rel=1e-4)
    assert "geobench: completed" in (tmp_path / "ray" / "logs" / "sgd.log").read_text()
