"""A blocked loop over ``(query block, key block)`` tiles for the variants' ``"xla"`` forms.

The variants (clipped softmax, signed softmax, top-theta, GPSA, multi-token attention) each
stream a few per-row accumulators over key tiles, like flash attention, but with formulas that
differ from :mod:`jattn._blocked`'s hand-written VJP. Their gradients come from autodiff through
rematerialized loops instead: ``lax.map`` over query blocks and ``lax.scan`` over key blocks,
each body under :func:`jax.checkpoint`, so the backward recomputes a tile's scores rather than
storing them. Peak memory is O(T * block) (one ``[B, H, block_q, block_kv]`` tile, the carries
of one query block's scan, O(T) row statistics); the ``[Tq, Tk]`` score matrix never exists.

Key blocks the block map (mask object, bool mask, segment ids) marks empty are skipped with
``lax.cond``; the scan still has ``nk`` steps (a static trip count, which reverse-mode autodiff
needs), so skipping saves the tile's FLOPs, not the loop overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn import _blocked
from jattn._blocked_tiles import _bias_block, _slice, _tile_visibility
from jattn._common import Spec, scores, visible
from pallas_kernels.block_map import EMPTY

F32 = jnp.float32


class Tile(NamedTuple):
    """One ``(query block, key block)`` tile, fp32, grouped-head layout.

    ``q [B, bq, Hkv, G, D]``, ``k [B, bk, Hkv, D]``, ``v [B, bk, Hkv, Dv]``; ``vis`` bool,
    broadcastable to ``[B, Hkv, G, bq, bk]`` (mask, segments, sequence bounds); ``q_idx [bq]``,
    ``k_idx [bk]`` global positions (padding beyond the sequence is never visible).
    """

    i0: jax.Array
    j0: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    vis: jax.Array
    q_idx: jax.Array
    k_idx: jax.Array
    bias: jax.Array | None = None  # [Bb, Hb, bq, bk]


def tile_scores(spec: Spec, tile: Tile) -> jax.Array:
    """``scale * q.k (+ bias)`` (soft-capped if the spec says so), ``[B, Hkv, G, bq, bk]``."""
    return scores(spec, tile.q, tile.k, tile.bias)[1]


def dense_scores(spec: Spec, q, k, bias, dense_mask, seg_q=None, seg_k=None):
    """The reference forms' materialized ``s [B, Hkv, G, Tq, Tk]`` and visibility (same shape)."""
    qg = q.astype(F32).reshape(q.shape[:2] + (spec.num_kv_heads, spec.group, q.shape[-1]))
    s = scores(spec, qg, k.astype(F32), bias)[1]
    q_idx = jnp.arange(spec.q_len, dtype=jnp.int32)
    k_idx = jnp.arange(spec.kv_len, dtype=jnp.int32)
    vis = visible(spec, q_idx, k_idx, dense_mask, seg_q, seg_k)
    return s, jnp.broadcast_to(vis, s.shape)


def to_output(x: jax.Array) -> jax.Array:
    """``[B, Hkv, G, Tq, Dv]`` -> ``[B, Tq, Hq, Dv]``."""
    b, hkv, g, t, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d)


