"""Plot helpers shared by the experiments: one style, mean ± sd bands over seeds, atomic PNG writes.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot: they draw off-screen
whatever the process's backend, and importing the lab never switches a notebook's or a
script's backend (an earlier version called ``matplotlib.use("Agg")`` at import).
``matplotlib.figure`` is imported on first use, not with the lab: a ``run`` whose plots are all
up to date (the report reuses them) never loads it (a few tenths of a second of its ~4 s).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

from normlab.lab._files import replacing

COLORS = {"none": "#d62728", "plain": "#d62728", "batch": "#1f77b4", "bn": "#1f77b4", "layer": "#2ca02c",
          "group": "#9467bd", "instance": "#8c564b", "batch_renorm": "#ff7f0e", "rms": "#17becf"}


def color(name: str):
    """A fixed colour per norm name (``"group:4"`` -> group's), so plots agree with each other."""
    return COLORS.get(str(name).split(":")[0])


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=(6.0, 3.6), **kw):
    """``pyplot.subplots`` without pyplot: ``(fig, axes)`` on a fresh off-screen Figure."""
    # imported on first use, not with the lab (see the module docstring)
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def cmap(name: str):
    """A registered colormap by name (``pyplot.get_cmap`` without pyplot)."""
    return matplotlib.colormaps[name]


def figure(ncols: int = 1, width: float = 6.0, height: float = 3.6):
    fig, axes = subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return fig, (axes[0][0] if ncols == 1 else axes[0])


def as_array(runs: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-seed series (None = missing) as a float array (seeds, points), NaN-padded to equal length."""
    n = max(len(r) for r in runs)
    out = np.full((len(runs), n), np.nan)
    for i, r in enumerate(runs):
        out[i, : len(r)] = np.array(r, dtype=float)
    return out


def band(ax, x: Sequence[float], runs: Sequence[Sequence[float]], label: str, col=None, **kw) -> None:
    """Mean over seeds as a line, ± one sd as a shaded band."""
    y = as_array(runs)
    m = np.nanmean(y, axis=0)
    s = np.nanstd(y, axis=0, ddof=1) if len(y) > 1 else np.zeros_like(m)
    x = np.asarray(x, dtype=float)[: len(m)]
    (line,) = ax.plot(x, m, label=label, color=col, **kw)
    ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)


def log_x(ax, ticks: Sequence[float], invert: bool = False) -> None:
    """A log-scale x axis labelled exactly at ``ticks`` (no minor-tick labels such as 3x10^0)."""
    ax.set_xscale("log")
    ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    if invert:
        ax.invert_xaxis()


def save(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, suffix=".png") as tmp:
        fig.tight_layout()
        fig.savefig(tmp, dpi=100)
