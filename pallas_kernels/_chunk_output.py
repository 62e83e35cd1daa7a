"""Parallel passes of the chunked backbone over (bh, chunk): ``output_fwd`` (``o``),
``dlocal_bwd`` (``scale * A^T do``, delta rule) and ``grads_bwd`` (``dq, dk, d delta, dG, dw``).
See ``_chunk_common`` for the math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._chunk_common import (
    F32,
    ChunkSegments,
    _gram,
    _mm,
    _par_call,
    _rows,
    keep_rows,
    split_seg,
    with_seg,
)

# ----------------------------------------------------------------------------- parallel


def output_fwd(cfg, q, k, d, g, hs, seg=None):
    """``o = scale * [(q e^G) h_c + A delta]`` per chunk, in q's dtype (with ``seg``: only
    first-segment rows read ``h_c``, ``A`` is 0 across segments)."""
    s, nb, dt, scale = cfg.sub, cfg.chunk // cfg.sub, q.dtype, cfg.scale

    def kernel(*refs):
        (q_ref, k_ref, d_ref, g_ref), seg_ref, (h_ref, o_ref) = split_seg(refs, 4, seg)
        sg = ChunkSegments(seg_ref, s)
        k_all, g_all, d_all, h = k_ref[...], g_ref[...], d_ref[...], h_ref[...]
        for i in range(nb):
            same, first, _ = sg.block(i)
            q_i, g_i, k_i = q_ref[_rows(i, s), :], g_ref[_rows(i, s), :], k_ref[_rows(i, s), :]
            a_i, _ = _gram(cfg.gate, q_i, g_i, k_all, g_all, k_i, g_i, i, s, "lower", same=same)
            qg = keep_rows(q_i.astype(F32) * jnp.exp(g_i), first)
            o = _mm(qg, h, tb=True, dtype=dt) + _mm(a_i, d_all, dtype=dt)
            o_ref[_rows(i, s), :] = (scale * o).astype(o_ref.dtype)

    out = [jax.ShapeDtypeStruct(d.shape[:2] + (d.shape[-1],), dt)]
    # V tiles are parallel programs (fla's chunk_fwd_o grid): each recomputes the [C, C]
    # Gram but holds a [bv, K] state tile instead of [V, K] (GPU registers); see output_tile.
    return _par_call(cfg, kernel, "chunk_output_fwd", with_seg([q, k, d, g], seg), [hs], out,
                     bv=output_tile(cfg, d.shape[-1]), tiled=(("in", 2), ("out", 0)))[0]


def output_tile(cfg, vdim):
    """V tile of the output pass, or None (full V). GPU: 64 (a [64, K] fp32 state tile per
    program, fla's BV) for scalar or no gates, whose Gram is one masked matmul; per-channel
    gates keep the full V, since every V tile would redo the sub-blocked Gram (fla instead
    stores the intra-chunk matrix from a separate kernel). TPU: full V (the (BH, N) grid
    already has ample programs for the cores; a V tile would redo the Gram). Interpret mode:
    16, so that the tests exercise the tiling for every gate kind. Untuned: no GPU measured."""
    if cfg.target == "tpu" or (cfg.target == "gpu" and cfg.gate == "channel"):
        return None
    size = 64 if cfg.target == "gpu" else 16
    return size if vdim % size == 0 and vdim > size else None


def dlocal_bwd(cfg, q, k, g, do, seg=None):
    """``scale * A^T do`` per chunk (the intra-chunk part of d delta), fp32."""
    s, nb, dt, scale = cfg.sub, cfg.chunk // cfg.sub, q.dtype, cfg.scale

    def kernel(*refs):
        (q_ref, k_ref, g_ref, do_ref), seg_ref, (o_ref,) = split_seg(refs, 4, seg)
        sg = ChunkSegments(seg_ref, s)
        q_all, ng_all, do_all = q_ref[...], -g_ref[...], do_ref[...]
        for i in range(nb):
            same, _, _ = sg.block(i)
            k_i, ng_i, q_i = k_ref[_rows(i, s), :], -g_ref[_rows(i, s), :], q_ref[_rows(i, s), :]
            at_i, _ = _gram(cfg.gate, k_i, ng_i, q_all, ng_all, q_i, ng_i, i, s, "upper",
                            same=same)
            o_ref[_rows(i, s), :] = scale * _mm(at_i, do_all, dtype=dt)

    out = [jax.ShapeDtypeStruct(do.shape, F32)]
    return _par_call(cfg, kernel, "chunk_dlocal_bwd", with_seg([q, k, g, do], seg), [], out)[0]


def grads_bwd(cfg, q, k, d, g, do, hs, dhs, dd_full=None, seg=None):
    """Per-chunk gradients ``dq, dk, d delta, dG`` (+ ``dw`` when ``dd_full`` is given).

    ``dG`` is w.r.t. the within-chunk cumulative gate ``G`` (the caller's ``cumsum``
    autodiff turns it into ``dg``): ``dG = q dq - k dk`` plus, on the chunk's last row,
    ``sum_v h dh e^{G_last} + sum_j k_j dk^state_j`` from ``h_{c+1}``'s dependence on
    ``G_last``; pairs whose two terms cancel exactly (weight ``e^0``) are left out.
    """
    s, nb, dt, scale = cfg.sub, cfg.chunk // cfg.sub, q.dtype, cfg.scale
    delta = dd_full is not None

    def kernel(*refs):
        ins, seg_ref, rest = split_seg(refs, 6 if delta else 5, seg)
        sg = ChunkSegments(seg_ref, s)
        if delta:
            q_ref, k_ref, d_ref, g_ref, do_ref, ddf_ref = ins
            h_ref, dh_ref, dq_ref, dk_ref, dg_ref, dw_ref = rest
        else:
            q_ref, k_ref, d_ref, g_ref, do_ref = ins
            h_ref, dh_ref, dq_ref, dk_ref, dd_ref, dg_ref = rest
        q_all, k_all, d_all, do_all = q_ref[...], k_ref[...], d_ref[...], do_ref[...]
        g_all = g_ref[...]
        ng_all = -g_all
        h, dh = h_ref[...], dh_ref[...]
        c = g_all.shape[0]
        gl = g_ref[pl.ds(c - 1, 1), :]
        # Row whose k enters h_{c+1} with weight e^{G_last - G_j} = e^0: the chunk's last
        # real row (padded steps have g = 0). Its dG terms -k dk_state (own row) and +k
        # dk_state (G_last, on the same row here) cancel exactly: both are left out, and
        # the G_last terms are put on that row (rows after it are padding).
        last = c - 1
        if cfg.t_real:
            last = jnp.minimum(c - 1, cfg.t_real - 1 - pl.program_id(1) * c)
        rows_all = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
        # Segments: only last-segment rows reach h_{c+1}; h_c survives iff no restart.
        dks_all = jnp.exp(jnp.minimum(gl - g_all, 0.0)) * _mm(d_all, dh, dtype=dt)
        dks_all = keep_rows(jnp.where(rows_all == last, 0.0, dks_all), sg.last)
        extra = keep_rows(jnp.sum(h * dh, axis=0, keepdims=True) * jnp.exp(gl), sg.keep)
        extra = extra + jnp.sum(k_all.astype(F32) * dks_all, axis=0, keepdims=True)
        for i in range(nb):
            same, first, last_i = sg.block(i)
            rows = _rows(i, s)
            q_i, k_i, g_i = q_ref[rows, :], k_ref[rows, :], g_ref[rows, :]
            d_i, do_i = d_ref[rows, :], do_ref[rows, :]
            # dq: rows i, contraction over keys j <= i. The diagonal pair (i == j, weight
            # e^0 = 1) is added separately: its dG terms q_i dA_ii k_i - k_i dA_ii q_i cancel
            # exactly, so dG is formed without them (no O(1) cancellation under strong decay,
            # where the true dG is ~e^-30).
            da_i = scale * _mm(do_i, d_all, tb=True, dtype=dt)
            cols = lax.broadcasted_iota(jnp.int32, da_i.shape, 1)
            p_glob = i * s + lax.broadcasted_iota(jnp.int32, (s, 1), 0)
            da_ii = jnp.sum(jnp.where(cols == p_glob, da_i, 0.0), axis=1, keepdims=True)
            _, dq_in = _gram(
                cfg.gate,
                q_i,
                g_i,
                k_all,
                g_all,
                k_i,
                g_i,
                i,
                s,
                "lower",
                dm_p=da_i,
                want_m=False,
                acc_strict=True,
                same=same,
            )
            dq_g = keep_rows(scale * jnp.exp(g_i) * _mm(do_i, h, dtype=dt), first) + dq_in
            dq = dq_g + da_ii * k_i.astype(F32)
            # dk and d delta: rows j, contraction over queries i >= j (upper, gs = -G).
            dat_i = scale * _mm(d_i, do_all, tb=True, dtype=dt)
            at_i, dk_in = _gram(
                cfg.gate,
                k_i,
                -g_i,
                q_all,
                ng_all,
                q_i,
                -g_i,
                i,
                s,
                "upper",
                dm_p=dat_i,
                want_m=not delta,
                acc_strict=True,
                same=same,
            )
            e_last = keep_rows(jnp.exp(jnp.minimum(gl - g_i, 0.0)), last_i)
            dk_state = e_last * _mm(d_i, dh, dtype=dt)
            dk = dk_state + dk_in + da_ii * q_i.astype(F32)
            is_last = p_glob == last
            dk_state_g = jnp.where(is_last, 0.0, dk_state)
            dgv = q_i.astype(F32) * dq_g - k_i.astype(F32) * (dk_in + dk_state_g)
            dgv = dgv + jnp.where(is_last, extra, 0.0)
            dq_ref[rows, :] = dq
            dk_ref[rows, :] = dk
            dg_ref[rows, :] = dgv
            if delta:
                dw_ref[rows, :] = -_mm(ddf_ref[rows, :], h, dtype=dt)
            else:
                kd = k_i.astype(F32) * e_last
                dd = _mm(kd, dh, tb=True, dtype=dt) + scale * _mm(at_i, do_all, dtype=dt)
                dd_ref[rows, :] = dd

    kshape = jax.ShapeDtypeStruct(q.shape, F32)
    if delta:
        outs = [kshape, kshape, kshape, kshape]
        ins = [q, k, d, g, do, dd_full]
    else:
        outs = [kshape, kshape, jax.ShapeDtypeStruct(d.shape, F32), kshape]
        ins = [q, k, d, g, do]
    res = _par_call(cfg, kernel, "chunk_grads_bwd", with_seg(ins, seg), [hs, dhs], outs)
    if delta:
        dq, dk, dg, dw = res
        return dq, dk, dd_full, dg, dw
    dq, dk, dd, dg = res
    return dq, dk, dd, dg, None
