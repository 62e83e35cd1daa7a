"""Masks over 1-D positions: full, causal/local windows, chunks, prefixes, strides, arrays,
per-head stacks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.masks._base import Mask, _check_len, _check_mask, _check_nonneg
from jattn.masks._intmath import _floordiv, _mod


# ------------------------------------------------------------------------------------------------
# Structured masks with closed-form block maps.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Full(Mask):
    def _visible(self, q, k, h, q_len, kv_len):
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        return jnp.zeros(shape, bool), jnp.ones(shape, bool)


@dataclasses.dataclass(frozen=True)
class _Local(Mask):
    """``i' - left <= j <= i' + right`` with ``i' = i + Tk - Tq``; None = unbounded side."""

    left: int | None
    right: int | None

    def _visible(self, q, k, h, q_len, kv_len):
        qa = q + (kv_len - q_len)
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
        if self.left is not None:
            ok = ok & (k >= qa - self.left)
        if self.right is not None:
            ok = ok & (k <= qa + self.right)
        return ok

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        off = kv_len - q_len
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.zeros(shape, bool)
        full = jnp.ones(shape, bool)
        if self.left is not None:
            empty = empty | (k1 < q0 + off - self.left)
            full = full & (k0 >= q1 + off - self.left)
        if self.right is not None:
            empty = empty | (k0 > q1 + off + self.right)
            full = full & (k1 <= q0 + off + self.right)
        return empty, full


@dataclasses.dataclass(frozen=True)
class _Chunked(Mask):
    size: int

    def _visible(self, q, k, h, q_len, kv_len):
        return _floordiv(q + (kv_len - q_len), self.size) == _floordiv(k, self.size)

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        off, s = kv_len - q_len, self.size
        cq0, cq1 = _floordiv(q0 + off, s), _floordiv(q1 + off, s)
        ck0, ck1 = _floordiv(k0, s), _floordiv(k1, s)
        empty = (cq1 < ck0) | (ck1 < cq0)
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
        return empty, full


@dataclasses.dataclass(frozen=True)
class _KeyPrefix(Mask):
    """``j < length``: keys of a fixed prefix."""

    length: int

    def _visible(self, q, k, h, q_len, kv_len):
        return jnp.broadcast_to(k < self.length, jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)))

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        return (jnp.broadcast_to(k0 >= self.length, shape),
                jnp.broadcast_to(k1 < self.length, shape))


@dataclasses.dataclass(frozen=True)
class _Strided(Mask):
    stride: int
    offset: int

    def _visible(self, q, k, h, q_len, kv_len):
        vis = _mod(k, self.stride) == self.offset
        return jnp.broadcast_to(vis, jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)))

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        # Keys j in [k0, k1] with j % stride == offset exist iff the first such j >= k0 is <= k1.
        s, o = self.stride, self.offset
        first = k0 + _mod(o - _mod(k0, s), s)
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.broadcast_to(first > k1, shape)
        full = jnp.broadcast_to((s == 1) | ((k0 == k1) & (first == k0)), shape)
        return empty, full


@dataclasses.dataclass(frozen=True, eq=False)
class _FromArray(Mask):
    """A fixed bool ``[Tq, Tk]`` or ``[H, Tq, Tk]`` array. Hashed by identity of the array."""

    array: object

    def __eq__(self, other):
        return isinstance(other, _FromArray) and other.array is self.array

    def __hash__(self):
        return id(self.array)

    @property
    def num_heads(self):
        return self.array.shape[0] if self.array.ndim == 3 else None

    def _visible(self, q, k, h, q_len, kv_len):
        arr = jnp.asarray(self.array)
        if arr.shape[-2:] != (q_len, kv_len):
            raise ValueError(
                f"from_array mask has shape {tuple(arr.shape)}; expected [..., {q_len}, {kv_len}]"
                " ([Tq, Tk] or [H, Tq, Tk]) for this call"
            )
        qc = jnp.clip(q, 0, q_len - 1)
        kc = jnp.clip(k, 0, kv_len - 1)
        if arr.ndim == 3:
            return arr[h, qc, kc]
        return arr[qc, kc]


@dataclasses.dataclass(frozen=True)
class _PerHead(Mask):
    masks: tuple[Mask, ...]

    @property
    def num_heads(self):
        return len(self.masks)

    def _visible(self, q, k, h, q_len, kv_len):
        out = self.masks[0]._visible(q, k, h, q_len, kv_len)
        for i, m in enumerate(self.masks[1:], start=1):
            out = jnp.where(h == i, m._visible(q, k, h, q_len, kv_len), out)
        return out

    def _bounds_or_eval(self, q0, q1, k0, k1, q_len, kv_len, bq, bk):
        parts = [m._bounds_or_eval(q0, q1, k0, k1, q_len, kv_len, bq, bk) for m in self.masks]
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.stack([jnp.broadcast_to(e, shape) for e, _ in parts])
        full = jnp.stack([jnp.broadcast_to(f, shape) for _, f in parts])
        return empty, full


def full() -> Mask:
    """Every key visible to every query."""
    return _Full()


def causal() -> Mask:
    """``j <= i + Tk - Tq`` (end-aligned causal)."""
    return _Local(None, 0)


def local(left: int | None, right: int | None) -> Mask:
    """``i' - left <= j <= i' + right`` (``None`` leaves that side unbounded)."""
    left = None if left is None else _check_nonneg(left, "left")
    right = None if right is None else _check_nonneg(right, "right")
    return _Local(left, right)


def sliding_window(size: int) -> Mask:
    """``causal() & local(size - 1, 0)``: each query sees itself and ``size - 1`` keys before."""
    size = _check_len(size, "size")
    return _Local(size - 1, 0)


def chunked(size: int) -> Mask:
    """``i' // size == j // size`` (block-diagonal chunks of ``size`` tokens)."""
    return _Chunked(_check_len(size, "size"))


def prefix_lm(prefix_len: int) -> Mask:
    """``j < prefix_len or j <= i'``: bidirectional prefix, causal after it."""
    return _KeyPrefix(_check_nonneg(prefix_len, "prefix_len")) | causal()


def strided(stride: int, offset: int = 0) -> Mask:
    """``j % stride == offset`` (S2-Attention-style shard; combine per head with per_head)."""
    stride = _check_len(stride, "stride")
    offset = _check_nonneg(offset, "offset")
    if offset >= stride:
        raise ValueError(f"offset must be in [0, stride={stride}), got {offset}")
    return _Strided(stride, offset)


def from_array(mask) -> Mask:
    """A fixed bool array ``[Tq, Tk]`` or ``[H, Tq, Tk]`` (True = visible)."""
    arr = mask if isinstance(mask, jax.Array) else np.asarray(mask)
    if arr.dtype != bool:
        raise TypeError(f"mask must be a bool array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"mask must have shape [Tq, Tk] or [H, Tq, Tk], got {tuple(arr.shape)}")
    return _FromArray(arr)


def per_head(masks: Sequence[Mask]) -> Mask:
    """Head ``h`` uses ``masks[h]``; ``dense`` and ``block_map`` gain a leading head axis."""
    masks = tuple(masks)
    if not masks:
        raise ValueError("per_head needs at least one mask")
    for i, m in enumerate(masks):
        _check_mask(m, f"masks[{i}]")
        if m.num_heads is not None:
            raise ValueError(f"masks[{i}] is already per-head; per_head takes shared masks")
    return _PerHead(masks)
