"""GPU (Triton lowering) driver of the flash kernels: an in-kernel loop over the compacted
block list; forward and backward ``pallas_call``s (see ``_flash_kernels``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _flash_tiles as tiles  # the tile math, shared with _flash_tpu
from pallas_kernels._flash_tiles import _SQ, Config, f32


# ------------------------------------------------------------------------------------------
# GPU driver (Triton lowering): in-kernel loop over the compacted list.
# ------------------------------------------------------------------------------------------
def _triton_params(d):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _full(x):
    """BlockSpec for a whole (small, 1-D) array."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _pow2_pad(x, fill=0):
    n = x.shape[0]
    p = max(1, pl.next_power_of_2(n))
    return jnp.pad(x, (0, p - n), constant_values=fill)


def _gpu_row(cfg, b, h, i, n_rows):
    head_row = tiles._sel(b, cfg.map_batch) * cfg.map_heads + tiles._sel(h, cfg.map_heads)
    return head_row * n_rows + i


def _mod_specs(cfg: Config, ops, held: str):
    """BlockSpecs of the score_mod operands (``[Bx, Hx, L]``; ``const``: whole) for a grid
    ``(block, b, h)`` over ``held`` blocks ("q" or "kv"): the held axis's operands are sliced
    to the program's block, the other axis's come whole and the kernel slices its loop's
    block."""
    def spec(x, a, bx, hx):
        size = {"q": cfg.block_q, "kv": cfg.block_kv}.get(a) if a == held else x.shape[-1]
        return pl.BlockSpec(
            (_SQ, _SQ, size),
            lambda blk, b, h: (tiles._sel(b, bx), tiles._sel(h, hx), blk if a == held else 0))

    return tiles.mod_specs(cfg, ops, spec)


def _mod_blocks(cfg: Config, refs, held: str, sl):
    """The score_mod's blocks inside the loop; ``sl`` slices the looped axis's operands."""
    loaded = []
    for r, a in zip(refs, cfg.mod_axes, strict=True):
        if a == "const":
            loaded.append(r[...])
        elif a == "whole":
            loaded.append(r[...][None, :])
        else:
            x = r[...] if a == held else r[sl]
            loaded.append(x[:, None] if a == "q" else x[None, :])
    return tiles.split_blocks(cfg, loaded)


def _partials(cfg: Config, ops, want, n_blocks: int, size: int):
    """Out shapes and specs of the gradient partials for a grid ``(block, b, h)``: ``q``/``kv``
    ``[B, Hq, n_blocks * size]`` (the held axis), ``whole`` ``[B, Hq, n_blocks, L]``,
    ``const`` ``[B, Hq, n_blocks, *shape]``."""
    b_, hq = cfg.batch, cfg.num_q_heads
    shapes, specs = [], []
    for n in want:
        x, a = ops[n], cfg.mod_axes[n]
        if a in ("q", "kv"):
            shapes.append(jax.ShapeDtypeStruct((b_, hq, n_blocks * size), f32))
            specs.append(pl.BlockSpec((_SQ, _SQ, size), lambda blk, b, h: (b, h, blk)))
        else:
            tail = x.shape if a == "const" else x.shape[-1:]
            shapes.append(jax.ShapeDtypeStruct((b_, hq, n_blocks) + tail, f32))
            specs.append(pl.BlockSpec((_SQ, _SQ, _SQ) + tail,
                                      lambda blk, b, h, nd=len(tail): (b, h, blk) + (0,) * nd))
    return shapes, specs


def _zero_partials(cfg: Config, ops, want, size: int):
    """Loop-carried accumulators, in the loaded layouts (``q`` ``[bq, 1]``, ``kv``
    ``[1, bk]``, ``whole`` ``[1, L]``)."""
    out = []
    for n in want:
        x, a = ops[n], cfg.mod_axes[n]
        shape = {"q": (size, 1), "kv": (1, size), "whole": (1, x.shape[-1])}.get(a, x.shape)
        out.append(jnp.zeros(shape, f32))
    return tuple(out)


def _add_partials(cfg: Config, accs, want, dblocks):
    return tuple(acc + tiles.grad_value(cfg, n, d, acc.shape[-1])
                 for acc, n, d in zip(accs, want, dblocks, strict=True))


def _store_partials(cfg: Config, refs, want, accs):
    for r, n, acc in zip(refs, want, accs, strict=True):
        a = cfg.mod_axes[n]
        r[...] = jnp.sum(acc, axis=1 if a == "q" else 0) if a != "const" else acc


