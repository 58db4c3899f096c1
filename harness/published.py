"""The source study's published output series (mini_gpt, MIT; `reports/reference/published`), shipped
with geobench so that `geobench report --published NAME` puts them beside a user's runs, and the
same series code (`geobench.series`) that analyses runs analyses them: switch markers and pairs,
power-law fits, PC1 from the published singular values with both denominators."""

from __future__ import annotations

import csv
import dataclasses
import json
from importlib import resources

import numpy as np

from geobench import series as series_math
from geobench.api import UsageError, did_you_mean

ROOT = "mini_gpt/analysis"
# name → (folder, file suffix, description)
SERIES = {
    "mini_gpt-s42": ("backbone_decomposition", "seed42", "mini_gpt AdamW seed 42, 10k steps (published)"),
    "mini_gpt-s271": ("backbone_decomposition", "seed271", "mini_gpt AdamW seed 271, 10k steps (published)"),
    "mini_gpt-beta2-0.99": ("beta2_backbone", "b2099", "mini_gpt AdamW β₂ = 0.99, 4000 steps (published)"),
    "mini_gpt-beta2-0.95": ("beta2_backbone", "b2095", "mini_gpt AdamW β₂ = 0.95, 4000 steps (published)"),
    "mini_gpt-beta2-0.9": ("beta2_backbone", "b209", "mini_gpt AdamW β₂ = 0.90, 4000 steps (published)"),
    "mini_gpt-beta2-0.8": ("beta2_backbone", "b208", "mini_gpt AdamW β₂ = 0.80, 4000 steps (published)"),
    "mini_gpt-beta2-0.0": ("beta2_backbone", "b200", "mini_gpt AdamW β₂ = 0.0, 4000 steps, diverged (published)"),
}
BETA2_FIT_WINDOWS = [[0, 2000], [2000, 4000], [0, 4000]]
GROUPS = {"mini_gpt": ["mini_gpt-s42", "mini_gpt-s271"],
          "mini_gpt-beta2": [n for n in SERIES if n.startswith("mini_gpt-beta2-")]}


@dataclasses.dataclass
class PublishedSeries:
    name: str
    description: str
    steps: list[int]               # every row: evaluation and checkpoint steps
    p_ood: list[float | None]      # None where no evaluation ran at that checkpoint
    p_in: list[float | None]
    val_loss: list[float | None]
    a: list[float]                 # a(t) = ⟨Δθ_t, v_b⟩, trunk, row-normalized backbone, Θ₀ = step 1
    r_norm: list[float]
    norm_delta: list[float]
    singular: dict                 # the published singular-value file
    beta2: float | None

    def evaluated(self) -> tuple[list[int], list[float]]:
        """(steps, p_ood) at the rows where an evaluation ran."""
        rows = [(s, p) for s, p in zip(self.steps, self.p_ood) if p is not None]
        return [s for s, _ in rows], [p for _, p in rows]


def resolve(spec: str) -> list[str]:
    """Comma-separated series names or groups (`mini_gpt`, `mini_gpt-beta2`) → series names."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in GROUPS:
            out += GROUPS[part]
        elif part in SERIES:
            out.append(part)
        else:
            known = list(SERIES) + list(GROUPS)
            raise UsageError(f"unknown published series {part!r}{did_you_mean(part, known)}; "
                             f"available: {', '.join(known)}")
    if not out:
        raise UsageError("--published needs a series name (available: " + ", ".join(list(SERIES) + list(GROUPS)) + ")")
    return list(dict.fromkeys(out))


def _file(folder: str, name: str):
    return resources.files("geobench.reference_series").joinpath(f"{ROOT}/{folder}/{name}")


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def load(name: str) -> PublishedSeries:
    folder, suffix, description = SERIES[name]
    with _file(folder, f"backbone_timeseries_{suffix}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    column = {key: [_number(r.get(key)) for r in rows] for key in rows[0]}

    def complete(key: str) -> list[float]:  # a column every row fills
        return [float(r[key]) for r in rows]

    singular = json.loads(_file(folder, f"singular_values_{suffix}.json").read_text())
    return PublishedSeries(name, description, [int(float(r["step"])) for r in rows], column["probe_ood_acc"],
                           column["probe_in_acc"], column["val_loss"], complete("a_t"), complete("norm_r_t"),
                           complete("norm_delta_t"), singular, singular.get("beta2"))


def pc1(series: PublishedSeries) -> dict:
    """Trunk PC1 from the published singular values, both ways. Row-normalized rows have unit norm,
    so the full spectrum sums to the number of rows: PC1 = σ₁²/n. The top-k denominator is the one
    the seed series published (k = the number of values the file lists). Raw PC1 over the full
    spectrum needs Σ‖Δθ_t‖², which the series' ‖Δθ_t‖ column gives."""
    s_rn = np.asarray(series.singular["singular_values_rownorm"], dtype=float)
    n = int(series.singular["n_checkpoints"])
    out = {"pc1": float(s_rn[0] ** 2 / n),
           "pc1_top10": float(series_math.explained_ratios(s_rn, top=10)[0]),
           "pc1_as_published": series.singular["pc1_pct_rownorm"] / 100}
    if "singular_values_raw" in series.singular:
        s_raw = np.asarray(series.singular["singular_values_raw"], dtype=float)
        total = float(np.sum(np.square([d for d in series.norm_delta if d])))
        out.update(pc1_raw=float(s_raw[0] ** 2 / total), pc1_raw_top10=float(series_math.explained_ratios(s_raw, top=10)[0]))
    out["pc1_raw_as_published"] = series.singular["pc1_pct_raw"] / 100
    return out


def fit_windows(series: PublishedSeries) -> list[list[int]]:
    """The windows the source fitted this series in: its six for the 10k runs, (0, 2000], (2000, 4000]
    and (0, 4000] for the β₂ runs."""
    return BETA2_FIT_WINDOWS if series.beta2 is not None else series_math.default_fit_windows(series.steps[-1])


def corr_points(series: PublishedSeries) -> str:
    """Which points the source's corr(p_ood, ‖r‖) took: the β₂ script kept Θ₀'s (‖r‖ = 0), the regime
    script of the 10k runs left it out (series_math.window_fits)."""
    return "all" if series.beta2 is not None else "moved"


def analyze(series: PublishedSeries) -> dict:
    """The published series through geobench's own series code: one comparison row."""
    steps, p = series.evaluated()
    peaks, troughs = series_math.detect_switches(p)
    pairs = series_math.pair_switches(peaks, troughs)
    fits = series_math.window_fits(series.steps, series.a, series.r_norm, series.p_ood, fit_windows(series),
                                   corr_points(series))
    evaluated_loss = [v for v in series.val_loss if v is not None]
    return {
        "name": series.name, "description": series.description, "beta2": series.beta2,
        "best_p_ood": max(p), "best_p_ood_step": steps[int(np.argmax(p))],
        "final_val_loss": evaluated_loss[-1], "drift": series.norm_delta[-1],
        **pc1(series),
        "switching": {"peaks": [steps[i] for i in peaks], "troughs": [steps[i] for i in troughs],
                      "pairs": [[steps[a], steps[b]] for a, b in pairs],
                      "delta_p": [p[a] - p[b] for a, b in pairs]},
        "fits": fits,
    }
