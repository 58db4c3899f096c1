"""Figures: matplotlib on a non-interactive backend, saved atomically under a run's figures/, and
curves drawn so that they survive what real comparisons hold — a diverged run a million times the
others, runs of different lengths, several seeds of one configuration, published series beside ours.

`draw` is how every curve figure of geobench is drawn: a series whose values dwarf the others is
clipped at the top of the healthy runs' range and named in the legend with its maximum (never
rescaling the healthy ones), seeds of one configuration become a mean line with a min–max band,
runs of different lengths share a fraction-of-training axis, published series are dashed in the
colour of the run they pair with, events (the λ switch, a divergence) are marked, and the y axis
turns logarithmic where the healthy values span decades."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from geobench.formatting import number, ordinary_limit

__all__ = ["Line", "draw", "outliers", "palette", "published_lines", "pyplot", "save_figure"]

LOG_SPAN = 100.0  # healthy values spanning more than this factor get a log axis
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, directory: Path, name: str) -> str:
    """Write a matplotlib figure to directory/figures/NAME.png atomically, close it, and return
    its path relative to `directory`."""
    folder = Path(directory) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    os.replace(tmp, folder / f"{name}.png")
    return f"figures/{name}.png"


def palette(keys: Sequence[str]) -> dict[str, str]:
    """A colour per key, in order, distinct for up to 16 keys (then repeating)."""
    return {key: COLOURS[i % len(COLOURS)] for i, key in enumerate(dict.fromkeys(keys))}


@dataclasses.dataclass
class Line:
    """One curve: `x` (steps) and `y` (None where there is no value). `group`: lines of one group
    with the same x are drawn as their mean with a min–max band. `length`: the steps its run was
    planned for. `marks`: named x positions marked on the line (e.g. "diverged")."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    colour: str | None = None
    dashed: bool = False
    group: str | None = None
    length: int | None = None
    marks: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def peak(self) -> float:
        finite = [abs(v) for v in self.y if v is not None and math.isfinite(v)]
        return max(finite) if finite else 0.0


def outliers(lines: Sequence[Line]) -> list[Line]:
    """The lines whose largest |value| dwarfs the others' (beyond formatting.ordinary_limit of the
    lines' peaks; with one line, none)."""
    limit = ordinary_limit([line.peak() for line in lines])
    return [line for line in lines if line.peak() > limit]


def _bands(lines: Sequence[Line]) -> list[tuple[Line, list[float] | None, list[float] | None]]:
    """(line to draw, band low, band high): a group of two or more lines with one x becomes its mean."""
    out: list[tuple[Line, list[float] | None, list[float] | None]] = []
    seen: set[str] = set()
    for line in lines:
        members = [m for m in lines if line.group is not None and m.group == line.group and list(m.x) == list(line.x)]
        if len(members) < 2:
            out.append((line, None, None))
            continue
        if line.group in seen:
            continue
        seen.add(str(line.group))
        columns = [[v for v in values if v is not None and math.isfinite(v)] for values in zip(*(m.y for m in members))]
        mean = [sum(c) / len(c) if c else math.nan for c in columns]
        label = f"{line.group} (mean of {len(members)} seeds, band min–max)"
        out.append((dataclasses.replace(line, label=label, y=mean),
                    [min(c) if c else math.nan for c in columns], [max(c) if c else math.nan for c in columns]))
    return out


def draw(ax, lines: Sequence[Line], *, ylabel: str, xlabel: str = "step", events: Mapping[str, float] | None = None,
         ylim: tuple[float, float] | None = None) -> list[str]:
    """Draw `lines` on `ax` (see the module docstring) and return what a caption must say: the
    clipped series with their maxima, and the x axis when runs of different lengths share it.
    `events`: name → step, drawn as labelled vertical lines. `ylim`: fixed limits (no log axis)."""
    said = []
    lengths = {line.length for line in lines if line.length}
    fraction = len(lengths) > 1
    if fraction:
        xlabel = "fraction of training (step / the run's planned steps)"
        said.append("x is the fraction of each run's planned steps (" + ", ".join(
            f"{n} steps" for n in sorted(lengths)) + ")")
    clipped = outliers(lines)
    healthy = [line for line in lines if line not in clipped]
    values = [v for line in healthy for v in line.y if v is not None and math.isfinite(v)]
    positive = [v for v in values if v > 0]
    log = (ylim is None and bool(positive) and len(positive) == len(values)
           and max(positive) / min(positive) > LOG_SPAN)
    if log:
        ax.set_yscale("log")
    top = None
    if clipped and values:
        low, high = min(values), max(values)
        if log:
            top = high * 3.0
            ax.set_ylim(low / 1.5, top)
        else:
            pad = 0.08 * (high - low or abs(high) or 1.0)
            top = high + pad
            ax.set_ylim(low - pad, top)
        said.append("clipped at the top of the other series' range: " + "; ".join(
            f"{line.label} (up to {number(line.peak(), 2)})" for line in clipped))

    def x_of(line: Line, x: float) -> float:
        return x / line.length if fraction and line.length else x

    for line, low_band, high_band in _bands(lines):
        xs = [x_of(line, x) for x in line.x]
        ys = [math.nan if v is None else v for v in line.y]
        label = line.label + (f" — clipped, up to {number(line.peak(), 2)}" if line in clipped else "")
        ax.plot(xs, ys, color=line.colour, ls="--" if line.dashed else "-", lw=1.2 if line.dashed else 1.5,
                label=label)
        if low_band is not None and high_band is not None:
            ax.fill_between(xs, low_band, high_band, color=line.colour, alpha=0.2, lw=0)
        for name, at in line.marks.items():
            y = _value_at(line, at)
            if top is not None and (y is None or y > top):
                y = top
            if y is not None:
                ax.plot([x_of(line, at)], [y], marker="X", ms=8, color=line.colour or "black", ls="none")
                ax.annotate(name, (x_of(line, at), y), fontsize=7, xytext=(4, -10), textcoords="offset points")
        if top is not None and line in clipped:
            over = next((x for x, v in zip(line.x, line.y) if v is not None and v > top), None)
            if over is not None:
                ax.plot([x_of(line, over)], [top], marker="^", ms=8, color=line.colour or "black", ls="none",
                        clip_on=False)
    reach = max((x for line in lines for x in line.x), default=0.0)
    for name, at in (events or {}).items():
        if not fraction and at <= reach:  # an event after the last step did not happen
            ax.axvline(at, color="grey", ls=":", lw=1, label=name)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if lines:
        ax.legend(fontsize=7)
    return said


def _value_at(line: Line, x: float) -> float | None:
    pairs = [(abs(px - x), v) for px, v in zip(line.x, line.y) if v is not None and math.isfinite(v)]
    return min(pairs)[1] if pairs else None


def published_lines(references: Sequence[Mapping[str, Any]], key: str) -> list[Line]:
    """The published series' `key` (p_ood, val_loss, a, r_norm) as dashed lines in the colour a
    comparison gave each (`colour`, that of the run it pairs with)."""
    out = []
    for ref in references:
        pts = [(s, v) for s, v in zip(ref["series"]["steps"], ref["series"][key]) if v is not None]
        if pts:
            xs, ys = zip(*pts)
            out.append(Line(f"{ref['name']} (published)", list(xs), list(ys), colour=ref.get("colour"), dashed=True,
                            length=ref.get("steps") or ref["series"]["steps"][-1]))
    return out
