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


def _tile(cfg, dim, gpu):
    """Tile of one state dimension. TPU: a state dim is also the lane (last) dim of a chunk
    input (``k``/``g``/``q`` [C, K], ``u``/``do`` [C, V]), so tiles are 128-lane multiples
    (the full dim below 256); GPU: ``gpu`` (fla's chunk_h uses BV 32/64); interpret mode: 16,
    so that the tests exercise the tiling."""
    size = {"tpu": 128, "gpu": gpu}.get(cfg.target, 16)
    return size if dim % size == 0 and dim > size else dim


def _seq_call(cfg, body, name, seq_ins, seq_tiles, h0, seq_outs, out_tiles, reverse,
              split_k=False):
    """Run ``body`` once per chunk, carrying a [BV, BK] fp32 state tile, for every program of
    the grid (BH, V/BV, K/BK): the chunk axis is the only sequential one.

    The recurrence ``h <- decay * h + d^T k`` is column-independent (V tiles are always
    parallel) and, when the decay is per-key diagonal and nothing contracts over K inside the
    chunk step (GLA; not the delta rule's ``w h``), row-independent too: ``split_k`` then
    tiles K as well (fla's ``chunk_fwd_h`` grid (V/BV, B*H), plus K tiles for GLA).

    ``seq_ins``: arrays [BH, T, D] read chunk by chunk, ``seq_tiles[i]`` says which state
    dim D is (``"v"``/``"k"``: tiled like it; None: read whole); ``h0``: [BH, V, K] initial
    state; ``seq_outs``: ShapeDtypeStructs [BH, T, D] written chunk by chunk (``out_tiles``
    as ``seq_tiles``). Returns ``(states [BH, N, V, K], *seq_outs, final)`` where
    ``states[:, n]`` is the carried state when chunk ``n`` starts (in processing order).
    ``body(chunk_refs, row0, h) -> (h_new, seq_values)``; chunk refs index rows
    ``row0 + [0, C)``.
    """
    c = cfg.chunk
    bh, t_len = seq_ins[0].shape[:2]
    n = t_len // c
    vdim, kdim = h0.shape[1:]
    bv = _tile(cfg, vdim, 32)
    bk = _tile(cfg, kdim, 64) if split_k else kdim
    nv, nk = vdim // bv, kdim // bk
    n_in = len(seq_ins)
    order = (lambda j: n - 1 - j) if reverse else (lambda j: j)
    state_shape = jax.ShapeDtypeStruct((bh, n, vdim, kdim), F32)
    final_shape = jax.ShapeDtypeStruct((bh, vdim, kdim), F32)
    width = {"v": bv, "k": bk}

    def col(tile, v, kk):  # block column index of a chunk input along its feature dim
        return {"v": v, "k": kk}.get(tile, 0)

    if cfg.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        def kernel(*refs):
            ins, h0_ref = refs[:n_in], refs[n_in]
            hs_ref, *seq_out_refs, fin_ref, scratch = refs[n_in + 1 :]
            j = pl.program_id(3)

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

        def seq_spec(x, tile):
            return _spec((None, c, width.get(tile, x.shape[-1])),
                         lambda b, v, kk, j: (b, order(j), col(tile, v, kk)))

        state_spec = _spec((None, bv, bk), lambda b, v, kk, j: (b, v, kk))
        return pl.pallas_call(
            kernel,
            grid=(bh, nv, nk, n),
            in_specs=[seq_spec(x, t) for x, t in zip(seq_ins, seq_tiles, strict=True)]
            + [state_spec],
            out_specs=[_spec((None, None, bv, bk), lambda b, v, kk, j: (b, order(j), v, kk))]
            + [seq_spec(x, t) for x, t in zip(seq_outs, out_tiles, strict=True)]
            + [state_spec],
            out_shape=[state_shape, *seq_outs, final_shape],
            scratch_shapes=[pltpu.VMEM((bv, bk), F32)],
            # Tiles are independent programs (megacore may split them); chunks carry the
            # state in scratch, so their axis must stay sequential ("arbitrary", innermost).
            compiler_params=_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
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

    def seq_spec(x, tile):
        return _spec((None, t_len, width.get(tile, x.shape[-1])),
                     lambda b, v, kk: (b, 0, col(tile, v, kk)))

    state_spec = _spec((None, bv, bk), lambda b, v, kk: (b, v, kk))
    return pl.pallas_call(
        kernel,
        grid=(bh, nv, nk),
        in_specs=[seq_spec(x, t) for x, t in zip(seq_ins, seq_tiles, strict=True)]
        + [state_spec],
        out_specs=[_spec((None, n, bv, bk), lambda b, v, kk: (b, 0, v, kk))]
        + [seq_spec(x, t) for x, t in zip(seq_outs, out_tiles, strict=True)]
        + [state_spec],
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


def _with_seg(ins, tiles, seg):
    return (ins, tiles) if seg is None else ([*ins, seg], [*tiles, None])


def _state_pass(cfg, body, name, ins, tiles, seg, state0, delta_like, delta_dtype, *, reverse):
    """One pass of the chunk-state recurrence over the rows ``ins`` (``seg`` appended when
    given), carrying the state from ``state0``. With ``delta_like`` (the delta rule) the body
    also writes one ``delta_like``-shaped output row per step, and the pass tiles V only
    (the delta contracts the state over K). Returns ``(per-chunk states, final state, that
    output or None)``."""
    ins, tiles = _with_seg(ins, tiles, seg)
    has_delta = delta_like is not None
    seq_outs = [jax.ShapeDtypeStruct(delta_like.shape, delta_dtype)] if has_delta else []
    out = _seq_call(cfg, body, name, ins, tiles, state0, seq_outs, ["v"] * len(seq_outs),
                    reverse=reverse, split_k=not has_delta)
    if has_delta:
        states, delta, final = out
        return states, final, delta
    states, final = out
    return states, final, None


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
        ins, tiles = [k, u, w, g], [None, "v", None, None]
    else:
        ins, tiles = [k, u, g], ["k", "v", "k"]
    hs, h_t, d = _state_pass(cfg, body, "chunk_states_fwd", ins, tiles, seg, h0,
                             u if has_w else None, dt, reverse=False)
    return hs, h_t, (d if has_w else u)


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

    if has_w:  # d delta contracts dh over K: V tiles only
        ins, tiles = [q, g, do, k, w, dloc], [None, None, "v", None, None, "v"]
    else:
        ins, tiles = [q, g, do], ["k", "k", "v"]
    return _state_pass(cfg, body, "chunk_states_bwd", ins, tiles, seg, dh_t,
                       do if has_w else None, F32, reverse=True)
