"""Per-tile pieces of the blocked attention path (:mod:`jattn._blocked`): decoding the compacted
block lists, slicing a tile's bias / mask / segment ids, its visibility (incl. run-time block
masks), the score_mod traced per tile (its captured arrays hoisted for the custom VJP) and the
stick-breaking weights of a tile visited right to left."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jattn._common import Spec, score_mod_fn, score_mod_indices, split_heads, visible
from pallas_kernels import block_map as block_map_lib

F32 = jnp.float32


def _decode(entry):
    """``(key block, kind)`` of a compacted-list entry ``column * 4 + kind``."""
    return entry // block_map_lib.KIND_RADIX, entry % block_map_lib.KIND_RADIX


def _slice(x, start, size, axis):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _bias_block(bias, i0, j0, bq, bk):
    if bias is None:
        return None
    return lax.dynamic_slice_in_dim(_slice(bias, i0, bq, 2), j0, bk, axis=3)


def _sink_logits(spec: Spec, sinks):
    """``[1, Hkv, G, 1]`` fp32 sink logits."""
    return split_heads(sinks.astype(F32)[None, :, None], spec.num_kv_heads, spec.group)


def _tile_visibility(spec, i0, j0, bq, bk, dense_mask, seg_q_blk, seg_k, batch,
                     block_tile=None):
    q_idx = i0 + jnp.arange(bq, dtype=jnp.int32)
    k_idx = j0 + jnp.arange(bk, dtype=jnp.int32)
    dense_blk = None
    if dense_mask is not None:
        dense_blk = lax.dynamic_slice_in_dim(_slice(dense_mask, i0, bq, 2), j0, bk, axis=3)
    seg_k_blk = _slice(seg_k, j0, bk, 1)
    vis = visible(spec, q_idx, k_idx, dense_blk, seg_q_blk, seg_k_blk)
    if block_tile is not None:  # [B, Hkv, G]: this tile's run-time block-mask bits
        vis = vis & block_tile[..., None, None]
    return vis


def _block_tile(block_mask, i, j):
    """``block_mask [B, Hkv, G, nq, nk]`` at tile ``(i, j)``: ``[B, Hkv, G]`` (or None)."""
    return None if block_mask is None else block_mask[:, :, :, i, j]


def _zero_unselected(block_tile, x_blk):
    """``x_blk [B, bk, Hkv, D]`` with zeros for the kv heads whose query heads all skip this
    block: a skipped block's contents (NaN, inf) must not reach ``0 * x`` products."""
    if block_tile is None:
        return x_blk
    live = block_tile.any(axis=2)[:, None, :, None]  # [B, 1, Hkv, 1]
    return jnp.where(live, x_blk, 0.0)


def _convert_score_mod(spec: Spec, batch: int, bq: int, bk: int):
    """``(spec', consts)``: the score_mod traced at the tile shape with the traced arrays it
    closes over hoisted into ``consts`` (:func:`jax.closure_convert`), so the custom VJP below
    takes them as operands and returns their cotangents. Traced at the tile's exact shapes so
    the converted function is the user's broadcasting code, not a per-scalar map."""
    if spec.score_mod is None:
        return spec, ()
    s = jax.ShapeDtypeStruct((batch, spec.num_kv_heads, spec.group, bq, bk), F32)
    q_idx, k_idx = jnp.arange(bq), jnp.arange(bk)
    apply = score_mod_fn(spec, batch, q_idx, k_idx)
    jax.eval_shape(lambda s: apply(s, ()), s)  # a non-elementwise function fails here, named
    idx = [jax.ShapeDtypeStruct(x.shape, x.dtype)
           for x in score_mod_indices(spec, batch, q_idx, k_idx)]
    mod, consts = jax.closure_convert(spec.score_mod, s, *idx)
    return spec._replace(score_mod=mod), tuple(consts)


def _visit_order(norm, n, count):
    """Index into the compacted key-block list: ascending, except stick-breaking, which
    breaks the stick from the nearest key backwards (descending)."""
    return count - 1 - n if norm.rowwise == "stick_breaking" else n


def _reverse_cumsum(x):
    """``y_j = sum_{k >= j} x_k`` along the last axis."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)


def _stick_breaking_tile(s, vis, right):
    """Stick-breaking weights of a tile visited right to left (Tan et al. 2024).

    ``p_ij = sigmoid(s_ij) prod_{k > j visible} (1 - sigmoid(s_ik))`` in log space:
    ``log p_ij = log sigmoid(s_ij) + right_i + sum_{k > j in tile} log sigmoid(-s_ik)``, where
    ``right [.., tq]`` sums ``log sigmoid(-s)`` over the visible keys in blocks to the right.
    Returns ``(p, log_keep)`` with ``log_keep = log sigmoid(-s)`` (0 where invisible).
    """
    log_keep = jax.nn.log_sigmoid(-s)
    if vis is not None:
        log_keep = jnp.where(vis, log_keep, 0.0)
    after = right[..., None] + _reverse_cumsum(log_keep) - log_keep
    p = jnp.exp(jax.nn.log_sigmoid(s) + after)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    return p, log_keep


def _tile_score_mod(spec, batch, i0, j0, bq, bk, mod_consts):
    """``s0 -> score_mod(s0, ...)`` on the tile at ``(i0, j0)`` (None without a score_mod)."""
    apply = score_mod_fn(spec, batch, i0 + jnp.arange(bq, dtype=jnp.int32),
                         j0 + jnp.arange(bk, dtype=jnp.int32))
    return None if apply is None else (lambda s0: apply(s0, mod_consts))


def _differentiable(mod_consts):
    """Positions of the floating score_mod operands (the others get no cotangent)."""
    return tuple(n for n, c in enumerate(mod_consts) if jnp.issubdtype(c.dtype, jnp.inexact))