def _partials_to_compact(cfg: Config, parts, want):
    """Per-program partials -> ``[B, Hq, L]`` (``const``: ``[B, Hq, *shape]``)."""
    return [x if cfg.mod_axes[n] in ("q", "kv") else x.sum(2)
            for x, n in zip(parts, want, strict=True)]


def gpu_forward(cfg: Config, ents, cnts, q, k, v, sinks, seg_q, seg_k, mod_ops=()):
    """q ``[B, Tq_pad, Hq, D]``, k/v ``[B, Tk_pad, Hkv, D]`` -> o, m, log_l ``[B, Hq, Tq_pad]``."""
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    d, dv, g, w = q.shape[-1], v.shape[-1], cfg.group, cfg.width
    ents_f, cnts_f = _pow2_pad(ents.reshape(-1)), _pow2_pad(cnts.reshape(-1))
    has_seg = seg_q is not None
    n_mod = len(mod_ops)

    def kernel(cnt_ref, ent_ref, q_ref, k_ref, v_ref, sink_ref, qseg_ref, kseg_ref, *refs):
        mod_refs, (o_ref, m_ref, log_l_ref) = refs[:n_mod], refs[n_mod:]
        i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row = _gpu_row(cfg, b, h, i, cfg.nq)
        q_blk = q_ref[...]
        q_seg = qseg_ref[...][:, None] if has_seg else None
        if cfg.has_sinks:
            m0 = jnp.zeros((bq,), f32) + sink_ref[h]
            l0 = jnp.ones((bq,), f32)
        else:
            m0 = jnp.full((bq,), tiles.initial_max(cfg), f32)
            l0 = jnp.zeros((bq,), f32)
        acc0 = jnp.zeros((bq, dv), f32)

        def body(j, carry):
            kb, kind = tiles._entry(ent_ref[row * w + j])
            sl = pl.ds(kb * bk, bk)
            k_blk, v_blk = k_ref[sl, :], v_ref[sl, :]
            blocks = _mod_blocks(cfg, mod_refs, "q", sl)

            def masked(c):
                k_seg = kseg_ref[sl][None, :] if has_seg else None
                vis = tiles._visible(cfg, i * bq, kb * bk, h, q_seg, k_seg)
                return tiles._fwd_update(q_blk, k_blk, v_blk, *c, vis, cfg,
                                         (b, h, i * bq, kb * bk), blocks)

            def full(c):
                return tiles._fwd_update(q_blk, k_blk, v_blk, *c, None, cfg,
                                         (b, h, i * bq, kb * bk), blocks)

            return lax.cond(kind == 1, masked, full, carry)

        m, l, acc = lax.fori_loop(0, cnt_ref[row], body, (m0, l0, acc0))
        o, m, log_l = tiles._finalize(m, l, acc, cfg)
        o_ref[...] = o.astype(o_ref.dtype)
        m_ref[...] = m
        log_l_ref[...] = log_l

    in_specs = [
        _full(cnts_f), _full(ents_f),
        pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((_SQ, cfg.kv_pad, _SQ, d), lambda i, b, h: (b, 0, lax.div(h, g), 0)),
        pl.BlockSpec((_SQ, cfg.kv_pad, _SQ, dv), lambda i, b, h: (b, 0, lax.div(h, g), 0)),
        None, None, None,
    ]
    sinks_in = seg_q_in = seg_k_in = None
    if cfg.has_sinks:
        sinks_in = _pow2_pad(sinks.astype(f32))
        in_specs[5] = _full(sinks_in)
    if has_seg:
        seg_q_in, seg_k_in = seg_q, seg_k
        in_specs[6] = pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i))
        in_specs[7] = pl.BlockSpec((_SQ, cfg.kv_pad), lambda i, b, h: (b, 0))
    in_specs += _mod_specs(cfg, mod_ops, "q")
    stat_shape = jax.ShapeDtypeStruct((b_, hq, cfg.q_pad), f32)
    stat_spec = pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))
    o, m, log_l = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b_, cfg.q_pad, hq, dv), q.dtype), stat_shape,
                   stat_shape],
        grid=(cfg.nq, b_, hq), in_specs=in_specs,
        out_specs=[pl.BlockSpec((_SQ, bq, _SQ, dv), lambda i, b, h: (b, i, h, 0)), stat_spec,
                   stat_spec],
        interpret=cfg.interpret, compiler_params=_triton_params(d), name="flash_fwd",
    )(cnts_f, ents_f, q, k, v, sinks_in, seg_q_in, seg_k_in, *mod_ops)
    return o, m, log_l


