"""The reading guide of the shared-direction energy, made into a verdict per trajectory, and the
energy report (energy.md, energy.html, a figure) written beside the CSV.

Classes (repro_pkg's reading guide; the thresholds are options, defaults below):
- step-energy collapse: some checkpoint's step energy per iteration, ‖θ_i − θ_(i−1)‖² / Δiter, exceeds
  `spike_factor` × the median of the earlier ones (the iter is flagged);
- healthy: cos_eff ≥ `healthy_cos` at every checkpoint (E_tau's growth is reported beside it);
- diffuse / off-axis: cos_eff falls by at least `decline` from the first checkpoint to the last, at
  least 3/4 of its steps going down, and E_perp ≥ `perp_ratio` × E_phi at the end;
- mixed: none of these.
"Weak" (healthy geometry, low task reward) needs a reward the manifest does not carry: not judged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from geobench import page as pages
from geobench.figures import pyplot, save_figure
from geobench.files import atomic_write_text
from geobench.report import fmt
from geobench.shared_direction import COLUMNS, Measurement, to_csv


@dataclasses.dataclass(frozen=True)
class Thresholds:
    healthy_cos: float = 0.9
    spike_factor: float = 10.0
    decline: float = 0.1
    perp_ratio: float = 3.0


def spike(iters: list[int], step_energy: list[float], factor: float) -> int | None:
    """The first iter whose step energy per iteration exceeds `factor` × the median of the earlier
    rates (the first checkpoint, measured from θ₀, only serves as history)."""
    rates = [e / max(b - a, 1) for a, b, e in zip([0] + iters[:-1], iters, step_energy)]
    for i in range(2, len(rates)):
        history = np.median(rates[1:i])
        if history > 0 and rates[i] > factor * history:
            return iters[i]
    return None


def classify(rows: list[dict], step_energy: list[float], limits: Thresholds) -> dict:
    """The reading-guide class of one optimizer's trajectory, with the numbers behind it."""
    moved = [r for r in rows if r["E_tau"] > 0]
    cos = [r["cos_eff"] for r in moved]
    out = {"opt": rows[0]["opt"], "checkpoints": len(rows), "cos_eff_first": cos[0] if cos else None,
           "cos_eff_final": cos[-1] if cos else None, "cos_eff_min": min(cos) if cos else None,
           "perp_over_phi_final": moved[-1]["E_perp"] / moved[-1]["E_phi"] if moved and moved[-1]["E_phi"] > 0 else None,
           "E_tau_growth": moved[-1]["E_tau"] / moved[0]["E_tau"] if moved else None,
           "spike_iter": spike([r["iter"] for r in rows], step_energy, limits.spike_factor)}
    falling = float(np.mean([b <= a for a, b in zip(cos, cos[1:])])) if len(cos) >= 2 else 0.0
    drop = cos[0] - cos[-1] if cos else 0.0
    ratio = out["perp_over_phi_final"] or 0.0
    diffuse = {f"cos_eff fell {drop:.3g}": drop >= limits.decline,
               f"{falling:.0%} of its steps went down": falling >= 0.75,
               f"E_perp/E_phi ended at {ratio:.3g}": ratio >= limits.perp_ratio}
    bounds = (f">= {limits.decline:g}", ">= 75%", f">= {limits.perp_ratio:g}")
    if out["spike_iter"] is not None:
        verdict, why = "step-energy collapse", (f"at iter {out['spike_iter']} the step energy per iter exceeds "
                                                f"{limits.spike_factor:g} × the median before it")
    elif cos and min(cos) >= limits.healthy_cos:
        verdict, why = "healthy", f"cos_eff >= {limits.healthy_cos:g} at every checkpoint (min {min(cos):.3g})"
    elif len(cos) >= 2 and all(diffuse.values()):
        verdict, why = "diffuse", "; ".join(f"{fact} ({bound})" for fact, bound in zip(diffuse, bounds))
    else:
        failed = [f"{fact} (not {bound})" for (fact, held), bound in zip(diffuse.items(), bounds) if not held]
        verdict, why = "mixed", (f"not healthy: cos_eff min {min(cos):.3g} < {limits.healthy_cos:g}; not diffuse: "
                                 + "; ".join(failed) if cos else "no checkpoint moved")
    return {**out, "verdict": verdict, "why": why}


