"""Matplotlib figures written into a run directory (PNG, headless).

Every figure labels both axes; curves of a metric the paper reports carry its published values
as markers (:func:`overlay_published`); attention maps get key/query axes and a colour bar
(:func:`attention_map`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def subplots(*args, figsize=(6, 4), dpi: int = 100, **kwargs):
    """A figure and its axes detached from pyplot (like ``plt.subplots``).

    Nothing switches matplotlib's global backend (notebooks keep inline plots) and nothing
    needs closing: the figure is garbage-collected with its last reference. ``savefig`` renders
    PNGs with Agg.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*args, **kwargs)


def save(fig, path: str) -> str:
    """Writes `fig` to `path` atomically (a reader never sees half a PNG); returns `path`."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def metric_label(tags: Sequence[str]) -> str:
    """A y-axis label from scalar tags: ``("train/loss", "eval/loss")`` -> ``"loss"``."""
    names = list(dict.fromkeys(t.split("/", 1)[-1].replace("_", " ") for t in tags))
    return ", ".join(names)


def overlay_published(ax, points: Mapping, *, label: str = "published",
                      xmax: float | None = None, **style) -> bool:
    """Marks published ``{step: value}`` points (keys int or, after JSON, str) on `ax`.

    `xmax`: leave out points past it (a paper's step 10k on a 600-step run would squash the
    curve). Returns whether anything was drawn (non-numeric entries, e.g. notes, are skipped)."""
    xy = sorted((float(k), float(v)) for k, v in points.items()
                if isinstance(v, int | float) and _is_number(k)
                and (xmax is None or float(k) <= xmax))
    if not xy:
        return False
    x, y = zip(*xy, strict=True)
    style = {"marker": "x", "ls": "none", "color": "black", "ms": 7, "mew": 1.5, **style}
    ax.plot(x, y, label=label, **style)
    return True


def _is_number(x) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def plot_curves(
    history: Mapping[str, list[tuple[int, float]]],
    tags: Sequence[str],
    path: str,
    *,
    ylabel: str = "",
    logy: bool = False,
    published: Mapping | None = None,
    published_label: str = "published",
) -> str:
    """Plots the logged scalars `tags` against the step into `path` (atomically).

    `ylabel` defaults to the metric names of `tags`; `published` (``{step: value}``) adds the
    paper's values as markers."""
    fig, ax = subplots(figsize=(6, 4), dpi=100)
    for tag in tags:
        points = history.get(tag, [])
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=tag, marker="." if len(points) < 30 else None)
    if published:
        last = max((p[0] for t in tags for p in history.get(t, [])), default=None)
        overlay_published(ax, published, label=published_label, xmax=last)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or metric_label(tags))
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return save(fig, path)


def attention_map(
    weights,
    path: str,
    *,
    titles: Sequence[str] | None = None,
    suptitle: str = "",
    marked_queries: Sequence[int] = (),
    marked_label: str = "",
) -> str:
    """Attention weights as a PNG: one panel per map, key position on x, query position on y,
    a colour bar of the weight.

    Args:
      weights: ``[Tq, Tk]`` or ``[n, Tq, Tk]`` (e.g. one map per layer, heads averaged).
      path: the PNG to write (atomically).
      titles: one per map; default ``"layer i"``.
      suptitle: above all panels.
      marked_queries: query rows to mark with a red triangle left of the map (e.g. trigger
        tokens), named `marked_label` in the y-axis label.
    """
    from matplotlib.ticker import MaxNLocator

    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights: expected [Tq, Tk] or [n, Tq, Tk], got shape {w.shape}")
    n = w.shape[0]
    titles = list(titles) if titles is not None else [f"layer {i}" for i in range(n)]
    if len(titles) != n:
        raise ValueError(f"titles: expected {n} (one per map), got {len(titles)}")
    fig, axes = subplots(1, n, figsize=(4.6 * n + 0.6, 4.4), dpi=100, squeeze=False)
    vmax = max(float(w.max()), 1e-12)
    for ax, m, title in zip(axes[0], w, titles, strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key position")
        ax.set_ylabel("query position" + (f" (red: {marked_label})" if marked_label else ""))
        ax.set_title(title)
        if len(marked_queries):
            rows = list(marked_queries)
            ax.plot([-0.5 - 0.02 * m.shape[1]] * len(rows), rows, ">", color="red", ms=4,
                    clip_on=False)
            ax.set_xlim(-0.5, m.shape[1] - 0.5)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return save(fig, path)