def block_sizes(spec: Spec, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
    """Tile sizes: the blocked path's defaults unless given (positive ints)."""
    dq, dk = _blocked.default_block_sizes(spec.q_len, spec.kv_len)
    out = []
    for name, given, default in (("block_q", block_q, dq), ("block_kv", block_kv, dk)):
        if given is None:
            out.append(default)
        elif isinstance(given, bool) or not isinstance(given, int | np.integer) or given < 1:
            raise ValueError(f"{name} must be a positive int or None, got {given!r}")
        else:
            out.append(int(given))
    return out[0], out[1]


def tile_loop(spec: Spec, q, k, v, bias, dense_mask, *, block_q: int, block_kv: int,
              init: Callable[[tuple[int, ...]], Any],
              step: Callable[[Any, Tile, Any], Any],
              finish: Callable[[Any, Any], Any],
              rows: Any = None) -> Any:
    """Run ``step`` over every non-empty tile, one query block at a time.

    Args:
      init: ``init(row_shape)`` -> the carry of one query block (``row_shape = (B, Hkv, G,
        bq)``).
      step: ``step(carry, tile, rows_blk) -> carry`` for one visited tile.
      finish: ``finish(carry, rows_blk) -> pytree`` of arrays ``[B, Hkv, G, bq, ...]``.
      rows: a pytree of per-row arrays ``[B, Hkv, G, Tq, ...]`` (e.g. a first pass's
        log-sum-exp); each query block gets its ``[.., bq, ..]`` slice as ``rows_blk``.

    Returns ``finish``'s pytree reassembled to ``[B, Hkv, G, Tq, ...]``.
    """
    bq, bk = block_q, block_kv
    nq, nk = _blocked._num_blocks(spec.q_len, bq), _blocked._num_blocks(spec.kv_len, bk)
    seg_q = seg_k = None  # the variants take no segment ids
    table = jnp.asarray(_blocked.block_table(spec, dense_mask, seg_q, seg_k, bq, bk))
    tq, tk = nq * bq, nk * bk
    pad = _blocked._pad_to
    q, k, v = pad(q, 1, tq), pad(k, 1, tk), pad(v, 1, tk)
    dense_mask = pad(pad(dense_mask, 2, tq, False), 3, tk, False)
    bias = pad(pad(bias, 2, tq), 3, tk)
    rows = jax.tree.map(lambda x: pad(x, 3, tq), rows)
    b, hkv, g = q.shape[0], spec.num_kv_heads, spec.group
    row_shape = (b, hkv, g, bq)

    @jax.checkpoint
    def one_query_block(i):
        i0 = i * bq
        q_blk = _slice(q, i0, bq, 1).astype(F32).reshape(b, bq, hkv, g, q.shape[-1])
        seg_q_blk = _slice(seg_q, i0, bq, 1)
        rows_blk = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, i0, bq, axis=3), rows)

        @jax.checkpoint
        def visit(carry, j):
            j0 = j * bk

            def live(c):
                vis = _tile_visibility(spec, i0, j0, bq, bk, dense_mask, seg_q_blk, seg_k, b)
                tile = Tile(i0, j0, q_blk, _slice(k, j0, bk, 1).astype(F32),
                            _slice(v, j0, bk, 1).astype(F32), vis,
                            i0 + jnp.arange(bq, dtype=jnp.int32),
                            j0 + jnp.arange(bk, dtype=jnp.int32),
                            _bias_block(bias, i0, j0, bq, bk))
                return step(c, tile, rows_blk)

            return lax.cond(table[i, j] != EMPTY, live, lambda c: c, carry), None

        carry, _ = lax.scan(visit, init(row_shape), jnp.arange(nk, dtype=jnp.int32))
        return finish(carry, rows_blk)

    out = lax.map(one_query_block, jnp.arange(nq, dtype=jnp.int32))

    def assemble(x):  # [nq, B, Hkv, G, bq, ...] -> [B, Hkv, G, Tq, ...]
        x = jnp.moveaxis(x, 0, 3)
        return x.reshape(x.shape[:3] + (tq,) + x.shape[5:])[:, :, :, : spec.q_len]

    return jax.tree.map(assemble, out)


# --- online softmax over tiles (Milakov & Gimelshein 2018; flash attention) --------------------
def softmax_init(row_shape: tuple[int, ...], dv: int):
    """Carry ``(m, l, acc)``: running max (-inf), sum of ``e^{x - m}`` (0), ``[.., Dv]`` (0)."""
    return (jnp.full(row_shape, -jnp.inf, F32), jnp.zeros(row_shape, F32),
            jnp.zeros(row_shape + (dv,), F32))


def softmax_step(carry, logits, vis, v, sign=None):
    """Fold one tile into ``(m, l, acc)``: ``acc += (sign *) e^{x - m} @ v`` over visible keys.

    ``logits [B, Hkv, G, bq, bk]``; ``v [B, bk, Hkv, Dv]`` (None: statistics only, ``acc``
    unchanged); ``sign`` (same shape as logits or None) multiplies the weights in the value
    product only (the signed softmax of Cog attention).
    The running max is a constant for autodiff (the result does not depend on it).
    """
    m, l, acc = carry
    x = jnp.where(vis, logits, -jnp.inf)
    m_new = lax.stop_gradient(jnp.maximum(m, x.max(-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e = jnp.exp(x - m_safe[..., None])  # exactly 0 on invisible keys, with a 0 gradient
    alpha = jnp.exp(m - m_safe)
    if v is not None:
        w = e if sign is None else sign * e
        acc = alpha[..., None] * acc + jnp.einsum("bhgqk,bkhd->bhgqd", w, v)
    return m_new, alpha * l + e.sum(-1), acc


def softmax_finish(carry):
    """``(out [.., Dv], lse [..])`` of a folded row; rows that saw no key: 0 and -inf."""
    m, l, acc = carry
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return acc / l_safe[..., None], jnp.where(seen, m_safe + jnp.log(l_safe), -jnp.inf)


def dense_softmax(logits, vis):
    """Row softmax over visible entries; 0 on rows with none (the reference forms)."""
    x = jnp.where(vis, logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True, initial=-jnp.inf))
    e = jnp.exp(x - jnp.where(jnp.isfinite(m), m, 0.0))
    z = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(z > 0, z, 1.0)


def weighted_values(p, v):
    """``p [B, Hkv, G, Tq, Tk] @ v [B, Tk, Hkv, Dv]`` -> ``[B, Tq, Hq, Dv]`` (fp32)."""
    return to_output(jnp.einsum("bhgqk,bkhd->bhgqd", p, v.astype(F32)))
