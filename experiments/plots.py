"""Matplotlib figures written into a run directory (PNG, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def subplots(*args, figsize=(6, 4), dpi: int = 100, **kwargs):
    """A figure and its axes detached from pyplot (like ``plt.subplots``).

    Nothing switches matplotlib's global backend (notebooks keep inline plots) and nothing
    needs closing: the figure is garbage-collected with its last reference. ``savefig`` renders
    PNGs with Agg.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*args, **kwargs)


def plot_curves(
    history: Mapping[str, list[tuple[int, float]]],
    tags: Sequence[str],
    path: str,
    *,
    ylabel: str = "",
    logy: bool = False,
) -> str:
    """Plots the logged scalars `tags` against the step into `path` (atomically)."""
    fig, ax = subplots(figsize=(6, 4), dpi=100)
    for tag in tags:
        points = history.get(tag, [])
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=tag, marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path
