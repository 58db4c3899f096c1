"""Numbers for reading and figures that survive outliers: a column keeps one notation and one
number of decimals, a value a hundred times the column's typical one cannot turn it into exponents,
and a figure clips a series that dwarfs the others instead of rescaling them, bands the seeds of a
configuration and puts runs of different lengths on a fraction-of-training axis."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geobench.figures import Line, draw, outliers, pyplot
from geobench.formatting import Estimate, column, duration, number


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


@given(st.lists(st.floats(min_value=1e-3, max_value=9e4), min_size=1, max_size=12))
def test_a_column_reads_down_in_one_notation(values):
    cells = column(values)
    typical = sorted(values)[(len(values) - 1) // 2]
    ordinary = [c for v, c in zip(values, cells) if v <= 100 * typical]
    assert len({"e" in c for c in ordinary}) == 1, cells  # one notation
    if "e" not in ordinary[0]:
        assert len({decimals(c) for c in ordinary}) == 1, cells  # one number of decimals
    for v, c in zip(values, cells):  # and each cell is its value, to the digits shown
        shown = float(c)
        assert shown == pytest.approx(v, rel=0.06, abs=10 ** -max(decimals(c), 0) / 2 + 1e-12), (v, c)


def test_columns_as_the_issue_found_them():
    assert column([0.626, 0.6271]) == ["0.626", "0.627"]  # not 0.626 beside 0.6271
    assert column([0.610, 0.852, 1.04e6]) == ["0.610", "0.852", "1.04e6"]  # a diverged loss stays apart
    assert column([8.732e5, 0.0006153]) == ["8.73e5", "6.15e-4"]  # decades apart: one notation
    assert column([10, 11.0, None, float("nan")]) == ["10", "11", "—", "nan"]
    assert column([Estimate(0.6262, 0.0121), Estimate(0.61, None), "no signal"]) == ["0.626 ± 0.012", "0.610",
                                                                                    "no signal"]
    assert number(None) == "—" and duration(125) == "2.1 min"


def lines_of(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_a_series_that_dwarfs_the_others_is_clipped_and_named():
    healthy = [Line(f"run {i}", [0, 1, 2], [7.0, 3.0 - 0.1 * i, 2.0 - 0.1 * i]) for i in range(4)]
    blown = Line("beta2=0", [0, 1, 2], [7.0, 2e5, 8.7e5], marks={"diverged": 1})
    assert outliers([*healthy, blown]) == [blown] and outliers(healthy) == [] and outliers([blown]) == []
    fig, ax = pyplot().subplots()
    said = draw(ax, [*healthy, blown], ylabel="val_loss (nats)")
    low, high = ax.get_ylim()
    assert 7.0 <= high < 20 and low <= 1.7  # the healthy runs fill the axis
    assert any("beta2=0 (up to 8.7e5)" in s for s in said)
    assert "beta2=0 — clipped, up to 8.7e5" in lines_of(ax)
    assert ax.get_yscale() == "linear"
    pyplot().close(fig)


def test_decades_get_a_log_axis_and_seeds_a_band():
    fig, ax = pyplot().subplots()
    seeds = [Line(f"s{i}", [0, 10, 20], [1.0 + i, 0.1, 0.001 * (i + 1)], group="adamw") for i in range(3)]
    draw(ax, seeds, ylabel="loss")
    assert ax.get_yscale() == "log"
    mean = lines_of(ax)["adamw (mean of 3 seeds, band min–max)"]
    assert list(mean.get_ydata()) == pytest.approx([2.0, 0.1, 0.002])
    assert len(ax.collections) == 1  # the band
    pyplot().close(fig)


def test_runs_of_different_lengths_share_a_fraction_of_training():
    fig, ax = pyplot().subplots()
    said = draw(ax, [Line("ours", [0, 1000, 2000], [0.0, 0.5, 0.9], length=2000),
                     Line("published", [0, 2000, 4000], [0.0, 0.4, 0.95], dashed=True, length=4000)],
                ylabel="p_ood", events={"λ switch": 1000})
    assert list(lines_of(ax)["ours"].get_xdata()) == [0.0, 0.5, 1.0]
    assert list(lines_of(ax)["published"].get_xdata()) == [0.0, 0.5, 1.0]
    assert lines_of(ax)["published"].get_linestyle() == "--"
    assert "fraction of training" in ax.get_xlabel() and any("2000 steps, 4000 steps" in s for s in said)
    assert "λ switch" not in lines_of(ax)  # a step event means nothing on a fraction axis
    pyplot().close(fig)
    fig, ax = pyplot().subplots()
    draw(ax, [Line("ours", [0, 100], [1.0, 2.0], length=100)], ylabel="x", events={"λ switch": 50})
    assert re.match(r"λ switch", next(iter(k for k in lines_of(ax) if k != "ours")))
    pyplot().close(fig)
