"""The delta rule's UT / WY transform per chunk as Pallas kernels: the gram ``A^kk``, the
inverse of ``I + diag(beta) A^kk`` by forward substitution, ``u`` and ``w``, and their
backward (``wy`` is the custom-VJP entry). See ``_chunk_common`` for the conventions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._chunk_common import (
    F32,
    ChunkSegments,
    _gram,
    _mm,
    _par_call,
    _row,
    _rows,
    keep_rows,
    split_seg,
    with_seg,
)

# ----------------------------------------------------------------------------- WY / UT transform


def wy_gram_fwd(cfg, k, g, seg=None):
    """``A^kk`` per chunk [BH, T, C] fp32: ``A_jl = sum_d k_jd k_ld exp(G_jd - G_ld)``, l < j
    (0 across segments)."""
    s, nb = cfg.sub, cfg.chunk // cfg.sub

    def kernel(*refs):
        (k_ref, g_ref), seg_ref, (a_ref,) = split_seg(refs, 2, seg)
        sg = ChunkSegments(seg_ref, s)
        k_all, g_all = k_ref[...], g_ref[...]
        for i in range(nb):
            same, _, _ = sg.block(i)
            k_i, g_i = k_ref[_rows(i, s), :], g_ref[_rows(i, s), :]
            a_i, _ = _gram(cfg.gate, k_i, g_i, k_all, g_all, k_i, g_i, i, s, "strict", same=same)
            a_ref[_rows(i, s), :] = a_i

    out = [jax.ShapeDtypeStruct(k.shape[:2] + (cfg.chunk,), F32)]
    return _par_call(cfg, kernel, "chunk_wy_gram_fwd", with_seg([k, g], seg), [], out)[0]


def _unit_lower_inverse_t(lmat):
    """``Y = ((I + L)^-1)^T`` for strictly lower ``L`` [C, C] by forward substitution, built
    column by column (``Y[:, i] = e_i - Y L_i^T``) with masked reductions only."""
    c = lmat.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    rows1 = lax.broadcasted_iota(jnp.int32, (c, 1), 0)

    def body(i, y):
        l_i = _row(lmat, i)
        col = jnp.where(rows1 == i, 1.0, 0.0) - jnp.sum(y * l_i, axis=1, keepdims=True)
        return jnp.where(cols == i, col, y)

    return lax.fori_loop(1, c, body, jnp.where(rows == cols, 1.0, 0.0).astype(F32))


def wy_solve_fwd(cfg, a, beta, k, v, g, seg=None):
    """``u = T v``, ``w = T (k e^G)`` with ``T = (I + diag(beta) A)^-1 diag(beta)``.

    Returns ``(u, w)`` in k's dtype and ``Y = ((I + diag(beta) A)^-1)^T`` [BH, T, C] fp32 (for
    the backward). With ``seg``, ``k e^G`` is 0 on rows that do not read the entering state."""
    dt = k.dtype

    def kernel(*refs):
        (a_ref, b_ref, k_ref, v_ref, g_ref), seg_ref, (y_ref, u_ref, w_ref) = split_seg(
            refs, 5, seg
        )
        first = ChunkSegments(seg_ref, cfg.sub).first
        beta = b_ref[...]
        y = _unit_lower_inverse_t(beta * a_ref[...])
        y_ref[...] = y
        rv = beta * v_ref[...].astype(F32)
        rk = beta * keep_rows(k_ref[...].astype(F32) * jnp.exp(g_ref[...]), first)
        u_ref[...] = _mm(y, rv, ta=True).astype(u_ref.dtype)
        w_ref[...] = _mm(y, rk, ta=True).astype(w_ref.dtype)

    outs = [
        jax.ShapeDtypeStruct(a.shape, F32),
        jax.ShapeDtypeStruct(v.shape, dt),
        jax.ShapeDtypeStruct(k.shape, dt),
    ]
    return _par_call(cfg, kernel, "chunk_wy_solve_fwd", with_seg([a, beta, k, v, g], seg), [],
                     outs)


def wy_solve_bwd(cfg, y, a, beta, k, v, g, du, dw, seg=None):
    """Backward of ``wy_solve_fwd``: ``dA`` (strict lower, [BH, T, C]), ``dv``, ``dbeta``
    [BH, T, 1] and the direct parts of ``dk`` and ``dG`` (through ``k e^G``), all fp32."""

    def kernel(*refs):
        ins, seg_ref, outs = split_seg(refs, 8, seg)
        y_ref, a_ref, b_ref, k_ref, v_ref, g_ref, du_ref, dw_ref = ins
        da_ref, dv_ref, db_ref, dk_ref, dg_ref = outs
        first = ChunkSegments(seg_ref, cfg.sub).first
        y, amat, beta = y_ref[...], a_ref[...], b_ref[...]
        c = amat.shape[0]
        v = v_ref[...].astype(F32)
        kg = keep_rows(k_ref[...].astype(F32) * jnp.exp(g_ref[...]), first)
        du, dw = du_ref[...].astype(F32), dw_ref[...].astype(F32)
        drv = _mm(y, du)
        drk = _mm(y, dw)
        dminv = _mm(du, beta * v, tb=True) + _mm(dw, beta * kg, tb=True)
        strict = lax.broadcasted_iota(jnp.int32, (c, c), 0) > lax.broadcasted_iota(
            jnp.int32, (c, c), 1
        )
        dl = jnp.where(strict, -_mm(_mm(y, dminv), y), 0.0)
        db_ref[...] = (
            jnp.sum(dl * amat, axis=1, keepdims=True)
            + jnp.sum(drv * v, axis=1, keepdims=True)
            + jnp.sum(drk * kg, axis=1, keepdims=True)
        )
        da_ref[...] = beta * dl
        dv_ref[...] = beta * drv
        dkg = beta * drk
        dk_ref[...] = keep_rows(dkg * jnp.exp(g_ref[...]), first)
        dg_ref[...] = dkg * kg

    outs = [
        jax.ShapeDtypeStruct(a.shape, F32),
        jax.ShapeDtypeStruct(v.shape, F32),
        jax.ShapeDtypeStruct(beta.shape, F32),
        jax.ShapeDtypeStruct(k.shape, F32),
        jax.ShapeDtypeStruct(k.shape, F32),
    ]
    ins = with_seg([y, a, beta, k, v, g, du, dw], seg)
    return _par_call(cfg, kernel, "chunk_wy_solve_bwd", ins, [], outs)


def wy_gram_bwd(cfg, k, g, da, dat, seg=None):
    """Backward of ``wy_gram_fwd`` given ``dA`` and its per-chunk transpose: ``dk``, ``dG``."""
    s, nb = cfg.sub, cfg.chunk // cfg.sub

    def kernel(*refs):
        (k_ref, g_ref, da_ref, dat_ref), seg_ref, (dk_ref, dg_ref) = split_seg(refs, 4, seg)
        sg = ChunkSegments(seg_ref, s)
        k_all, g_all = k_ref[...], g_ref[...]
        ng_all = -g_all
        for i in range(nb):
            same, _, _ = sg.block(i)
            rows = _rows(i, s)
            k_i, g_i = k_ref[rows, :], g_ref[rows, :]
            _, low = _gram(
                cfg.gate,
                k_i,
                g_i,
                k_all,
                g_all,
                k_i,
                g_i,
                i,
                s,
                "strict",
                dm_p=da_ref[rows, :],
                want_m=False,
                same=same,
            )
            _, up = _gram(
                cfg.gate,
                k_i,
                -g_i,
                k_all,
                ng_all,
                k_i,
                -g_i,
                i,
                s,
                "upper",
                dm_p=dat_ref[rows, :],
                want_m=False,
                same=same,
            )
            k32 = k_i.astype(F32)
            dk_ref[rows, :] = low + up
            dg_ref[rows, :] = k32 * (low - up)

    outs = [jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(k.shape, F32)]
    return _par_call(cfg, kernel, "chunk_wy_gram_bwd", with_seg([k, g, da, dat], seg), [], outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def wy(k, v, beta, g, seg, cfg):
    """UT transform per chunk: ``(u, w)`` in k's dtype; ``beta`` is [BH, T, 1] fp32; ``seg``
    None or the packed-sequence counts [BH, T, 1] (no gradient)."""
    a = wy_gram_fwd(cfg, k, g, seg)
    _, u, w = wy_solve_fwd(cfg, a, beta, k, v, g, seg)
    return u, w


def _wy_fwd(k, v, beta, g, seg, cfg):
    a = wy_gram_fwd(cfg, k, g, seg)
    y, u, w = wy_solve_fwd(cfg, a, beta, k, v, g, seg)
    return (u, w), (k, v, beta, g, seg, a, y)


def chunk_transpose(x):
    """Per-chunk transpose of ``[BH, T, C]`` (``C`` rows per chunk): layout glue."""
    bh, t_len, c = x.shape
    return jnp.swapaxes(x.reshape(bh, t_len // c, c, c), -1, -2).reshape(bh, t_len, c)


def _wy_bwd(cfg, res, cts):
    k, v, beta, g, seg, a, y = res
    du, dw = cts
    da, dv, dbeta, dk1, dg1 = wy_solve_bwd(cfg, y, a, beta, k, v, g, du, dw, seg)
    dk2, dg2 = wy_gram_bwd(cfg, k, g, da, chunk_transpose(da), seg)
    return ((dk1 + dk2).astype(k.dtype), dv.astype(v.dtype), dbeta, dg1 + dg2, None)


wy.defvjp(_wy_fwd, _wy_bwd)
