"""Figures: matplotlib on a non-interactive backend, saved atomically under a run's figures/."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_references", "pyplot", "save_figure"]


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


def plot_references(ax, references: list[dict], key: str) -> None:
    """The published reference series of `key` (p_ood, val_loss, a, r_norm) on `ax`, dashed."""
    for ref in references:
        pts = [(s, v) for s, v in zip(ref["series"]["steps"], ref["series"][key]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), ls="--", lw=1.2, label=f"{ref['name']} (published)")