def verdicts(measurement: Measurement, limits: Thresholds) -> list[dict]:
    return [classify([r for r in measurement.rows if r["opt"] == o], measurement.step_energy[o], limits)
            for o in measurement.opts]


def figure(measurement: Measurement, directory: Path, name: str) -> str:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for o in measurement.opts:
        rows = [r for r in measurement.rows if r["opt"] == o]
        left.plot([r["iter"] for r in rows], [r["cos_eff"] for r in rows], marker="o", ms=3, label=o)
        right.plot([r["iter"] for r in rows], [r["E_tau"] for r in rows], marker="o", ms=3, label=o)
    left.set_ylim(0, 1.02)
    left.set_ylabel("cos_eff")
    right.set_ylabel("E_tau")
    for ax in (left, right):
        ax.set_xlabel("iter")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, directory, name)


VERDICT_COLUMNS = ["opt", "verdict", "why", "cos_eff_first", "cos_eff_final", "cos_eff_min", "perp_over_phi_final",
                   "E_tau_growth", "spike_iter", "checkpoints"]


def page(measurement: Measurement, judged: list[dict], limits: Thresholds, csv_name: str, fig: str,
         sources: dict[str, str]) -> pages.Page:
    cos = measurement.final_cosines()
    out = pages.Page("Shared-direction energy")
    out.add(pages.Paragraph(f"θ₀: {sources['theta0']}. φ̂: {sources['phi_hat']}. Parameters: "
                            f"{measurement.rows[0]['n_params']} tensors. Rows: `{csv_name}`."),
            pages.Heading("Verdict per optimizer"),
            pages.Paragraph(f"Thresholds: healthy if cos_eff ≥ {limits.healthy_cos:g} throughout; step-energy collapse "
                            f"if a step's energy per iter exceeds {limits.spike_factor:g} × the median before it; "
                            f"diffuse if cos_eff falls by ≥ {limits.decline:g}, mostly monotonically, with "
                            f"E_perp ≥ {limits.perp_ratio:g} × E_phi at the end. \"Weak\" (healthy geometry, low "
                            "reward) is not judged: the manifest carries no reward."),
            pages.Table(VERDICT_COLUMNS, [[fmt(v.get(c)) for c in VERDICT_COLUMNS] for v in judged]),
            pages.Heading("Do the optimizers share one direction?"),
            pages.Paragraph("Cosine of the final drifts θ_final − θ₀ over the whole parameter set (each parameter "
                            "weighted by its drift energy):"),
            pages.Table(["", *measurement.opts], [[a, *(f"{cos[i, j]:.4f}" for j in range(len(measurement.opts)))]
                                                  for i, a in enumerate(measurement.opts)]),
            pages.Figure(fig, "energy"),
            pages.Heading("Trajectories"),
            pages.Table(COLUMNS, [[fmt(r[c]) for c in COLUMNS] for r in measurement.rows]))
    return out


def write(measurement: Measurement, csv_path: Path, limits: Thresholds, sources: dict[str, str]) -> list[dict]:
    """CSV, then `<stem>.md`, `<stem>.html` and `figures/<stem>.png` beside it; returns the verdicts."""
    directory = csv_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    judged = verdicts(measurement, limits)
    fig = figure(measurement, directory, csv_path.stem)
    atomic_write_text(csv_path, to_csv(measurement.rows))
    pages.write(page(measurement, judged, limits, csv_path.name, fig, sources), directory, csv_path.stem)
    return judged
