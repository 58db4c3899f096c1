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

import base64
import dataclasses
import html
from pathlib import Path

import numpy as np

from geobench.files import atomic_write_text
from geobench.report import fmt, pyplot, save_figure
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
    falling = [b <= a for a, b in zip(cos, cos[1:])]
    if out["spike_iter"] is not None:
        verdict = "step-energy collapse"
    elif cos and min(cos) >= limits.healthy_cos:
        verdict = "healthy"
    elif (len(cos) >= 2 and cos[0] - cos[-1] >= limits.decline and np.mean(falling) >= 0.75
          and (out["perp_over_phi_final"] or 0) >= limits.perp_ratio):
        verdict = "diffuse"
    else:
        verdict = "mixed"
    return {**out, "verdict": verdict}


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


VERDICT_COLUMNS = ["opt", "verdict", "cos_eff_first", "cos_eff_final", "cos_eff_min", "perp_over_phi_final",
                   "E_tau_growth", "spike_iter", "checkpoints"]


def markdown(measurement: Measurement, judged: list[dict], limits: Thresholds, csv_name: str, fig: str,
             sources: dict[str, str]) -> str:
    cos = measurement.final_cosines()
    lines = ["# Shared-direction energy", "",
             f"θ₀: {sources['theta0']}. φ̂: {sources['phi_hat']}. Parameters: {measurement.rows[0]['n_params']} "
             f"tensors. Rows: `{csv_name}`.", "",
             "## Verdict per optimizer", "",
             f"Thresholds: healthy if cos_eff ≥ {limits.healthy_cos:g} throughout; step-energy collapse if a step's "
             f"energy per iter exceeds {limits.spike_factor:g} × the median before it; diffuse if cos_eff falls by "
             f"≥ {limits.decline:g}, mostly monotonically, with E_perp ≥ {limits.perp_ratio:g} × E_phi at the end. "
             "\"Weak\" (healthy geometry, low reward) is not judged: the manifest carries no reward.", "",
             "| " + " | ".join(VERDICT_COLUMNS) + " |", "|" + "---|" * len(VERDICT_COLUMNS)]
    lines += ["| " + " | ".join(fmt(v.get(c)) for c in VERDICT_COLUMNS) + " |" for v in judged]
    lines += ["", "## Do the optimizers share one direction?", "",
              "Cosine of the final drifts θ_final − θ₀ over the whole parameter set (each parameter weighted by "
              "its drift energy):", "", "| | " + " | ".join(measurement.opts) + " |",
              "|---|" + "---|" * len(measurement.opts)]
    lines += [f"| {a} | " + " | ".join(f"{cos[i, j]:.4f}" for j in range(len(measurement.opts))) + " |"
              for i, a in enumerate(measurement.opts)]
    lines += ["", f"![energy]({fig})", "", "## Trajectories", "", "| " + " | ".join(COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in measurement.rows]
    return "\n".join(lines) + "\n"


def to_html(text: str, directory: Path, fig: str) -> str:
    """The markdown page as self-contained HTML: tables as tables, the figure embedded."""
    esc, parts = html.escape, ["<!doctype html><html><head><meta charset='utf-8'><title>Shared-direction energy</title>",
                               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
                               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 7px}</style>"
                               "</head><body>"]
    table: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{esc(c.strip())}</{tag}>" for c in line.strip("|").split("|"))
                             + "</tr>")
            continue
        if table:
            parts.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("# "):
            parts.append(f"<h1>{esc(line[2:])}</h1>")
        elif line.startswith("## "):
            parts.append(f"<h2>{esc(line[3:])}</h2>")
        elif line.startswith("!["):
            data = base64.b64encode((directory / fig).read_bytes()).decode()
            parts.append(f"<img alt='energy' src='data:image/png;base64,{data}'>")
        elif line:
            parts.append(f"<p>{esc(line)}</p>")
    return "\n".join(parts + ["</body></html>"])


def write(measurement: Measurement, csv_path: Path, limits: Thresholds, sources: dict[str, str]) -> list[dict]:
    """CSV, then `<stem>.md`, `<stem>.html` and `figures/<stem>.png` beside it; returns the verdicts."""
    directory = csv_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    judged = verdicts(measurement, limits)
    fig = figure(measurement, directory, csv_path.stem)
    atomic_write_text(csv_path, to_csv(measurement.rows))
    text = markdown(measurement, judged, limits, csv_path.name, fig, sources)
    atomic_write_text(directory / f"{csv_path.stem}.md", text)
    atomic_write_text(directory / f"{csv_path.stem}.html", to_html(text, directory, fig))
    return judged
