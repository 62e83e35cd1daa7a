"""Sequential state pass of the chunked backbone: ``states_fwd`` (boundary states ``h_c`` and
``delta``) and ``states_bwd`` (``dh_c``, ``dh_0``), each with a TPU and a GPU/interpret driver
from one chunk body (``_seq_call``). See ``_chunk_common`` for the math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._chunk_common import F32, _mm, _params, _spec, keep_rows

# ----------------------------------------------------------------------------- sequential


def _block_v(cfg, vdim):
    """V tile of the sequential kernels: state columns are independent, so tiles of V are
    parallel programs (GPU occupancy: B*H alone is too few). TPU keeps the full V (lane dim);
    interpret mode uses 16 so the tests exercise the tiling."""
    if cfg.target == "tpu":
        return vdim
    bv = 32 if cfg.target == "gpu" else 16
    return bv if vdim % bv == 0 and vdim > bv else vdim


def _seq_call(cfg, body, name, seq_ins, seq_v, h0, seq_outs, out_v, reverse):
    """Run ``body`` once per chunk, carrying a [BV, K] fp32 state tile, for every (b, h, tile).

    ``seq_ins``: arrays [BH, T, D] read chunk by chunk (``seq_v[i]``: D is V, tiled by BV);
    ``h0``: [BH, V, K] initial state; ``seq_outs``: ShapeDtypeStructs [BH, T, D] written chunk
    by chunk (``out_v`` as ``seq_v``). Returns ``(states [BH, N, V, K], *seq_outs, final)``
    where ``states[:, n]`` is the carried state when chunk ``n`` starts (in processing order).
    ``body(chunk_refs, row0, h) -> (h_new, seq_values)``; chunk refs index rows
    ``row0 + [0, C)``.
    """
    c = cfg.chunk
    bh, t_len = seq_ins[0].shape[:2]
    n = t_len // c
    vdim, kdim = h0.shape[1:]
    bv = _block_v(cfg, vdim)
    nv = vdim // bv
    n_in = len(seq_ins)
    order = (lambda j: n - 1 - j) if reverse else (lambda j: j)
    state_shape = jax.ShapeDtypeStruct((bh, n, vdim, kdim), F32)
    final_shape = jax.ShapeDtypeStruct((bh, vdim, kdim), F32)
    width = lambda x, tiled: bv if tiled else x.shape[-1]

    if cfg.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        def kernel(*refs):
            ins, h0_ref = refs[:n_in], refs[n_in]
            hs_ref, *seq_out_refs, fin_ref, scratch = refs[n_in + 1 :]
            j = pl.program_id(2)

            @pl.when(j == 0)
            def _():
                scratch[...] = h0_ref[...].astype(F32)

            h = scratch[...]
            hs_ref[...] = h
            h_new, vals = body(ins, 0, h)
            for ref, val in zip(seq_out_refs, vals, strict=True):
                ref[...] = val.astype(ref.dtype)
            scratch[...] = h_new

            @pl.when(j == n - 1)
            def _():
                fin_ref[...] = h_new

        def seq_spec(x, tiled):
            if tiled:
                return _spec((None, c, bv), lambda b, v, j: (b, order(j), v))
            return _spec((None, c, x.shape[-1]), lambda b, v, j: (b, order(j), 0))

        return pl.pallas_call(
            kernel,
            grid=(bh, nv, n),
            in_specs=[seq_spec(x, t) for x, t in zip(seq_ins, seq_v, strict=True)]
            + [_spec((None, bv, kdim), lambda b, v, j: (b, v, 0))],
            out_specs=[_spec((None, None, bv, kdim), lambda b, v, j: (b, order(j), v, 0))]
            + [seq_spec(x, t) for x, t in zip(seq_outs, out_v, strict=True)]
            + [_spec((None, bv, kdim), lambda b, v, j: (b, v, 0))],
            out_shape=[state_shape, *seq_outs, final_shape],
            scratch_shapes=[pltpu.VMEM((bv, kdim), F32)],
            compiler_params=_params(cfg, ("parallel", "parallel", "arbitrary")),
            interpret=cfg.interpret,
            name=name,
        )(*seq_ins, h0)

    def kernel(*refs):
        ins, h0_ref = refs[:n_in], refs[n_in]
        hs_ref, *seq_out_refs, fin_ref = refs[n_in + 1 :]

        def step(j, h):
            jj = order(j)
            row0 = pl.multiple_of(jj * c, c)
            hs_ref[jj, :, :] = h
            h_new, vals = body(ins, row0, h)
            for ref, val in zip(seq_out_refs, vals, strict=True):
                ref[pl.ds(row0, c), :] = val.astype(ref.dtype)
            return h_new

        fin_ref[...] = lax.fori_loop(0, n, step, h0_ref[...].astype(F32))

    def seq_spec(x, tiled):
        return _spec((None, t_len, width(x, tiled)), lambda b, v: (b, 0, v if tiled else 0))

    return pl.pallas_call(
        kernel,
        grid=(bh, nv),
        in_specs=[seq_spec(x, t) for x, t in zip(seq_ins, seq_v, strict=True)]
        + [_spec((None, bv, kdim), lambda b, v: (b, v, 0))],
        out_specs=[_spec((None, n, bv, kdim), lambda b, v: (b, 0, v, 0))]
        + [seq_spec(x, t) for x, t in zip(seq_outs, out_v, strict=True)]
        + [_spec((None, bv, kdim), lambda b, v: (b, v, 0))],
        out_shape=[state_shape, *seq_outs, final_shape],
        compiler_params=_params(cfg, None),
        interpret=cfg.interpret,
        name=name,
    )(*seq_ins, h0)


def _seg_chunk(seg_ref, r0, c):
    """Packed sequences: (first [C, 1], last [C, 1], keep [1, 1]) of the chunk at ``r0``
    (see ``_chunk_common``), or Nones."""
    if seg_ref is None:
        return None, None, None
    col = seg_ref[pl.ds(r0, c), :]
    last_val = seg_ref[pl.ds(r0 + c - 1, 1), :]
    return col == 0.0, col == last_val, last_val == 0.0


def _with_seg(ins, flags, seg):
    return (ins, flags) if seg is None else ([*ins, seg], [*flags, False])


def states_fwd(cfg, k, u, w, g, h0, seg=None):
    """Chunk-start states ``hs`` [BH, N, V, K], final state [BH, V, K] and (if ``w``) delta.

    With ``seg`` only last-segment rows write ``h_{c+1}`` and ``h_c`` survives only a chunk
    without a restart (``w`` is already 0 on rows that do not read ``h_c``)."""
    c = cfg.chunk
    dt = k.dtype
    has_w = w is not None

    def body(ins, r0, h):
        seg_ref = ins[-1] if seg is not None else None
        ins = ins[:-1] if seg is not None else ins
        if has_w:
            k_ref, u_ref, w_ref, g_ref = ins
        else:
            k_ref, u_ref, g_ref = ins
        _, last, keep = _seg_chunk(seg_ref, r0, c)
        g = g_ref[pl.ds(r0, c), :]
        gl = g_ref[pl.ds(r0 + c - 1, 1), :]
        d = u_ref[pl.ds(r0, c), :].astype(F32)
        if has_w:
            d = d - _mm(w_ref[pl.ds(r0, c), :], h, tb=True, dtype=dt)
        kd = k_ref[pl.ds(r0, c), :].astype(F32) * jnp.exp(jnp.minimum(gl - g, 0.0))
        kd = keep_rows(kd, last)
        h_new = keep_rows(jnp.exp(gl) * h, keep) + _mm(d, kd, ta=True, dtype=dt)
        return h_new, ((d,) if has_w else ())

    if has_w:
        seq_ins, seq_v = _with_seg([k, u, w, g], [False, True, False, False], seg)
    else:
        seq_ins, seq_v = _with_seg([k, u, g], [False, True, False], seg)
    seq_outs = [jax.ShapeDtypeStruct(u.shape, dt)] if has_w else []
    out = _seq_call(cfg, body, "chunk_states_fwd", seq_ins, seq_v, h0, seq_outs,
                    [True] * len(seq_outs), reverse=False)
    if has_w:
        hs, d, h_t = out
    else:
        (hs, h_t), d = out, u
    return hs, h_t, d


def states_bwd(cfg, q, g, do, dh_t, k=None, w=None, dloc=None, seg=None):
    """Reverse recurrence: ``dhs`` [BH, N, V, K] (grad of each chunk's END state), ``dh0``.

    With ``w`` (delta rule) also the full ``d delta = dloc + (k exp(G_last - G)) dh``.
    """
    c = cfg.chunk
    dt = q.dtype
    has_w = w is not None
    scale = cfg.scale

    def body(ins, r0, dh):
        seg_ref = ins[-1] if seg is not None else None
        ins = ins[:-1] if seg is not None else ins
        if has_w:
            q_ref, g_ref, do_ref, k_ref, w_ref, dl_ref = ins
        else:
            q_ref, g_ref, do_ref = ins
        first, last, keep = _seg_chunk(seg_ref, r0, c)
        g = g_ref[pl.ds(r0, c), :]
        gl = g_ref[pl.ds(r0 + c - 1, 1), :]
        qg = keep_rows(q_ref[pl.ds(r0, c), :].astype(F32) * jnp.exp(g), first)
        do = do_ref[pl.ds(r0, c), :]
        dh_new = keep_rows(jnp.exp(gl) * dh, keep) + scale * _mm(do, qg, ta=True, dtype=dt)
        if not has_w:
            return dh_new, ()
        kd = k_ref[pl.ds(r0, c), :].astype(F32) * jnp.exp(jnp.minimum(gl - g, 0.0))
        kd = keep_rows(kd, last)
        dd = dl_ref[pl.ds(r0, c), :].astype(F32) + _mm(kd, dh, tb=True, dtype=dt)
        dh_new = dh_new - _mm(dd, w_ref[pl.ds(r0, c), :], ta=True, dtype=dt)
        return dh_new, (dd,)

    seq_ins, seq_v = _with_seg(
        *(
            ([q, g, do, k, w, dloc], [False, False, True, False, False, True])
            if has_w
            else ([q, g, do], [False, False, True])
        ),
        seg,
    )
    seq_outs = [jax.ShapeDtypeStruct(do.shape, F32)] if has_w else []
    out = _seq_call(cfg, body, "chunk_states_bwd", seq_ins, seq_v, dh_t, seq_outs,
                    [True] * len(seq_outs), reverse=True)
    if has_w:
        dhs, dd, dh0 = out
        return dhs, dh0, dd
    dhs, dh0 = out
    return dhs, dh0, None
