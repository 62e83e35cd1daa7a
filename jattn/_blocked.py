"""Memory-efficient blocked attention in pure JAX (the ``"xla"`` implementation).

Flash-attention's algorithm (Dao et al., 2022; Dao, 2023) written with ``lax`` control flow:
queries are processed one block at a time (``lax.map``); for each query block a ``while`` loop
visits only the key blocks the block map marks non-empty, in ascending order (the compacted index
list JAX's splash attention uses), so empty blocks cost nothing. Full blocks take a branch that
never evaluates the mask; partial blocks evaluate the mask from indices. The ``[Tq, Tk]`` score
matrix never exists: peak temporary memory is one ``[B, H, block_q, block_kv]`` tile plus O(T)
accumulators.

The backward is a custom VJP that recomputes each tile from saved row statistics with
``di = rowsum(o * do)``, and accumulates dk/dv in place, so it is as memory-frugal as the forward.
For softmax it saves the running max ``m`` and ``log l`` separately and recomputes
``p = exp((s - m) - log l)``, never ``exp(s - lse)``: when the logits are huge (``|m| >> log l``,
e.g. a bias of -1e9 masking a row, or logits of 1e7) the fp32 sum ``lse = m + log l`` rounds
``log l`` away, and ``exp(s - lse)`` of ``l`` tied keys would be ``1`` instead of ``1 / l``. For
``relu`` the saved statistic is the visible-key count.

A ``score_mod`` is evaluated per tile with the tile's global indices (after the bias, before
the cap). The arrays it closes over are hoisted into explicit operands of the custom VJP with
``jax.closure_convert``; the backward pulls each tile's ``ds`` back through the score_mod with
``jax.vjp`` and adds those cotangents in the loops' fixed order (deterministic, no atomics).

Block maps (:mod:`pallas_kernels.block_map`) from the mask object, an explicit bool mask and
segment ids are ANDed (elementwise min of the 0/1/2 codes) and reduced over batch and heads: a
block is skipped when it is empty for every (batch, head) and treated as full when full for every
one of them. Per-head sparsity is
therefore exploited only up to the union over heads here; the Pallas kernel skips per head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn import masks as masks_lib
from jattn import normalizers as normalizers_lib
from jattn._blocked_tiles import (  # the per-tile helpers
    _bias_block,
    _block_tile,
    _convert_score_mod,
    _decode,
    _differentiable,
    _reverse_cumsum,
    _sink_logits,
    _slice,
    _stick_breaking_tile,
    _tile_score_mod,
    _tile_visibility,
    _visit_order,
    _zero_unselected,
)
from jattn._common import (
    Spec,
    merge_heads,
    raw_scores,
    scores,
    soft_cap,
    soft_cap_grad,
    split_heads,
)
from pallas_kernels import block_map as block_map_lib
from pallas_kernels.block_map import FULL

F32 = jnp.float32


def default_block_sizes(q_len: int, kv_len: int) -> tuple[int, int]:
    """Tiles of 512 on CPU-sized problems (large enough that each is a few BLAS calls).

    An empty sequence still gets a 1-wide tile: zero blocks of it, so the loops run zero times.
    """
    return max(1, min(512, q_len)), max(1, min(512, kv_len))


def block_table(spec: Spec, dense_mask, seg_q, seg_k, block_q: int, block_kv: int,
                block_mask=None):
    """Combined int8 block map ``[nq, nk]`` (empty/partial/full over all batches and heads).

    numpy (a trace-time constant) when every input map is static: always for a mask object
    alone, whose ``block_map`` is computed from Python ints. A run-time ``block_mask``
    (bool ``[B, Hq, nq, nk]``) enters as full (True) or empty (False) codes, so the table is
    traced then and compacted on device.
    """
    if spec.q_len == 0 or spec.kv_len == 0:  # nothing is visible: one empty block, never visited
        return np.zeros((_num_blocks(spec.q_len, block_q), _num_blocks(spec.kv_len, block_kv)),
                        np.int8)
    base = spec.mask if spec.mask is not None else masks_lib.full()
    mask_map = base.block_map(spec.q_len, spec.kv_len, block_q, block_kv)
    if (static_map := block_map_lib.concrete(mask_map)) is not None:  # a numpy constant
        mask_map = static_map
    maps = [mask_map.reshape((1,) * (4 - mask_map.ndim) + mask_map.shape)]  # [1, H|1, nq, nk]
    if dense_mask is not None:  # [Bm, Hm, nq, nk]
        maps.append(block_map_lib.dense_block_map(dense_mask, block_q, block_kv))
    if seg_q is not None:  # [B, 1, nq, nk]
        maps.append(block_map_lib.segment_block_map(seg_q, seg_k, block_q, block_kv)[:, None])
    if block_mask is not None:  # [B, Hq, nq, nk]
        maps.append(jnp.where(block_mask, block_map_lib.FULL, block_map_lib.EMPTY)
                    .astype(jnp.int8))
    return block_map_lib.collapse(block_map_lib.intersect(*maps), axes=(0, 1))


def _num_blocks(length: int, block: int) -> int:
    """Blocks covering ``length``; at least one, so the loops trace for an empty sequence (its
    one block is padding: invisible, never visited, sliced off)."""
    return max(1, -(-length // block))


def _pad_to(x, axis: int, size: int, value=0):
    if x is None or x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def attention(spec: Spec, q, k, v, bias, sinks, dense_mask, seg_q, seg_k,
              *, block_q: int | None = None, block_kv: int | None = None, block_mask=None):
    """Blocked attention. Returns ``out [B, Tq, Hq, Dv]`` (fp32) and the row stat ``[B, Hq, Tq]``.

    ``bias`` is ``[Bb, Hb, Tq, Tk]`` and ``dense_mask`` ``[Bm, Hm, Tq, Tk]`` (leading dims 1 or
    full), ``seg_q``/``seg_k`` ``[B, Tq]``/``[B, Tk]``; all optional. ``spec.score_mod`` is the
    user's function; it is closure-converted here (see :func:`_convert_score_mod`).

    ``block_mask``: optional bool ``[B, Hq, nq, nk]`` at ``(block_q, block_kv)`` (run-time block
    sparsity, possibly traced). A key block is visited when some (batch, head) needs it; inside
    a visited tile each (batch, head) still sees only its own blocks (the tile visibility ANDs
    ``block_mask``), and K/V of a kv head none of whose query heads selected the block are
    replaced by zeros, so whatever a skipped block holds (even NaN) never reaches the output or
    the gradients.
    """
    dq, dk = default_block_sizes(spec.q_len, spec.kv_len)
    bq, bk = block_q or dq, block_kv or dk
    nq, nk = _num_blocks(spec.q_len, bq), _num_blocks(spec.kv_len, bk)
    if block_mask is not None:
        block_mask = jnp.asarray(block_mask).astype(jnp.bool_)
        if block_mask.shape[-2:] != (nq, nk):
            raise ValueError(f"block_mask must have shape [B, Hq, nq={nq}, nk={nk}] for blocks "
                             f"({bq}, {bk}), got {block_mask.shape}")
    table = block_table(spec, dense_mask, seg_q, seg_k, bq, bk, block_mask)
    # For each query block: its non-empty key blocks, ascending (column * 4 + kind), and how
    # many there are. A static table is compacted on the host (no sort for XLA to fold).
    entries, counts = (jnp.asarray(x) for x in block_map_lib.compact(table))
    tq, tk = nq * bq, nk * bk
    q = _pad_to(q, 1, tq)
    k, v = _pad_to(k, 1, tk), _pad_to(v, 1, tk)
    bias = _pad_to(_pad_to(bias, 2, tq), 3, tk)
    dense_mask = _pad_to(_pad_to(dense_mask, 2, tq, False), 3, tk, False)
    seg_q, seg_k = _pad_to(seg_q, 1, tq), _pad_to(seg_k, 1, tk)
    spec, mod_consts = _convert_score_mod(spec, q.shape[0], bq, bk)
    if block_mask is not None:  # [B, Hq, nq, nk] -> [B, Hkv, G, nq, nk], the tiles' layout
        block_mask = jnp.broadcast_to(block_mask, (q.shape[0], spec.num_kv_heads * spec.group,
                                                   nq, nk))
        block_mask = split_heads(block_mask, spec.num_kv_heads, spec.group)
    out, stat = _core(spec, bq, bk, q, k, v, bias, sinks, dense_mask, seg_q, seg_k,
                      entries, counts, mod_consts, block_mask)
    return out[:, : spec.q_len], stat[..., : spec.q_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _core(spec, bq, bk, q, k, v, bias, sinks, dense_mask, seg_q, seg_k, entries, counts,
          mod_consts, block_mask=None):
    out, stat, _ = _forward(spec, bq, bk, q, k, v, bias, sinks, dense_mask, seg_q, seg_k,
                            entries, counts, mod_consts, block_mask)
    return out, stat


def _forward(spec, bq, bk, q, k, v, bias, sinks, dense_mask, seg_q, seg_k, entries, counts,
             mod_consts=(), block_mask=None):
    """``out [B, Tq, Hq, Dv]``, the public row stat ``[B, Hq, Tq]`` and, for softmax, the
    backward's ``(m, log_l)`` (each ``[B, Hkv, G, Tq]``; ``m = +inf``, ``log_l = 0`` on rows that
    see nothing, so every recomputed weight is exactly 0 there); for softpick ``(m, z)`` (the
    running max ``m >= 0`` and ``z = (sum |e^s - 1| + eps) e^{-m}``); else None."""
    b, tq, hq, d = q.shape
    dv = v.shape[-1]
    hkv, g = spec.num_kv_heads, spec.group
    norm = spec.normalizer
    nq = tq // bq

    def one_query_block(i):
        i0 = i * bq
        q_blk = _slice(q, i0, bq, 1).astype(F32).reshape(b, bq, hkv, g, d)
        seg_q_blk = _slice(seg_q, i0, bq, 1)
        row = (b, hkv, g, bq)
        if norm.softmax:
            m0 = jnp.full(row, -jnp.inf, F32)
            l0 = jnp.zeros(row, F32)
            if sinks is not None:  # the sink joins the denominator: start from exp(sink - m) = 1
                m0 = jnp.broadcast_to(_sink_logits(spec, sinks), row)
                l0 = jnp.ones(row, F32)
        else:
            m0, l0 = jnp.zeros(row, F32), jnp.zeros(row, F32)  # l counts visible keys
        acc0 = jnp.zeros(row + (dv,), F32)

        def visit(n, carry):
            j, kind = _decode(entries[i, _visit_order(norm, n, counts[i])])
            j0 = j * bk
            tile = _block_tile(block_mask, i, j)
            k_blk = _zero_unselected(tile, _slice(k, j0, bk, 1).astype(F32))
            v_blk = _zero_unselected(tile, _slice(v, j0, bk, 1).astype(F32))
            _, s = scores(spec, q_blk, k_blk, _bias_block(bias, i0, j0, bq, bk),
                          _tile_score_mod(spec, b, i0, j0, bq, bk, mod_consts))

            def update(vis):
                m, l, acc = carry
                if norm.softmax:
                    sm = s if vis is None else jnp.where(vis, s, -jnp.inf)
                    m_new = jnp.maximum(m, sm.max(-1))
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    p = jnp.exp(sm - m_safe[..., None])
                    alpha = jnp.exp(m - m_safe)
                    l_new = alpha * l + p.sum(-1)
                    acc = alpha[..., None] * acc
                elif norm.rowwise == "softpick":
                    # e^s - 1 = e^m (e^{s-m} - e^{-m}) with a running max m >= 0 (m0 = 0)
                    sm = s if vis is None else jnp.where(vis, s, -jnp.inf)
                    m_new = jnp.maximum(m, sm.max(-1))
                    diff = jnp.exp(sm - m_new[..., None]) - jnp.exp(-m_new)[..., None]
                    if vis is not None:
                        diff = jnp.where(vis, diff, 0.0)
                    alpha = jnp.exp(m - m_new)
                    p = jax.nn.relu(diff)
                    l_new = alpha * l + jnp.abs(diff).sum(-1)
                    acc = alpha[..., None] * acc
                elif norm.rowwise == "stick_breaking":  # l: sum of log(1 - beta) to the right
                    p, log_keep = _stick_breaking_tile(s, vis, l)
                    l_new, m_new = l + log_keep.sum(-1), m
                else:
                    p = norm.fn(s)
                    if vis is None:
                        l_new = l + bk
                    else:
                        p = jnp.where(vis, p, 0.0)
                        l_new = l + jnp.broadcast_to(vis, p.shape).sum(-1)
                    m_new = m
                acc = acc + jnp.einsum("bhgqk,bkhd->bhgqd", p, v_blk)
                return m_new, l_new, acc

            def partial(_):
                return update(_tile_visibility(spec, i0, j0, bq, bk, dense_mask, seg_q_blk,
                                               seg_k, b, tile))

            return lax.cond(kind == FULL, lambda _: update(None), partial, None)

        m, l, acc = lax.fori_loop(0, counts[i], visit, (m0, l0, acc0))
        if norm.softmax:
            seen = l > 0
            log_l = jnp.log(jnp.where(seen, l, 1.0))
            out = acc / jnp.where(seen, l, 1.0)[..., None]
            stat = jnp.where(seen, m + log_l, -jnp.inf)
            return out, stat, (jnp.where(seen, m, jnp.inf), log_l)
        if norm.rowwise == "stick_breaking":
            return acc, jnp.zeros_like(l), None
        if norm.rowwise == "softpick":  # z = (sum |e^s - 1| + eps) / e^m
            z = l + normalizers_lib.SOFTPICK_EPS * jnp.exp(-m)
            return acc / z[..., None], jnp.zeros_like(l), (m, z)
        if norm.divide_by_count:
            return acc / jnp.maximum(l, 1.0)[..., None], l, None
        return acc, jnp.zeros_like(l), None

    out, stat, max_and_log_sum = lax.map(one_query_block, jnp.arange(nq, dtype=jnp.int32))
    # [nq, B, Hkv, G, bq, Dv] -> [B, nq * bq, Hq, Dv];  [nq, B, Hkv, G, bq] -> [B, Hq, nq * bq]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tq, hq, dv)
    stat = stat.transpose(1, 2, 3, 0, 4).reshape(b, hq, tq)
    rows = lambda x: x.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, tq)  # noqa: E731
    return out, stat, jax.tree.map(rows, max_and_log_sum)


def _core_fwd(spec, bq, bk, q, k, v, bias, sinks, dense_mask, seg_q, seg_k, entries, counts,
              mod_consts, block_mask=None):
    out, stat, max_and_log_sum = _forward(spec, bq, bk, q, k, v, bias, sinks, dense_mask, seg_q,
                                          seg_k, entries, counts, mod_consts, block_mask)
    res = (q, k, v, bias, sinks, dense_mask, seg_q, seg_k, entries, counts, out, stat,
           max_and_log_sum, mod_consts, block_mask)
    return (out, stat), res


def _core_bwd(spec, bq, bk, res, cotangents):
    """Cotangents of ``_core``'s operands. ``res`` may omit the trailing ``mod_consts`` and
    ``block_mask`` (callers without a score_mod, e.g. the context-parallel hops); the result
    then ends at ``counts``."""
    (q, k, v, bias, sinks, dense_mask, seg_q, seg_k, entries, counts, out, stat,
     max_and_log_sum, *rest) = res
    mod_consts = rest[0] if rest else ()
    block_mask = rest[1] if len(rest) > 1 else None
    # Floating operands of the score_mod: their cotangent is the tile VJP of the score_mod,
    # summed over tiles in the loops' fixed order (no scatter across tiles: deterministic).
    diff_pos = _differentiable(mod_consts)
    diff_consts = tuple(mod_consts[n] for n in diff_pos)
    d_out, d_stat = cotangents
    b, tq, hq, d = q.shape
    dv_dim = v.shape[-1]
    hkv, g = spec.num_kv_heads, spec.group
    norm = spec.normalizer
    nq = tq // bq
    to_rows = lambda x: split_heads(x, hkv, g)  # [B, Hq, T] -> [B, Hkv, G, T]
    d_out = d_out.astype(F32)
    # di = rowsum(o * do): the softmax Jacobian's diagonal correction, O(T) memory.
    di = to_rows(jnp.einsum("bqhd,bqhd->bhq", d_out, out))
    stat_r = to_rows(stat)
    d_stat_r = to_rows(d_stat.astype(F32)) if norm.softmax else None
    # p = exp((s - m) - log l): see the module docstring for why not exp(s - lse).
    # softmax: (m, log l); softpick: (m, z), see _forward
    m_r, log_l_r = max_and_log_sum if max_and_log_sum is not None else (None, None)

    def one_query_block(carry, i):
        dk_acc, dv_acc, dbias_acc, dmod_acc = carry
        i0 = i * bq
        q_blk = _slice(q, i0, bq, 1).astype(F32).reshape(b, bq, hkv, g, d)
        do_blk = _slice(d_out, i0, bq, 1).reshape(b, bq, hkv, g, dv_dim)
        seg_q_blk = _slice(seg_q, i0, bq, 1)
        rows = lambda x: None if x is None else lax.dynamic_slice_in_dim(x, i0, bq, axis=3)
        di_blk, stat_blk, dstat_blk = rows(di), rows(stat_r), rows(d_stat_r)
        m_blk, log_l_blk = rows(m_r), rows(log_l_r)

        def visit(n, c):
            dq_blk, dk_acc, dv_acc, dbias_acc, dmod_acc, right = c
            j, kind = _decode(entries[i, _visit_order(norm, n, counts[i])])
            j0 = j * bk
            tile = _block_tile(block_mask, i, j)
            k_blk = _zero_unselected(tile, _slice(k, j0, bk, 1).astype(F32))
            v_blk = _zero_unselected(tile, _slice(v, j0, bk, 1).astype(F32))
            s_raw = raw_scores(spec, q_blk, k_blk, _bias_block(bias, i0, j0, bq, bk))
            mod_vjp = None
            if spec.score_mod is not None:
                def modded(s_in, diff):
                    consts = list(mod_consts)
                    for n_, x in zip(diff_pos, diff, strict=True):
                        consts[n_] = x
                    return _tile_score_mod(spec, b, i0, j0, bq, bk, tuple(consts))(s_in)

                s_raw, mod_vjp = jax.vjp(modded, s_raw, diff_consts)
            s = soft_cap(spec, s_raw)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_blk, v_blk)

            def weights_and_ds(vis):
                if norm.softmax:
                    p = jnp.exp((s - m_blk[..., None]) - log_l_blk[..., None])
                    if vis is not None:
                        p = jnp.where(vis, p, 0.0)
                    ds = p * (dp - di_blk[..., None] + dstat_blk[..., None])
                elif norm.rowwise == "softpick":
                    # p = relu(e^s - 1) / Z, Z = sum |e^s - 1| + eps, and sum_j p dp = di:
                    # ds = e^s / Z * ([s > 0] dp - sign(s) di), with e^s / Z = e^{s-m} / z
                    m_, z_ = m_blk[..., None], log_l_blk[..., None]
                    e = jnp.exp(s - m_) / z_
                    p = jax.nn.relu(jnp.exp(s - m_) - jnp.exp(-m_)) / z_
                    ds = e * (jnp.where(s > 0, dp, 0.0) - jnp.sign(s) * di_blk[..., None])
                    if vis is not None:
                        p, ds = jnp.where(vis, p, 0.0), jnp.where(vis, ds, 0.0)
                elif norm.rowwise == "stick_breaking":
                    # right = (sum of log(1 - beta), sum of g = p dp) over keys to the right.
                    # d log p_ij / d s_ik = (1 - beta_ik) [k = j] - beta_ik [j < k], so
                    # ds_ik = g_ik (1 - beta_ik) - beta_ik sum_{j < k} g_ij, and
                    # sum_{j < k} g_ij = di_i - sum_{j >= k} g_ij (sum_j g_ij = do . o = di).
                    right_keep, right_g = right
                    p, log_keep = _stick_breaking_tile(s, vis, right_keep)
                    gp = p * dp
                    before = di_blk[..., None] - (right_g[..., None] + _reverse_cumsum(gp))
                    ds = gp * jax.nn.sigmoid(-s) - jax.nn.sigmoid(s) * before
                    if vis is not None:
                        ds = jnp.where(vis, ds, 0.0)
                    cap = soft_cap_grad(spec, s)
                    return p, ds if cap is None else ds * cap, (
                        right_keep + log_keep.sum(-1), right_g + gp.sum(-1))
                else:
                    p, dfds = norm.fn(s), norm.grad(s)
                    if vis is not None:
                        p, dfds = jnp.where(vis, p, 0.0), jnp.where(vis, dfds, 0.0)
                    if norm.divide_by_count:
                        inv = 1.0 / jnp.maximum(stat_blk, 1.0)[..., None]
                        p, dfds = p * inv, dfds * inv
                    ds = dp * dfds
                cap = soft_cap_grad(spec, s)
                return p, ds if cap is None else ds * cap, right

            def partial(_):
                return weights_and_ds(_tile_visibility(spec, i0, j0, bq, bk, dense_mask,
                                                       seg_q_blk, seg_k, b, tile))

            p, ds, right = lax.cond(kind == FULL,
                                    lambda _: weights_and_ds(None), partial, None)
            if mod_vjp is not None:  # ds is d/d(score_mod output): pull it back to s_raw
                ds, dmod_blk = mod_vjp(ds)
                dmod_acc = jax.tree.map(jnp.add, dmod_acc, dmod_blk)
            dq_blk = dq_blk + spec.scale * jnp.einsum("bhgqk,bkhd->bqhgd", ds, k_blk)
            dk_blk = spec.scale * jnp.einsum("bhgqk,bqhgd->bkhd", ds, q_blk)
            dv_blk = jnp.einsum("bhgqk,bqhgd->bkhd", p, do_blk)
            dk_acc = lax.dynamic_update_slice_in_dim(
                dk_acc, _slice(dk_acc, j0, bk, 1) + dk_blk, j0, axis=1)
            dv_acc = lax.dynamic_update_slice_in_dim(
                dv_acc, _slice(dv_acc, j0, bk, 1) + dv_blk, j0, axis=1)
            if dbias_acc is not None:
                db = merge_heads(ds)  # [B, Hq, bq, bk] -> the bias's broadcast shape
                if dbias_acc.shape[0] == 1:
                    db = db.sum(0, keepdims=True)
                if dbias_acc.shape[1] == 1:
                    db = db.sum(1, keepdims=True)
                cur = _bias_block(dbias_acc, i0, j0, bq, bk)
                dbias_acc = lax.dynamic_update_slice(dbias_acc, cur + db, (0, 0, i0, j0))
            return dq_blk, dk_acc, dv_acc, dbias_acc, dmod_acc, right

        dq0 = jnp.zeros((b, bq, hkv, g, d), F32)
        right0 = ()  # per-row sums over the blocks already visited (stick-breaking)
        if norm.rowwise == "stick_breaking":
            right0 = (jnp.zeros((b, hkv, g, bq), F32), jnp.zeros((b, hkv, g, bq), F32))
        dq_blk, dk_acc, dv_acc, dbias_acc, dmod_acc, _ = lax.fori_loop(
            0, counts[i], visit, (dq0, dk_acc, dv_acc, dbias_acc, dmod_acc, right0))
        dsink_blk = None
        if sinks is not None:  # d out / d sink = -p_sink * out, d lse / d sink = p_sink
            p_sink = jnp.exp((_sink_logits(spec, sinks) - m_blk) - log_l_blk)
            dsink_blk = jnp.sum(p_sink * (dstat_blk - di_blk), axis=(0, 3)).reshape(hq)
        return (dk_acc, dv_acc, dbias_acc, dmod_acc), (dq_blk, dsink_blk)

    init = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32),
            None if bias is None else jnp.zeros(bias.shape, F32),
            tuple(jnp.zeros_like(x) for x in diff_consts))
    (dk, dv, dbias, dmod), (dq, dsinks) = lax.scan(one_query_block, init,
                                                   jnp.arange(nq, dtype=jnp.int32))
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(b, tq, hq, d).astype(q.dtype)
    dsinks = None if sinks is None else dsinks.sum(0).astype(sinks.dtype)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    grads = (dq, dk.astype(k.dtype), dv.astype(v.dtype), dbias, dsinks,
             None, None, None, None, None)
    if not rest:
        return grads
    dconsts = [None] * len(mod_consts)
    for n_, x in zip(diff_pos, dmod, strict=True):
        dconsts[n_] = x
    return grads + (tuple(dconsts), None)


_core.defvjp(_core_fwd, _core_bwd)
