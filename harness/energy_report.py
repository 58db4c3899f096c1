"""The reading guide of the shared-direction energy, made into a verdict per trajectory, and the
energy report (energy.md, energy.html, a figure) written beside the CSV.

Classes (repro_pkg's reading guide; the thresholds are options, defaults below):
- step-energy collapse: some checkpoint's step energy per iteration, ‖θ_i − θ_(i−1)‖² / Δiter, exceeds
  `spike_factor` × the median of the earlier ones (the iter is flagged);
- healthy: cos_eff ≥ `healthy_cos` at every checkpoint (E_tau's growth is reported beside it);
- diffuse / off-axis: cos_eff falls by at least `decline` from the first checkpoint to the last, at
  least 3/4 of its steps going down, and E_perp ≥ `perp_ratio` × E_phi at the end;
- mixed: none of these;
- reference: the trajectory whose own final drift is φ̂ (its cos_eff ends at 1 by construction, so
  judging it against itself would say nothing).
"Weak" (healthy geometry, low task reward) needs a reward the manifest does not carry: not judged.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from geobench import page as pages
from geobench.figures import Line, draw, palette, pyplot, save_figure
from geobench.files import atomic_write_text
from geobench.formatting import number
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
    moved_by = f"cos_eff fell {drop:.3g}" if drop >= 0 else f"cos_eff rose {-drop:.3g}"
    diffuse = {moved_by: drop >= limits.decline,
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


REFERENCE_WHY = "φ̂ is its own final drift, so its cos_eff ends at 1 by construction; the others are measured against it"


def verdicts(measurement: Measurement, limits: Thresholds, reference: str | None = None) -> list[dict]:
    """The verdict of every trajectory; `reference`, the one whose own drift is φ̂, is not judged."""
    out = []
    for o in measurement.opts:
        judged = classify([r for r in measurement.rows if r["opt"] == o], measurement.step_energy[o], limits)
        out.append({**judged, "verdict": "reference", "why": REFERENCE_WHY} if o == reference else judged)
    return out


def figure(measurement: Measurement, judged: list[dict], directory: Path, name: str) -> str:
    plt = pyplot()
    colour = palette(measurement.opts)
    spikes = {v["opt"]: v["spike_iter"] for v in judged if v["spike_iter"] is not None}
    cos, energy = [], []
    for o in measurement.opts:
        rows = [r for r in measurement.rows if r["opt"] == o]
        marks = {"step-energy spike": spikes[o]} if o in spikes else {}
        iters = [r["iter"] for r in rows]
        cos.append(Line(o, iters, [_defined(r["cos_eff"]) for r in rows], colour=colour[o], marks=marks))
        energy.append(Line(o, iters, [r["E_tau"] for r in rows], colour=colour[o], marks=marks))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    draw(left, cos, ylabel="cos_eff = √(E_phi / E_tau)", xlabel="iter", ylim=(0, 1.02))
    draw(right, energy, ylabel="E_tau = ‖θ_t − θ₀‖² (squared parameter units)", xlabel="iter")
    fig.tight_layout()
    return save_figure(fig, directory, name)


def _defined(value: float) -> float | None:
    """NaN (cos_eff, p_phi where the checkpoint is θ₀ itself, E_tau = 0) as a missing value."""
    return None if isinstance(value, float) and math.isnan(value) else value


TERMS = {
    "θ₀": "the origin every drift is measured from",
    "φ̂": "the shared direction: a unit vector per parameter tensor",
    "E_tau": "‖θ_t − θ₀‖², the drift's energy (summed over the measured tensors)",
    "E_phi": "Σ_p ⟨θ_t,p − θ₀,p, φ̂_p⟩², the energy along φ̂",
    "E_perp": "E_tau − E_phi, the energy across φ̂",
    "p_phi, p_perp": "E_phi / E_tau and 1 − p_phi, the shares along and across φ̂",
    "cos_eff": "√p_phi, the effective cosine between the drift and φ̂ (undefined, —, where E_tau = 0)",
    "step energy": "‖θ_i − θ_(i−1)‖² between consecutive checkpoints, per iteration in the collapse test",
    "perp_over_phi_final": "E_perp / E_phi at the last checkpoint",
    "E_tau_growth": "E_tau at the last checkpoint over E_tau at the first that moved",
    "spike_iter": "the first iter whose step energy per iteration exceeds spike_factor × the median before it",
}


def matrix(cos: np.ndarray) -> list[list[str]]:
    """Cosines, in [-1, 1]: three decimals throughout the matrix."""
    return [[f"{v:.3f}" for v in row] for row in cos]


def headline(measurement: Measurement, judged: list[dict], sources: dict[str, str]) -> list[str]:
    sentences = [f"{len(judged)} trajectories measured along φ̂ ({sources['phi_hat']}) from θ₀ ({sources['theta0']})."]
    by_verdict: dict[str, list[str]] = {}
    for v in judged:
        spike_at = f" at iter {v['spike_iter']}" if v["verdict"] == "step-energy collapse" else ""
        by_verdict.setdefault(v["verdict"] + spike_at, []).append(v["opt"])
    sentences.append("Verdicts: " + "; ".join(f"{', '.join(opts)} {verdict}" for verdict, opts in by_verdict.items())
                     + " (the verdict table names the threshold that decided each).")
    opts = measurement.opts
    if len(opts) >= 2:
        cos = measurement.final_cosines()
        pairs = [(cos[i, j], a, b) for i, a in enumerate(opts) for j, b in enumerate(opts) if i < j]
        high, low = max(pairs), min(pairs)
        sentences.append(f"The final drifts are closest between {high[1]} and {high[2]} (cosine {number(high[0])})"
                         + (f" and furthest between {low[1]} and {low[2]} ({number(low[0])})." if len(pairs) > 1
                            else "."))
    return sentences


VERDICT_COLUMNS = ["opt", "verdict", "why", "cos_eff_first", "cos_eff_final", "cos_eff_min", "perp_over_phi_final",
                   "E_tau_growth", "spike_iter", "checkpoints"]


def page(measurement: Measurement, judged: list[dict], limits: Thresholds, csv_name: str, fig: str,
         sources: dict[str, str]) -> pages.Page:
    cos = measurement.final_cosines()
    out = pages.Page("Shared-direction energy", headline=headline(measurement, judged, sources))
    out.add(pages.Paragraph(f"θ₀: {sources['theta0']}. φ̂: {sources['phi_hat']}. Parameters: "
                            f"{measurement.rows[0]['n_params']} tensors. Rows: `{csv_name}`."),
            pages.Heading("Verdict per optimizer"),
            pages.Paragraph(f"Thresholds: healthy if cos_eff ≥ {limits.healthy_cos:g} throughout; step-energy collapse "
                            f"if a step's energy per iter exceeds {limits.spike_factor:g} × the median before it; "
                            f"diffuse if cos_eff falls by ≥ {limits.decline:g}, mostly monotonically, with "
                            f"E_perp ≥ {limits.perp_ratio:g} × E_phi at the end; mixed: none of these, the \"why\" "
                            "column names the threshold each missed. \"Weak\" (healthy geometry, low reward) is not "
                            "judged: the manifest carries no reward."),
            pages.table(VERDICT_COLUMNS, [[v.get(c) for c in VERDICT_COLUMNS] for v in judged]),
            pages.Heading("Do the optimizers share one direction?"),
            pages.Paragraph("Cosine of the final drifts θ_final − θ₀ over the whole parameter set (each parameter "
                            "weighted by its drift energy):"),
            pages.Table(["", *measurement.opts], [[a, *cells] for a, cells in zip(measurement.opts, matrix(cos))]),
            pages.Figure(fig, "Left: cos_eff, the effective cosine between each trajectory's drift from θ₀ and φ̂, at "
                              "every checkpoint (1: all of the drift lies along φ̂). Right: the drift's energy E_tau; "
                              "an X marks a step-energy spike."),
            pages.Heading("Trajectories"),
            pages.table(COLUMNS, [[_defined(r[c]) for c in COLUMNS] for r in measurement.rows]),
            pages.Heading("Terms"),
            pages.Terms(TERMS))
    return out


def write(measurement: Measurement, csv_path: Path, limits: Thresholds, sources: dict[str, str],
          reference: str | None = None) -> list[dict]:
    """CSV, then `<stem>.md`, `<stem>.html` and `figures/<stem>.png` beside it; returns the verdicts.
    `reference`: the trajectory whose own final drift is φ̂ (None when φ̂ came from elsewhere)."""
    directory = csv_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    judged = verdicts(measurement, limits, reference)
    fig = figure(measurement, judged, directory, csv_path.stem)
    atomic_write_text(csv_path, to_csv(measurement.rows))
    pages.write(page(measurement, judged, limits, csv_path.name, fig, sources), directory, csv_path.stem)
    return judged
