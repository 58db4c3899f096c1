"""Shared-direction energy of a run's checkpoints (docs/science.md#shared-direction-energy): how much of the drift lies along a
reference direction, by default the unit final drift of a named reference run (e.g. AdamW)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geobench.api import SCOPE, MetricPlugin, MetricResult, Param, Plugins, UsageError, hookimpl
from geobench.shared_direction import energy_rows, to_csv

if TYPE_CHECKING:
    from geobench.api import Config, MetricContext, TrajectoryView


OPTIONS = {
    "scope": SCOPE,
    "reference": Param(None, "run directory whose unit final drift is φ̂, or sibling:NAME, the run NAME beside this "
                       "one (a suite's cell, trained first; {seed} in NAME becomes this run's seed); none: this run "
                       "itself", kind=str, nullable=True),
}
SIBLING = "sibling:"


def reference_path(reference: str | None, directory: Path, seed: int) -> Path | None:
    """The reference run's directory; None: this run itself."""
    if reference is None:
        return None
    if reference.startswith(SIBLING):  # the same seed: the same initialization, so the directions compare
        return directory.parent / reference.removeprefix(SIBLING).replace("{seed}", str(seed))
    return Path(reference)


def check(*, config: Config, options: Mapping[str, Any], reg: Plugins) -> None:
    reference = options["reference"]
    if reference is None:
        return
    if reference.startswith(SIBLING):  # trained by the time this run ends, or the metric fails then
        name = reference.removeprefix(SIBLING)
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"energy.reference={reference!r}: sibling:NAME names a run directory beside this one")
    elif not (Path(reference) / "config.yaml").exists():
        raise UsageError(f"energy.reference={reference!r} is not a geobench run directory (no config.yaml)")


def compute(*, ctx: MetricContext, options: Mapping[str, Any]) -> MetricResult:
    config = ctx.run_config()
    steps = ctx.trajectory.window([], minimum=2)
    names = ctx.trajectory.scope(options["scope"])
    path = reference_path(options["reference"], ctx.directory, config.train.seed)
    if path is not None and not (path / "config.yaml").exists():
        raise UsageError(f"reference run {str(path)!r} does not exist (yet)")
    reference: TrajectoryView = ctx.trajectory if path is None else ctx.open_run(path)
    ref_steps = reference.checkpoint_steps()
    if len(ref_steps) < 2:
        raise UsageError(f"reference run {reference.name!r} has {len(ref_steps)} checkpoints; 2 are needed")
    ref_origin, ref_end = reference.reader(ref_steps[0]), reference.reader(ref_steps[-1])
    # τ is measured from this run's Θ₀; φ̂ is the reference run's own unit drift.
    rows = energy_rows(config.optimizer.name, [(s, ctx.trajectory.reader(s)) for s in steps],
                       ctx.trajectory.reader(steps[0]), lambda n: ref_end.get(n) - ref_origin.get(n), names)
    last = rows[-1]
    scalars = {"cos_eff_final": last["cos_eff"], "p_phi_final": last["p_phi"], "E_tau_final": last["E_tau"],
               "E_perp_final": last["E_perp"]}
    given = options["reference"]
    which = ("this run itself" if path is None else f"the run {path.name} beside this one"
             if given.startswith(SIBLING) else f"the run {given}")  # as the user named it, not where it resolved
    variant = (f"φ̂: the unit final drift (last − first checkpoint) of {which}; "
               f"τ from this run's first checkpoint, {options['scope']} scope")
    result = MetricResult(scalars=scalars, tables={"energy": rows}, figures=[plot(ctx, rows)],
                          files=[ctx.write_file("energy.csv", to_csv(rows))], variant=variant)
    if path is None or path.resolve() == ctx.directory.resolve():
        result.no_signal = ("φ̂ is this run's own final drift, so cos_eff ends at 1 by construction; set "
                            "energy.reference to another run (e.g. sibling:adamw) to measure the shared direction")
    return result


def plot(ctx, rows) -> str:
    from geobench.figures import pyplot

    plt = pyplot()
    steps = [r["iter"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r["E_phi"] for r in rows], marker="o", ms=3, label="E_phi (along φ̂)")
    left.plot(steps, [r["E_perp"] for r in rows], marker="o", ms=3, label="E_perp")
    left.set_xlabel("step")
    left.set_ylabel("energy (squared parameter units)")
    left.legend()
    right.plot(steps, [r["cos_eff"] for r in rows], marker="o", ms=3)
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("cos_eff = √(E_phi / E_tau)")
    fig.tight_layout()
    return ctx.figure(fig, "energy", caption=(
        "Left: the drift's energy along the shared direction φ̂ (E_phi) and across it (E_perp). Right: the "
        "effective cosine between the drift and φ̂."))


TERMS = {
    "cos_eff (final)": "√(E_phi / E_tau) at the last checkpoint: the effective cosine between the run's drift from "
                       "θ₀ and the shared direction φ̂ (another run's unit drift)",
    "E_tau, E_phi, E_perp": "the drift's energy ‖θ_t − θ₀‖², its part along φ̂ and the rest",
    "p_phi": "E_phi / E_tau",
}


@hookimpl
def geobench_register_metrics(register):
    register(MetricPlugin("energy", "shared-direction energy E_tau, E_phi, E_perp, p_phi, cos_eff (energy.csv)",
                          OPTIONS, compute, default=True, needs=("checkpoints", "run"), check=check, min_checkpoints=2,
                          columns={"cos_eff": ("cos_eff_final", "cos_eff (final)")}, terms=TERMS))
