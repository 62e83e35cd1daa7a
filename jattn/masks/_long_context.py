"""Static sparse patterns of long-context inference: StreamingLLM / MInference's A-shape and
MInference's vertical-slash pattern.

Both are causal and end-aligned (the query at row ``i`` sits at key position
``i' = i + Tk - Tq``, as for :func:`jattn.masks.causal`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.masks._base import Mask, _check_len, _check_nonneg

Runs = tuple[tuple[int, int], ...]  # sorted, disjoint, non-adjacent inclusive ranges [a, b]


@dataclasses.dataclass(frozen=True)
class _AShape(Mask):
    """``j <= i'`` and (``j < sink`` or ``j > i' - window``)."""

    sink: int
    window: int

    def _visible(self, q, k, h, q_len, kv_len):
        qa = q + (kv_len - q_len)
        return (k <= qa) & ((k < self.sink) | (k > qa - self.window))

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        # Visible cells are the union of a causal sink prefix and a causal band, so a block is
        # empty iff it meets neither. It is full iff it is causally full and every key column is
        # in the sink or in the band of the last (tightest) query row.
        off, s, w = kv_len - q_len, self.sink, self.window
        qa0, qa1 = q0 + off, q1 + off
        sink_meets = (k0 < s) & (k0 <= qa1)
        band_meets = (k1 > qa0 - w) & (k0 <= qa1)
        band_lo = qa1 - w + 1  # first key the last query row sees through the band
        covered = (k1 < s) | (k0 >= band_lo) | (band_lo <= s)
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.broadcast_to(~(sink_meets | band_meets), shape)
        full = jnp.broadcast_to((k1 <= qa0) & covered, shape)
        return empty, full


def _runs(values: Sequence[int], name: str) -> Runs:
    """Sorted unique non-negative ints as maximal runs of consecutive values."""
    if isinstance(values, int | np.integer) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a sequence of non-negative ints, got {values!r}")
    vals = sorted({_check_nonneg(v, name) for v in values})
    runs: list[list[int]] = []
    for v in vals:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return tuple((a, b) for a, b in runs)


def _in_runs(x, runs: Runs):
    out = jnp.zeros(jnp.shape(x), bool)
    for a, b in runs:
        out = out | ((x >= a) & (x <= b)) if a != b else out | (x == a)
    return out


@dataclasses.dataclass(frozen=True)
class _VerticalSlash(Mask):
    """``j <= i'`` and (``j in columns`` or ``i' - j in offsets``), both stored as runs.

    The predicate costs one or two compares per run, so the kernels' per-tile mask stays cheap
    when the index lists are made of a few contiguous ranges (as MInference's are: sinks, the
    local diagonals, and scattered top-k picks).
    """

    columns: Runs
    offsets: Runs

    def _visible(self, q, k, h, q_len, kv_len):
        qa = q + (kv_len - q_len)
        return (k <= qa) & (_in_runs(k, self.columns) | _in_runs(qa - k, self.offsets))

    def _bounds_or_eval(self, q0, q1, k0, k1, q_len, kv_len, block_q, block_kv):
        # Both claims exact. Empty: a column run meets the block iff it overlaps
        # [k0, min(k1, q1')]; an offset run iff it overlaps the block's range of i' - j,
        # [q0' - k1, q1' - k0] (offsets are >= 0, so those cells are causal). Full: every key
        # column j of the block is a visible column for the first row (j in columns, j <= q0')
        # or carries the whole diagonal range [q0' - j, q1' - j] in offsets (counted with the
        # runs). One query block at a time: O(nq * Tk * runs) ops, O(Tk) memory, instead of the
        # O(Tq * Tk * runs) of evaluating the predicate.
        off = kv_len - q_len
        qa0, qa1 = q0 + off, q1 + off
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        meets = jnp.zeros(shape, bool)
        for a, b in self.columns:
            meets = meets | (jnp.maximum(k0, a) <= jnp.minimum(jnp.minimum(k1, qa1), b))
        for a, b in self.offsets:
            meets = meets | (jnp.maximum(qa0 - k1, a) <= jnp.minimum(qa1 - k0, b))

        nk = shape[1]
        j = jnp.arange(nk * block_kv, dtype=jnp.int32)
        is_column = _in_runs(j, self.columns)

        def offsets_upto(x):  # how many offsets are <= x
            n = jnp.zeros(jnp.shape(x), jnp.int32)
            for a, b in self.offsets:
                n = n + jnp.clip(x - a + 1, 0, b - a + 1)
            return n

        def one_block(rows):
            r0, r1 = rows[0], rows[1]
            lo, hi = r0 - j, r1 - j
            whole_diagonals = offsets_upto(hi) - offsets_upto(lo - 1) == hi - lo + 1
            ok = (is_column & (j <= r0)) | whole_diagonals
            return jnp.all(ok.reshape(nk, block_kv), axis=-1)

        full = jax.lax.map(one_block, jnp.stack([qa0[:, 0], qa1[:, 0]], axis=-1))
        return ~meets, full


def a_shape(sink: int, window: int) -> Mask:
    """``causal & (j < sink | j > i' - window)``: attention sinks plus a sliding window.

    The "A-shape" head pattern of MInference (Jiang et al., 2024) and the attention of
    StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2024):
    every query sees the first ``sink`` keys and the ``window`` most recent keys up to itself
    (``i' = i + Tk - Tq``, end-aligned). ``window >= 1`` (a query always sees itself);
    ``sink = 0`` is :func:`sliding_window`. Block maps are exact in closed form (O(nq * nk)).
    """
    return _AShape(_check_nonneg(sink, "sink"), _check_len(window, "window"))


def vertical_slash(columns: Sequence[int], offsets: Sequence[int]) -> Mask:
    """MInference's vertical-slash pattern: whole key columns plus diagonals, under causal.

    Query ``i`` (aligned position ``i' = i + Tk - Tq``) sees key ``j`` iff ``j <= i'`` and
    (``j in columns`` or ``i' - j in offsets``). This is how MInference (Jiang et al.,
    "MInference 1.0", 2024, ``vertical_slash_sparse_attention``) reads its index lists:
    ``v_idx`` are key columns every query sees, ``s_idx`` are slash lines counted back from the
    main diagonal (offset 0 is the diagonal, offset ``d`` the keys ``d`` positions earlier).
    MInference always adds the first 30 columns (sinks) and the 100 nearest diagonals to the
    top-k it estimates from the last 64 queries; here the lists are given as they are (static
    Python ints; pass ``range(30)`` / ``range(100)`` in them to match). Duplicates are ignored;
    consecutive values are stored as runs, and the predicate's cost grows with the number of
    runs. Block maps are exact on both claims (empty from run overlaps, full one query block at a
    time: O(nq * Tk * runs) integer ops once per shape).
    """
    col_runs = _runs(columns, "columns")
    off_runs = _runs(offsets, "offsets")
    if not col_runs and not off_runs:
        raise ValueError("vertical_slash needs at least one column or offset")
    return _VerticalSlash(col_runs, off_runs)
