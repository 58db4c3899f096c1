"""The series code (switch detection, power laws, PC1 denominators) against the source's published
outputs and against independent re-computations of the source's rules."""

import csv
import json
from importlib import resources

import numpy as np
import pytest

from geobench import published, series
from geobench.api import EvalRecord

ANALYSIS = resources.files("geobench.reference_series").joinpath("mini_gpt/analysis")


def read_series(seed):
    with ANALYSIS.joinpath(f"backbone_decomposition/backbone_timeseries_seed{seed}.csv").open() as handle:
        return list(csv.DictReader(handle))


def source_rule(vals, prominence=0.03):
    """The source's detector, written out again from docs/science.md#metrics without geobench's code."""
    peaks, troughs = [], []
    n = len(vals)
    for i in range(1, n - 1):
        left, right = vals[max(0, i - 3):i], vals[i + 1:min(n, i + 4)]
        if vals[i - 1] < vals[i] > vals[i + 1] and vals[i] - max(min(left), min(right)) >= prominence:
            peaks.append(i)
        if vals[i - 1] > vals[i] < vals[i + 1] and min(max(left), max(right)) - vals[i] >= prominence:
            troughs.append(i)
    pairs = []
    for pk in peaks:
        later = [t for t in troughs if t > pk]
        if later:
            pairs.append((pk, later[0]))
    return peaks, troughs, pairs


@pytest.mark.parametrize("seed", [42, 271])
def test_detector_matches_the_source_rule_on_the_published_series(seed):
    rows = read_series(seed)
    steps = [int(r["step"]) for r in rows]
    p = [float(r["probe_ood_acc"]) for r in rows]
    peaks, troughs = series.detect_switches(p)
    want_peaks, want_troughs, want_pairs = source_rule(p)
    assert (peaks, troughs) == (want_peaks, want_troughs)
    assert series.pair_switches(peaks, troughs) == want_pairs
    found = published.analyze(published.load(f"mini_gpt-s{seed}"))["switching"]
    assert found["pairs"] == [[steps[a], steps[b]] for a, b in want_pairs]
    if seed == 42:  # the published seed-42 markers, as the source's rule gives them
        assert found["peaks"] == [1800, 2400, 2800, 3800, 4200, 4600, 5000, 5600, 6000, 6400, 7000, 7800, 9200, 9600]
        assert found["troughs"] == [2000, 2600, 3200, 4000, 4400, 4800, 5400, 5800, 6200, 6800, 7600, 8600, 9400, 9800]


def test_detector_on_a_planted_series():
    p = [0.0, 0.1, 0.5, 0.2, 0.05, 0.06, 0.3, 0.31, 0.3, 0.0, 0.0, 0.02]
    peaks, troughs = series.detect_switches(p)
    # interior points only, strict against both neighbours: no trough on the flat 0.0, 0.0
    assert peaks == [2, 7] and troughs == [4]
    assert series.pair_switches(peaks, troughs) == [(2, 4)]  # the last peak has no trough after it
    assert series.pair_switches([1, 3], [5]) == [(1, 5), (3, 5)]  # peaks may share a trough
    assert series.detect_switches([0.4] * 8) == ([], [])
    assert series.detect_switches([0.0, 0.02, 0.0]) == ([], [])  # below the prominence


def test_power_laws_recover_the_published_regime_fits():
    fits = json.loads(ANALYSIS.joinpath("backbone_decomposition/regime_fits.json").read_text())
    assert series.default_fit_windows(10_000) == [[0, 2000], [2000, 4000], [0, 4000], [4000, 6000],
                                                  [4000, 10000], [6000, 10000]]
    for seed in (42, 271):
        rows = read_series(seed)
        steps = [int(r["step"]) for r in rows]
        a, r = [float(x["a_t"]) for x in rows], [float(x["norm_r_t"]) for x in rows]
        got = series.window_fits(steps, a, r, [float(x["probe_ood_acc"]) for x in rows],
                                 series.default_fit_windows(10_000))
        assert len(got) == len(fits[f"seed_{seed}"]) == 6
        for row in got:
            want = fits[f"seed_{seed}"][f"{row['start']}-{row['end']}"]
            for key in ("gamma_a", "R2_a", "gamma_r", "R2_r"):
                assert row[key] == pytest.approx(want[key], abs=1e-6), (seed, row["start"], row["end"], key)
            assert row["C_a"] == pytest.approx(want["C_a"], rel=1e-6)