def gpu_backward(cfg: Config, ents, cnts, ents_t, cnts_t, q, k, v, do, m, log_l, di, seg_q,
                 seg_k, mod_ops=()):
    """dq ``[B, Tq_pad, Hq, D]``; dk/dv ``[B, Tk_pad, Hkv, .]`` (summed over each group); the
    score_mod operands' gradients ``[B, Hq, L]`` (``const``: ``[B, Hq, *shape]``; None for
    integer operands)."""
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    d, dv, g = q.shape[-1], v.shape[-1], cfg.group
    has_seg = seg_q is not None
    params = _triton_params(d)
    n_mod = len(mod_ops)
    floating = {n for n, x in enumerate(mod_ops) if jnp.issubdtype(x.dtype, jnp.floating)}
    want_q = tuple(n for n in tiles.wanted(cfg, "dq") if n in floating)
    want_kv = tuple(n for n in tiles.wanted(cfg, "dkv") if n in floating)

    # ---- dq
    ents_f, cnts_f = _pow2_pad(ents.reshape(-1)), _pow2_pad(cnts.reshape(-1))
    w = cfg.width

    def dq_kernel(cnt_ref, ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref,
                  qseg_ref, kseg_ref, *refs):
        mod_refs, (dq_ref, *part_refs) = refs[:n_mod], refs[n_mod:]
        i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row = _gpu_row(cfg, b, h, i, cfg.nq)
        q_blk, do_blk, di_r = q_ref[...], do_ref[...], di_ref[...]
        m_r, log_l_r = m_ref[...], log_l_ref[...]
        q_seg = qseg_ref[...][:, None] if has_seg else None

        def body(j, carry):
            acc, parts = carry
            kb, kind = tiles._entry(ent_ref[row * w + j])
            sl = pl.ds(kb * bk, bk)
            k_blk, v_blk = k_ref[sl, :], v_ref[sl, :]
            blocks = _mod_blocks(cfg, mod_refs, "q", sl)

            def tile(vis):
                _, ds, dblocks = tiles.bwd_tile_operands(
                    q_blk, k_blk, v_blk, do_blk, m_r, log_l_r, di_r, vis, cfg,
                    (b, h, i * bq, kb * bk), blocks, want_q)
                return (acc + tiles._mm(ds.astype(k_blk.dtype), k_blk),
                        _add_partials(cfg, parts, want_q, dblocks))

            def masked():
                k_seg = kseg_ref[sl][None, :] if has_seg else None
                return tile(tiles._visible(cfg, i * bq, kb * bk, h, q_seg, k_seg))

            return lax.cond(kind == 1, masked, lambda: tile(None))

        acc, parts = lax.fori_loop(0, cnt_ref[row], body, (
            jnp.zeros((bq, d), f32), _zero_partials(cfg, mod_ops, want_q, bq)))
        dq_ref[...] = (acc * cfg.scale).astype(dq_ref.dtype)
        _store_partials(cfg, part_refs, want_q, parts)

    qspec = lambda dd: pl.BlockSpec((_SQ, bq, _SQ, dd), lambda i, b, h: (b, i, h, 0))  # noqa: E731
    kvfull = lambda dd: pl.BlockSpec(  # noqa: E731
        (_SQ, cfg.kv_pad, _SQ, dd), lambda i, b, h: (b, 0, lax.div(h, g), 0))
    stat = pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))
    in_specs = [_full(cnts_f), _full(ents_f), qspec(d), kvfull(d), kvfull(dv), qspec(dv),
                stat, stat, stat,
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)) if has_seg else None,
                pl.BlockSpec((_SQ, cfg.kv_pad), lambda i, b, h: (b, 0)) if has_seg else None,
                *_mod_specs(cfg, mod_ops, "q")]
    part_shapes, part_specs = _partials(cfg, mod_ops, want_q, cfg.nq, bq)
    dq, *parts_q = pl.pallas_call(
        dq_kernel, out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *part_shapes],
        grid=(cfg.nq, b_, hq), in_specs=in_specs, out_specs=[qspec(d), *part_specs],
        interpret=cfg.interpret, compiler_params=params, name="flash_bwd_dq",
    )(cnts_f, ents_f, q, k, v, do, m, log_l, di, seg_q, seg_k, *mod_ops)

    # ---- dk/dv: one program per (key block, batch, query head).
    ents_tf, cnts_tf = _pow2_pad(ents_t.reshape(-1)), _pow2_pad(cnts_t.reshape(-1))
    wt = cfg.width_t

    def dkv_kernel(cnt_ref, ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref,
                   qseg_ref, kseg_ref, *refs):
        mod_refs, (dk_ref, dv_ref, *part_refs) = refs[:n_mod], refs[n_mod:]
        c, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row = _gpu_row(cfg, b, h, c, cfg.nk)
        k_blk, v_blk = k_ref[...], v_ref[...]
        k_seg = kseg_ref[...][None, :] if has_seg else None

        def body(j, carry):
            dk_acc, dv_acc, parts = carry
            qb, kind = tiles._entry(ent_ref[row * wt + j])
            sl = pl.ds(qb * bq, bq)
            q_blk, do_blk = q_ref[sl, :], do_ref[sl, :]
            m_r, log_l_r, di_r = m_ref[sl], log_l_ref[sl], di_ref[sl]
            blocks = _mod_blocks(cfg, mod_refs, "kv", sl)

            def tile(vis):
                p, ds, dblocks = tiles.bwd_tile_operands(
                    q_blk, k_blk, v_blk, do_blk, m_r, log_l_r, di_r, vis, cfg,
                    (b, h, qb * bq, c * bk), blocks, want_kv)
                return (dk_acc + tiles._mm(ds.T.astype(q_blk.dtype), q_blk),
                        dv_acc + tiles._mm(p.T.astype(do_blk.dtype), do_blk),
                        _add_partials(cfg, parts, want_kv, dblocks))

            def masked():
                q_seg = qseg_ref[sl][:, None] if has_seg else None
                return tile(tiles._visible(cfg, qb * bq, c * bk, h, q_seg, k_seg))

            return lax.cond(kind == 1, masked, lambda: tile(None))

        dk_acc, dv_acc, parts = lax.fori_loop(
            0, cnt_ref[row], body, (jnp.zeros((bk, d), f32), jnp.zeros((bk, dv), f32),
                                    _zero_partials(cfg, mod_ops, want_kv, bk)))
        dk_ref[...] = (dk_acc * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc.astype(dv_ref.dtype)
        _store_partials(cfg, part_refs, want_kv, parts)

    kvspec = lambda dd: pl.BlockSpec((_SQ, bk, _SQ, dd), lambda c, b, h: (b, c, lax.div(h, g), 0))  # noqa: E731
    qfull = lambda dd: pl.BlockSpec((_SQ, cfg.q_pad, _SQ, dd), lambda c, b, h: (b, 0, h, 0))  # noqa: E731
    statf = pl.BlockSpec((_SQ, _SQ, cfg.q_pad), lambda c, b, h: (b, h, 0))
    outspec = lambda dd: pl.BlockSpec((_SQ, bk, _SQ, dd), lambda c, b, h: (b, c, h, 0))  # noqa: E731
    in_specs = [_full(cnts_tf), _full(ents_tf), qfull(d), kvspec(d), kvspec(dv), qfull(dv),
                statf, statf, statf,
                pl.BlockSpec((_SQ, cfg.q_pad), lambda c, b, h: (b, 0)) if has_seg else None,
                pl.BlockSpec((_SQ, bk), lambda c, b, h: (b, c)) if has_seg else None,
                *_mod_specs(cfg, mod_ops, "kv")]
    acc_dtype = (lambda x: x.dtype) if g == 1 else (lambda x: f32)
    part_shapes, part_specs = _partials(cfg, mod_ops, want_kv, cfg.nk, bk)
    dk, dv_, *parts_kv = pl.pallas_call(
        dkv_kernel,
        out_shape=[jax.ShapeDtypeStruct((b_, cfg.kv_pad, hq, d), acc_dtype(k)),
                   jax.ShapeDtypeStruct((b_, cfg.kv_pad, hq, dv), acc_dtype(v)), *part_shapes],
        grid=(cfg.nk, b_, hq), in_specs=in_specs,
        out_specs=[outspec(d), outspec(dv), *part_specs],
        interpret=cfg.interpret, compiler_params=params, name="flash_bwd_dkv",
    )(cnts_tf, ents_tf, q, k, v, do, m, log_l, di, seg_q, seg_k, *mod_ops)
    if g > 1:
        dk = dk.reshape(b_, cfg.kv_pad, cfg.num_kv_heads, g, d).sum(3).astype(k.dtype)
        dv_ = dv_.reshape(b_, cfg.kv_pad, cfg.num_kv_heads, g, dv).sum(3).astype(v.dtype)
    dmods = [None] * n_mod
    for n, x in zip(want_q + want_kv, _partials_to_compact(cfg, parts_q, want_q)
                    + _partials_to_compact(cfg, parts_kv, want_kv), strict=True):
        dmods[n] = x
    return dq, dk, dv_, dmods
