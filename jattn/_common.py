"""Pieces shared by the reference and blocked softmax-family implementations.

Heads are handled in the grouped layout ``[B, Hkv, G, Tq, Tk]`` (``G = Hq // Hkv``): query head
``h`` is ``(h // G, h % G)``, so grouped-query attention never copies k or v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.masks import Mask
from jattn.normalizers import Normalizer
from jattn.score_mods import check_elementwise


class Spec(NamedTuple):
    """Static description of one attention call (hashable: safe as a custom_vjp static arg)."""

    mask: Mask | None
    normalizer: Normalizer
    scale: float
    soft_cap: float | None
    q_len: int
    kv_len: int
    num_kv_heads: int
    group: int
    has_bias: bool
    has_dense_mask: bool
    has_segments: bool
    has_sinks: bool
    # ``score_mod`` after ``jax.closure_convert``: ``f(s, b, h, q_idx, kv_idx, *consts)``, where
    # ``consts`` (the arrays the user's function closed over) travel as explicit operands.
    score_mod: Callable | None = None


def split_heads(x: jax.Array, num_kv_heads: int, group: int) -> jax.Array:
    """``[Bx, Hx, ...]`` with ``Hx`` in {1, Hq} -> ``[Bx, Hkv|1, G|1, ...]``."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape((x.shape[0], num_kv_heads, group) + x.shape[2:])


def merge_heads(x: jax.Array) -> jax.Array:
    """``[B, Hkv, G, ...]`` -> ``[B, Hq, ...]``."""
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def scores(spec: Spec, q, k, bias_blk, mod=None):
    """Pre-cap scores ``s0 = mod(scale * q.k (+ bias))`` and capped ``s``, both fp32.

    q: ``[B, tq, Hkv, G, D]``, k: ``[B, tk, Hkv, D]``, bias_blk: ``[Bb, Hb, tq, tk]`` or None.
    ``mod``: None or a function of the raw scores applying the score_mod (see
    :func:`score_mod_fn`). Returns ``[B, Hkv, G, tq, tk]`` arrays.
    """
    s0 = raw_scores(spec, q, k, bias_blk)
    if mod is not None:
        s0 = mod(s0)
    return s0, soft_cap(spec, s0)


def raw_scores(spec: Spec, q, k, bias_blk):
    """``scale * q.k (+ bias)`` in fp32, ``[B, Hkv, G, tq, tk]`` (before score_mod and cap)."""
    s0 = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    s0 = s0 * spec.scale
    if bias_blk is not None:
        s0 = s0 + split_heads(bias_blk.astype(jnp.float32), spec.num_kv_heads, spec.group)
    return s0


def soft_cap(spec: Spec, s0):
    """``c tanh(s0 / c)`` if ``spec.soft_cap = c`` else ``s0``."""
    if spec.soft_cap is None:
        return s0
    return spec.soft_cap * jnp.tanh(s0 / spec.soft_cap)


def score_mod_indices(spec: Spec, batch: int, q_idx, k_idx):
    """``(b, h, q_idx, kv_idx)`` int32 arrays broadcasting against a ``[B, Hkv, G, tq, tk]`` tile.

    Global batch index, query head ``h = hkv * G + g``, and the tile's global positions
    (``q_idx [tq]``, ``k_idx [tk]``). Positions of padding rows/columns are clamped into the
    sequence, so a score_mod that gathers by position never reads out of bounds (padding is
    masked afterwards anyway).
    """
    hq = spec.num_kv_heads * spec.group
    b = jnp.arange(batch, dtype=jnp.int32).reshape(batch, 1, 1, 1, 1)
    h = jnp.arange(hq, dtype=jnp.int32).reshape(1, spec.num_kv_heads, spec.group, 1, 1)
    qi = jnp.minimum(q_idx.astype(jnp.int32), max(spec.q_len - 1, 0))
    ki = jnp.minimum(k_idx.astype(jnp.int32), max(spec.kv_len - 1, 0))
    return b, h, qi.reshape(1, 1, 1, -1, 1), ki.reshape(1, 1, 1, 1, -1)


def score_mod_fn(spec: Spec, batch: int, q_idx, k_idx):
    """``apply(s, consts) = score_mod(s, b, h, q_idx, kv_idx, *consts)`` on a tile (or None).

    ``s`` is ``[B, Hkv, G, tq, tk]``; indices from :func:`score_mod_indices`. ``consts`` are the
    operands a closure-converted score_mod takes after the indices (``()`` for the user's own
    function, which the reference path calls directly).
    """
    if spec.score_mod is None:
        return None
    fn = spec.score_mod
    idx = score_mod_indices(spec, batch, q_idx, k_idx)

    def apply(s, consts):
        check_elementwise(fn, s, *idx, *consts)
        out = fn(s, *idx, *consts)
        if jnp.shape(out) != s.shape:  # e.g. a reduction, which a scalar trace cannot see
            name = getattr(fn, "__qualname__", repr(fn))
            raise TypeError(f"score_mod {name} must be elementwise (one output per score): on "
                            f"a score tile of shape {s.shape} it returned shape "
                            f"{jnp.shape(out)}")
        return out.astype(jnp.float32)

    return apply


def soft_cap_grad(spec: Spec, s):
    """``d s / d s0`` for the capped scores ``s = c tanh(s0 / c)``."""
    if spec.soft_cap is None:
        return None
    return 1.0 - jnp.square(s / spec.soft_cap)


def visible(spec: Spec, q_idx, k_idx, dense_blk, seg_q_blk, seg_k_blk):
    """Visibility of keys ``k_idx [tk]`` for queries ``q_idx [tq]``, broadcastable to
    ``[B, Hkv, G, tq, tk]``; includes the sequence bounds (padding is never visible)."""
    qi, ki = q_idx[:, None], k_idx[None, :]
    vis = (qi < spec.q_len) & (ki < spec.kv_len)
    vis = vis[None, None, None]
    if spec.mask is not None:
        hq = spec.mask.num_heads
        if hq is None:
            m = spec.mask.visible(qi, ki, 0, q_len=spec.q_len, kv_len=spec.kv_len)
            vis = vis & m[None, None, None]
        else:
            h = jnp.arange(hq, dtype=jnp.int32)[:, None, None]
            m = spec.mask.visible(qi[None], ki[None], h, q_len=spec.q_len, kv_len=spec.kv_len)
            vis = vis & m.reshape(1, spec.num_kv_heads, spec.group, *m.shape[1:])
    if dense_blk is not None:
        vis = vis & split_heads(dense_blk, spec.num_kv_heads, spec.group)
    if seg_q_blk is not None:
        same = seg_q_blk[:, :, None] == seg_k_blk[:, None, :]
        vis = vis & same[:, None, None]
    return vis