def test_half_open_windows():
    assert series.in_window([1, 200, 2000, 2200], 0, 2000) == [0, 1, 2]
    assert series.in_window([1, 200, 2000, 2200], 2000, 4000) == [3]
    # a known power law y = 3 t^1.5 is recovered exactly; zeros (Θ₀ itself) are left out
    t = [1, 10, 100, 1000]
    fit = series.power_law_fit(t, [0.0, 3 * 10**1.5, 3 * 100**1.5, 3 * 1000**1.5])
    assert fit["gamma"] == pytest.approx(1.5) and fit["C"] == pytest.approx(3.0) and fit["r2"] == pytest.approx(1.0)
    assert fit["n"] == 3


def test_pc1_from_published_singular_values_both_denominators():
    info = json.loads(ANALYSIS.joinpath("backbone_decomposition/singular_values_seed42.json").read_text())
    s = np.array(info["singular_values_rownorm"])
    got = published.pc1(published.load("mini_gpt-s42"))
    assert got["pc1_top10"] == pytest.approx(info["explained_var_rownorm"][0], abs=1e-12)  # 71.4% as published
    assert got["pc1"] == pytest.approx(s[0] ** 2 / 50) and got["pc1"] == pytest.approx(0.693, abs=5e-4)
    assert got["pc1_raw"] == pytest.approx(info["pc1_pct_raw"] / 100, abs=1e-3)
    beta = published.pc1(published.load("mini_gpt-beta2-0.99"))
    assert beta["pc1"] == pytest.approx(0.6875397, abs=1e-6)  # the β₂ series published the full spectrum


def test_series_names_and_groups():
    assert published.resolve("mini_gpt-beta2") == [f"mini_gpt-beta2-{b}" for b in ("0.99", "0.95", "0.9", "0.8", "0.0")]
    assert published.resolve("mini_gpt-s42,mini_gpt") == ["mini_gpt-s42", "mini_gpt-s271"]
    with pytest.raises(Exception, match="unknown published series 'mini_gpt-s43'"):
        published.resolve("mini_gpt-s43")


def test_power_laws_recover_the_published_beta2_fits():
    summary = json.loads(ANALYSIS.joinpath("beta2_backbone/beta2_backbone_summary.json").read_text())
    for entry in summary:
        found = published.analyze(published.load(f"mini_gpt-beta2-{entry['beta2']}"))["fits"]
        assert [[f["start"], f["end"]] for f in found] == published.BETA2_FIT_WINDOWS
        for row in found:
            want = entry["fit_results"][f"{row['start']}-{row['end']}"]
            for key in ("gamma_a", "R2_a", "gamma_r", "R2_r"):
                assert row[key] == pytest.approx(want[key], abs=1e-6)
            # the β₂ script's correlation keeps Θ₀'s point (‖r‖ = 0): corr_points="all" gives its summary's
            corr = entry["corr_results"][f"{row['start']}-{row['end']}"]
            assert row["corr_p_ood_r"] == (None if corr is None else pytest.approx(corr, abs=1e-9))


def test_the_two_correlation_rules_differ_by_the_origin_point():
    series_ = published.load("mini_gpt-beta2-0.99")
    args = (series_.steps, series_.a, series_.r_norm, series_.p_ood, [[0, 2000]])
    moved, every = series.window_fits(*args, "moved")[0], series.window_fits(*args, "all")[0]
    assert every["corr_p_ood_r"] == pytest.approx(0.8616860640914311, abs=1e-9)  # the β₂ summary's
    assert moved["corr_p_ood_r"] == pytest.approx(0.806, abs=5e-4)  # the regime script's rule
    idx = [i for i, s in enumerate(series_.steps) if 0 < s <= 2000 and series_.p_ood[i] is not None]
    p, r = np.array([series_.p_ood[i] for i in idx]), np.array([series_.r_norm[i] for i in idx])
    assert every["corr_p_ood_r"] == pytest.approx(np.corrcoef(p, r)[0, 1])
    assert moved["corr_p_ood_r"] == pytest.approx(np.corrcoef(p[r > 0], r[r > 0])[0, 1])


def test_probe_not_learned_says_why_in_words():
    from geobench.series import probe_not_learned

    def evals(*pairs):
        return [EvalRecord(step=i + 1, p_ood=p_ood, p_in=p_in) for i, (p_ood, p_in) in enumerate(pairs)]

    assert probe_not_learned(evals((0.0, 0.0), (0.1, 0.3))) is None  # the threshold itself counts as learned
    flat = evals((0.0, 0.01), (0.02, 0.004))
    assert probe_not_learned(flat) == "best p_ood 0.02 < 0.1 (best p_in 0.01): the probe was not learned"
    in_only = evals((0.05, 0.9), (float("nan"), 0.95))
    assert probe_not_learned(in_only) == ("best p_ood 0.05 < 0.1 (best p_in 0.95): the probe was learned in "
                                          "distribution but never out of it")
    assert probe_not_learned([EvalRecord(step=1)]) == "no evaluation of p_ood"
