"""Shared-direction energy of a run's checkpoints (SPEC §4): how much of the drift lies along a
reference direction, by default the unit final drift of a named reference run (e.g. AdamW)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from geobench import Param, hookimpl
from geobench.analysis import SCOPE
from geobench.checkpoints import CheckpointReader
from geobench.energy import energy_rows, to_csv
from geobench.errors import UsageError
from geobench.registry import MetricPlugin, Registry
from geobench.trajectory import RunDir, atomic_write_text

if TYPE_CHECKING:
    from geobench.analysis import AnalysisContext
    from geobench.config import Config


OPTIONS = {
    "scope": SCOPE,
    "reference": Param(None, "run directory whose unit final drift is φ̂, or sibling:NAME, the run NAME beside this "
                       "one (a suite's cell, trained first; {seed} in NAME becomes this run's seed); none: this run "
                       "itself", kind=str, nullable=True),
}
SIBLING = "sibling:"


def reference_run(reference: str | None, run: RunDir, seed: int) -> RunDir:
    if reference is None:
        return run
    if reference.startswith(SIBLING):  # the same seed: the same initialization, so the directions compare
        return RunDir(run.path.parent / reference.removeprefix(SIBLING).replace("{seed}", str(seed)))
    return RunDir(reference)


def check(*, config: Config, options: Mapping[str, Any], reg: Registry) -> None:
    reference = options["reference"]
    if reference is None:
        return
    if reference.startswith(SIBLING):  # trained by the time this run ends, or the metric fails then
        name = reference.removeprefix(SIBLING)
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"energy.reference={reference!r}: sibling:NAME names a run directory beside this one")
    elif not RunDir(reference).config.exists():
        raise UsageError(f"energy.reference={reference!r} is not a geobench run directory (no config.yaml)")


def compute(*, ctx: AnalysisContext, options: Mapping[str, Any]) -> dict[str, Any]:
    steps = ctx.window([], minimum=2)
    names = ctx.scope(options["scope"])
    reference = reference_run(options["reference"], ctx.run, ctx.trained.train.seed)
    if not reference.config.exists():
        raise UsageError(f"reference run {str(reference)!r} does not exist (yet)")
    ref_steps = reference.checkpoint_steps()
    if len(ref_steps) < 2:
        raise UsageError(f"reference run {str(reference)!r} has {len(ref_steps)} checkpoints; 2 are needed")
    ref_origin = CheckpointReader(reference.checkpoint_path(ref_steps[0]))
    ref_end = CheckpointReader(reference.checkpoint_path(ref_steps[-1]))
    origin = CheckpointReader(ctx.run.checkpoint_path(steps[0]))
    # τ is measured from this run's Θ₀; φ̂ is the reference run's own unit drift.
    rows = energy_rows(ctx.trained.optimizer.name, [(s, CheckpointReader(ctx.run.checkpoint_path(s))) for s in steps],
                       origin, lambda n: ref_end.get(n) - ref_origin.get(n), names)
    atomic_write_text(ctx.run.path / "energy.csv", to_csv(rows))
    last = rows[-1]
    scalars = {"cos_eff_final": last["cos_eff"], "p_phi_final": last["p_phi"], "E_tau_final": last["E_tau"],
               "E_perp_final": last["E_perp"]}
    return {"scalars": scalars, "tables": {"energy": rows}, "figures": [plot(ctx, rows)],
            "files": ["energy.csv"], "reference": str(reference)}


def plot(ctx, rows) -> str:
    from geobench.report import pyplot

    plt = pyplot()
    steps = [r["iter"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r["E_phi"] for r in rows], marker="o", ms=3, label="E_phi (along φ̂)")
    left.plot(steps, [r["E_perp"] for r in rows], marker="o", ms=3, label="E_perp")
    left.set_xlabel("step")
    left.set_ylabel("energy")
    left.legend()
    right.plot(steps, [r["cos_eff"] for r in rows], marker="o", ms=3)
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("cos_eff")
    fig.tight_layout()
    return ctx.figure(fig, "energy")


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("energy", "shared-direction energy E_tau, E_phi, E_perp, p_phi, cos_eff (energy.csv)",
                          OPTIONS, compute, needs=("checkpoints",), check=check, min_checkpoints=2,
                          columns={"cos_eff": ("cos_eff_final", "cos_eff (final)")}))
