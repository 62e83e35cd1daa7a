"""The delta rule's UT / WY transform per chunk as Pallas kernels: the gram ``A^kk``, the
inverse of ``I + diag(beta) A^kk`` by forward substitution, ``u`` and ``w``, and their
backward (``wy`` is the custom-VJP entry). See ``_chunk_common`` for the conventions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._chunk_common import F32, _gram, _mm, _par_call, _row, _rows

# ----------------------------------------------------------------------------- WY / UT transform


def wy_gram_fwd(cfg, k, g):
    """``A^kk`` per chunk [BH, T, C] fp32: ``A_jl = sum_d k_jd k_ld exp(G_jd - G_ld)``, l < j."""
    s, nb = cfg.sub, cfg.chunk // cfg.sub

    def kernel(k_ref, g_ref, a_ref):
        k_all, g_all = k_ref[...], g_ref[...]
        for i in range(nb):
            k_i, g_i = k_ref[_rows(i, s), :], g_ref[_rows(i, s), :]
            a_i, _ = _gram(cfg.gate, k_i, g_i, k_all, g_all, k_i, g_i, i, s, "strict")
            a_ref[_rows(i, s), :] = a_i

    out = [jax.ShapeDtypeStruct(k.shape[:2] + (cfg.chunk,), F32)]
    return _par_call(cfg, kernel, "chunk_wy_gram_fwd", [k, g], [], out)[0]


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


def wy_solve_fwd(cfg, a, beta, k, v, g):
    """``u = T v``, ``w = T (k e^G)`` with ``T = (I + diag(beta) A)^-1 diag(beta)``.

    Returns ``(u, w)`` in k's dtype and ``Y = ((I + diag(beta) A)^-1)^T`` [BH, T, C] fp32 (for
    the backward)."""
    dt = k.dtype

    def kernel(a_ref, b_ref, k_ref, v_ref, g_ref, y_ref, u_ref, w_ref):
        beta = b_ref[...]
        y = _unit_lower_inverse_t(beta * a_ref[...])
        y_ref[...] = y
        rv = beta * v_ref[...].astype(F32)
        rk = beta * k_ref[...].astype(F32) * jnp.exp(g_ref[...])
        u_ref[...] = _mm(y, rv, ta=True).astype(u_ref.dtype)
        w_ref[...] = _mm(y, rk, ta=True).astype(w_ref.dtype)

    outs = [
        jax.ShapeDtypeStruct(a.shape, F32),
        jax.ShapeDtypeStruct(v.shape, dt),
        jax.ShapeDtypeStruct(k.shape, dt),
    ]
    return _par_call(cfg, kernel, "chunk_wy_solve_fwd", [a, beta, k, v, g], [], outs)


def wy_solve_bwd(cfg, y, a, beta, k, v, g, du, dw):
    """Backward of ``wy_solve_fwd``: ``dA`` (strict lower, [BH, T, C]), ``dv``, ``dbeta``
    [BH, T, 1] and the direct parts of ``dk`` and ``dG`` (through ``k e^G``), all fp32."""

    def kernel(
        y_ref,
        a_ref,
        b_ref,
        k_ref,
        v_ref,
        g_ref,
        du_ref,
        dw_ref,
        da_ref,
        dv_ref,
        db_ref,
        dk_ref,
        dg_ref,
    ):
        y, amat, beta = y_ref[...], a_ref[...], b_ref[...]
        c = amat.shape[0]
        v = v_ref[...].astype(F32)
        kg = k_ref[...].astype(F32) * jnp.exp(g_ref[...])
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
        dk_ref[...] = dkg * jnp.exp(g_ref[...])
        dg_ref[...] = dkg * kg

    outs = [
        jax.ShapeDtypeStruct(a.shape, F32),
        jax.ShapeDtypeStruct(v.shape, F32),
        jax.ShapeDtypeStruct(beta.shape, F32),
        jax.ShapeDtypeStruct(k.shape, F32),
        jax.ShapeDtypeStruct(k.shape, F32),
    ]
    return _par_call(cfg, kernel, "chunk_wy_solve_bwd", [y, a, beta, k, v, g, du, dw], [], outs)


def wy_gram_bwd(cfg, k, g, da, dat):
    """Backward of ``wy_gram_fwd`` given ``dA`` and its per-chunk transpose: ``dk``, ``dG``."""
    s, nb = cfg.sub, cfg.chunk // cfg.sub

    def kernel(k_ref, g_ref, da_ref, dat_ref, dk_ref, dg_ref):
        k_all, g_all = k_ref[...], g_ref[...]
        ng_all = -g_all
        for i in range(nb):
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
            )
            k32 = k_i.astype(F32)
            dk_ref[rows, :] = low + up
            dg_ref[rows, :] = k32 * (low - up)

    outs = [jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(k.shape, F32)]
    return _par_call(cfg, kernel, "chunk_wy_gram_bwd", [k, g, da, dat], [], outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def wy(k, v, beta, g, cfg):
    """UT transform per chunk: ``(u, w)`` in k's dtype; ``beta`` is [BH, T, 1] fp32."""
    a = wy_gram_fwd(cfg, k, g)
    _, u, w = wy_solve_fwd(cfg, a, beta, k, v, g)
    return u, w


def _wy_fwd(k, v, beta, g, cfg):
    a = wy_gram_fwd(cfg, k, g)
    y, u, w = wy_solve_fwd(cfg, a, beta, k, v, g)
    return (u, w), (k, v, beta, g, a, y)


def _wy_bwd(cfg, res, cts):
    k, v, beta, g, a, y = res
    du, dw = cts
    da, dv, dbeta, dk1, dg1 = wy_solve_bwd(cfg, y, a, beta, k, v, g, du, dw)
    bh, t_len, c = da.shape
    dat = jnp.swapaxes(da.reshape(bh, t_len // c, c, c), -1, -2).reshape(bh, t_len, c)
    dk2, dg2 = wy_gram_bwd(cfg, k, g, da, dat)
    return ((dk1 + dk2).astype(k.dtype), dv.astype(v.dtype), dbeta, dg1 + dg2)


wy.defvjp(_wy_fwd, _wy_bwd)
