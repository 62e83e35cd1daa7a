"""TPU (Mosaic) driver of the flash kernels: scalar-prefetched block lists drive the k/v
index maps; forward and backward ``pallas_call``s (see ``_flash_kernels``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._flash_tiles import (
    _SQ,
    LANES,
    SUBLANES,
    Config,
    _entry,
    _finalize,
    _fwd_update,
    _mm,
    _sel,
    _visible,
    bwd_tile_operands,
    f32,
    grad_value,
    initial_max,
    mod_specs,
    split_blocks,
    wanted,
)


# ------------------------------------------------------------------------------------------
# TPU driver (Mosaic): scalar-prefetched block lists drive the k/v index maps.
# ------------------------------------------------------------------------------------------
def _tpu():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu


def _tpu_params(pltpu, semantics):
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=semantics)


def _row_stat(ref):
    """[bq] from a lane-broadcast [bq, 128] ref (all lanes equal)."""
    return jnp.max(ref[...], axis=1)


def _lanes(x, shape):
    return lax.broadcast_in_dim(x, shape, (0,))


def _tpu_seg_inputs(cfg, seg_q, seg_k):
    """Lane/sublane-broadcast segment ids: q ``[B, Tq, 128]``, kv ``[B, 8, Tk]`` (splash)."""
    if seg_q is None:
        return None, None
    b = cfg.batch
    sq = lax.broadcast_in_dim(seg_q, (b, cfg.q_pad, LANES), (0, 1))
    sk = lax.broadcast_in_dim(seg_k, (b, SUBLANES, cfg.kv_pad), (0, 2))
    return sq, sk


def _tpu_segs(qseg_ref, kseg_ref):
    if qseg_ref is None:
        return None, None
    return qseg_ref[...][:, :1], kseg_ref[...][:1, :]


def _bwd_tile_specs(q_index, kv_index, bq: int, bk: int, d: int, dv: int) -> list:
    """BlockSpecs of a backward kernel's tiles: q, k, v, do, and the row stats m, log_l, di
    (lane-broadcast), indexed by ``q_index`` (q rows) and ``kv_index`` (k/v rows)."""
    return [
        pl.BlockSpec((_SQ, _SQ, bq, d), q_index),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv_index),
        pl.BlockSpec((_SQ, _SQ, bk, dv), kv_index),
        pl.BlockSpec((_SQ, _SQ, bq, dv), q_index),
        *[pl.BlockSpec((_SQ, _SQ, bq, LANES), q_index)] * 3,
    ]


def _tile_visible(cfg: Config, masked: bool, qseg_ref, kseg_ref, q0, k0, h):
    """The ``[bq, bk]`` visibility of the tile at rows ``q0``, columns ``k0`` (None for a FULL
    tile, which needs no mask)."""
    if not masked:
        return None
    q_seg, k_seg = _tpu_segs(qseg_ref, kseg_ref)
    return _visible(cfg, q0, k0, h, q_seg, k_seg)


def _whole_width(n: int) -> int:
    return -(-max(n, 1) // LANES) * LANES


def _tpu_mod_inputs(cfg: Config, ops):
    """Score_mod operands in TPU layouts: ``q`` lane-broadcast ``[Bx, Hx, Tq_pad, 128]``, ``kv``
    and ``whole`` sublane-broadcast ``[Bx, Hx, 8, L]`` (as segment ids / row stats)."""
    out = []
    for x, a in zip(ops, cfg.mod_axes, strict=True):
        if a == "q":
            x = lax.broadcast_in_dim(x, x.shape + (LANES,), (0, 1, 2))
        elif a in ("kv", "whole"):
            x = lax.broadcast_in_dim(x, x.shape[:2] + (SUBLANES, x.shape[2]), (0, 1, 3))
        out.append(x)
    return out


def _tpu_mod_specs(cfg: Config, ops, where):
    """BlockSpecs of the operands; ``where(*grid, ents) -> (b, h, q_block, kv_block)``."""
    bq, bk = cfg.block_q, cfg.block_kv

    def spec(x, a, bx, hx):
        def index(*g):
            b, h, qb, kb = where(*g)
            b, h = _sel(b, bx), _sel(h, hx)
            return {"q": (b, h, qb, 0), "kv": (b, h, 0, kb), "whole": (b, h, 0, 0)}[a]

        block = {"q": (bq, LANES), "kv": (SUBLANES, bk), "whole": (SUBLANES, x.shape[-1])}[a]
        return pl.BlockSpec((_SQ, _SQ) + block, index)

    return mod_specs(cfg, ops, spec)


def _tpu_mod_blocks(cfg: Config, refs):
    loaded = []
    for r, a in zip(refs, cfg.mod_axes, strict=True):
        x = r[...]
        loaded.append(x[:, :1] if a == "q" else x[:1, :] if a in ("kv", "whole") else x)
    return split_blocks(cfg, loaded)


def _tpu_partials(cfg: Config, ops, want, where):
    """Out shapes/specs of the gradient partials (one per (b, h, block) program): ``q``
    ``[B, Hq, Tq_pad, 128]``, ``kv`` ``[B, Hq, 8, Tk_pad]``, ``whole`` ``[B, Hq, nq * 8, L]``,
    ``const`` ``[B, Hq, nq, *shape]``; ``where(*grid, ents) -> (b, h, block)``."""
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    shapes, specs = [], []
    for n in want:
        x, a = ops[n], cfg.mod_axes[n]
        if a == "const":
            shape, block = (b_, hq, cfg.nq) + x.shape, (_SQ, _SQ, _SQ) + x.shape
        else:
            shape = {"q": (b_, hq, cfg.q_pad, LANES), "kv": (b_, hq, SUBLANES, cfg.kv_pad),
                     "whole": (b_, hq, cfg.nq * SUBLANES, x.shape[-1])}[a]
            block = (_SQ, _SQ) + {"q": (bq, LANES), "kv": (SUBLANES, bk),
                                  "whole": (SUBLANES, x.shape[-1])}[a]

        def index(*g, a=a, nd=x.ndim):
            b, h, blk = where(*g)
            return {"q": (b, h, blk, 0), "kv": (b, h, 0, blk), "whole": (b, h, blk, 0)}.get(
                a, (b, h, blk) + (0,) * nd)

        shapes.append(jax.ShapeDtypeStruct(shape, f32))
        specs.append(pl.BlockSpec(block, index))
    return shapes, specs


def _tpu_accumulate(cfg: Config, refs, want, dblocks):
    for r, n, d in zip(refs, want, dblocks, strict=True):
        d = grad_value(cfg, n, d, r.shape[-1])
        r[...] += d if cfg.mod_axes[n] == "const" else jnp.broadcast_to(d, r.shape)


def tpu_partials_to_compact(cfg: Config, parts, want):
    """Per-program partials -> ``[B, Hq, L]`` (``const``: ``[B, Hq, *shape]``)."""
    out = []
    for x, n in zip(parts, want, strict=True):
        a = cfg.mod_axes[n]
        if a == "q":
            x = x[..., 0]
        elif a == "kv":
            x = x[:, :, 0]
        elif a == "whole":
            x = x.reshape(x.shape[:2] + (cfg.nq, SUBLANES, x.shape[-1]))[:, :, :, 0].sum(2)
        else:
            x = x.sum(2)
        out.append(x)
    return out


def tpu_forward(cfg: Config, ents, q, k, v, sinks, seg_q, seg_k, mod_ops=()):
    """q ``[B, Hq, Tq_pad, D]``, k/v ``[B, Hkv, Tk_pad, D]`` -> o and the row stats m, log_l
    (lane-broadcast ``[B, Hq, Tq_pad, 128]``)."""
    pltpu = _tpu()
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    d, dv, g, w = q.shape[-1], v.shape[-1], cfg.group, cfg.width

    def kv_block(b, h, i, j, ent):
        return _entry(ent[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])[0]

    n_mod = len(mod_ops)

    def kernel(ent_ref, q_ref, k_ref, v_ref, sink_ref, qseg_ref, kseg_ref, *refs):
        mod_refs = refs[:n_mod]
        o_ref, m_ref, log_l_ref, m_sc, l_sc, acc_sc = refs[n_mod:]
        b, h, i, j = (pl.program_id(a) for a in range(4))

        @pl.when(j == 0)
        def _init():
            if cfg.has_sinks:
                m_sc[...] = sink_ref[0, h] * jnp.ones_like(m_sc)
                l_sc[...] = jnp.ones_like(l_sc)
            else:
                m_sc[...] = jnp.full_like(m_sc, initial_max(cfg))
                l_sc[...] = jnp.zeros_like(l_sc)
            acc_sc[...] = jnp.zeros_like(acc_sc)

        kb, kind = _entry(ent_ref[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])

        def step(masked):
            vis = _tile_visible(cfg, masked, qseg_ref, kseg_ref, i * bq, kb * bk, h)
            m, l, acc = _fwd_update(q_ref[...], k_ref[...], v_ref[...], _row_stat(m_sc),
                                    _row_stat(l_sc), acc_sc[...], vis, cfg,
                                    (b, h, i * bq, kb * bk), _tpu_mod_blocks(cfg, mod_refs))
            m_sc[...] = _lanes(m, m_sc.shape)
            l_sc[...] = _lanes(l, l_sc.shape)
            acc_sc[...] = acc

        pl.when(kind == 1)(lambda: step(True))
        pl.when(kind == 2)(lambda: step(False))

        @pl.when(j == w - 1)
        def _final():
            o, m, log_l = _finalize(_row_stat(m_sc), _row_stat(l_sc), acc_sc[...], cfg)
            o_ref[...] = o.astype(o_ref.dtype)
            m_ref[...] = _lanes(m, m_ref.shape)
            log_l_ref[...] = _lanes(log_l, log_l_ref.shape)

    sq, sk = _tpu_seg_inputs(cfg, seg_q, seg_k)
    has_seg = sq is not None
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), lambda b, h, i, j, e: (b, h, i, 0)),
        pl.BlockSpec((_SQ, _SQ, bk, d),
                     lambda b, h, i, j, e: (b, lax.div(h, g), kv_block(b, h, i, j, e), 0)),
        pl.BlockSpec((_SQ, _SQ, bk, dv),
                     lambda b, h, i, j, e: (b, lax.div(h, g), kv_block(b, h, i, j, e), 0)),
        pl.BlockSpec((SUBLANES, hq), lambda *_: (0, 0), memory_space=pltpu.SMEM)
        if cfg.has_sinks else None,
        pl.BlockSpec((_SQ, bq, LANES), lambda b, h, i, j, e: (b, i, 0)) if has_seg else None,
        pl.BlockSpec((_SQ, SUBLANES, bk), lambda b, h, i, j, e: (b, 0, kv_block(b, h, i, j, e)))
        if has_seg else None,
    ]
    mod_in = _tpu_mod_inputs(cfg, mod_ops)
    in_specs += _tpu_mod_specs(
        cfg, mod_in, lambda b, h, i, j, e: (b, h, i, kv_block(b, h, i, j, e)))
    sinks_in = (jnp.broadcast_to(sinks.astype(f32)[None], (SUBLANES, hq))
                if cfg.has_sinks else None)
    stat_spec = pl.BlockSpec((_SQ, _SQ, bq, LANES), lambda b, h, i, j, e: (b, h, i, 0))
    out_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, dv), lambda b, h, i, j, e: (b, h, i, 0)),
        stat_spec, stat_spec,
    ]
    stat_shape = jax.ShapeDtypeStruct((b_, hq, cfg.q_pad, LANES), f32)
    out_shape = [jax.ShapeDtypeStruct((b_, hq, cfg.q_pad, dv), q.dtype), stat_shape, stat_shape]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b_, hq, cfg.nq, w), in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, LANES), f32), pltpu.VMEM((bq, LANES), f32),
                        pltpu.VMEM((bq, dv), f32)],
    )
    o, m, log_l = pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=cfg.interpret,
        compiler_params=_tpu_params(pltpu, ("parallel", "parallel", "parallel", "arbitrary")),
        name="flash_fwd",
    )(ents, q, k, v, sinks_in, sq, sk, *mod_in)
    return o, m, log_l


def tpu_backward(cfg: Config, ents, ents_t, q, k, v, do, m, log_l, di, seg_q, seg_k,
                 mod_ops=()):
    """dq ``[B, Hq, Tq_pad, D]``, dk ``[B, Hkv, Tk_pad, D]``, dv ``[B, Hkv, Tk_pad, Dv]`` and the
    score_mod operands' gradients ``[B, Hq, L]`` (``const``: ``[B, Hq, *shape]``), one per
    operand (None for integer ``const`` operands).

    ``m``/``log_l``/``di`` come lane-broadcast ``[B, Hq, Tq_pad, 128]``.
    """
    pltpu = _tpu()
    b_, hq, hkv, bq, bk = cfg.batch, cfg.num_q_heads, cfg.num_kv_heads, cfg.block_q, cfg.block_kv
    d, dv, g = q.shape[-1], v.shape[-1], cfg.group
    sq, sk = _tpu_seg_inputs(cfg, seg_q, seg_k)
    has_seg = sq is not None
    n_mod = len(mod_ops)
    mod_in = _tpu_mod_inputs(cfg, mod_ops)
    floating = {n for n, x in enumerate(mod_ops) if jnp.issubdtype(x.dtype, jnp.floating)}
    want_q = tuple(n for n in wanted(cfg, "dq") if n in floating)
    want_kv = tuple(n for n in wanted(cfg, "dkv") if n in floating)

    # ---- dq: same grid and lists as the forward pass.
    def kv_block(b, h, i, j, ent):
        return _entry(ent[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])[0]

    def dq_kernel(ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref, qseg_ref,
                  kseg_ref, *refs):
        mod_refs, (dq_ref, *part_refs, dq_sc) = refs[:n_mod], refs[n_mod:]
        b, h, i, j = (pl.program_id(a) for a in range(4))

        @pl.when(j == 0)
        def _init():
            dq_sc[...] = jnp.zeros_like(dq_sc)
            for r in part_refs:
                r[...] = jnp.zeros_like(r)

        kb, kind = _entry(ent_ref[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])

        def step(masked):
            vis = _tile_visible(cfg, masked, qseg_ref, kseg_ref, i * bq, kb * bk, h)
            k_blk = k_ref[...]
            _, ds, dblocks = bwd_tile_operands(
                q_ref[...], k_blk, v_ref[...], do_ref[...], _row_stat(m_ref),
                _row_stat(log_l_ref), _row_stat(di_ref), vis, cfg, (b, h, i * bq, kb * bk),
                _tpu_mod_blocks(cfg, mod_refs), want_q)
            dq_sc[...] += _mm(ds.astype(k_blk.dtype), k_blk)
            _tpu_accumulate(cfg, part_refs, want_q, dblocks)

        pl.when(kind == 1)(lambda: step(True))
        pl.when(kind == 2)(lambda: step(False))

        @pl.when(j == cfg.width - 1)
        def _final():
            dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)

    row = lambda b, h, i, j, e: (b, h, i, 0)  # noqa: E731
    kv = lambda b, h, i, j, e: (b, lax.div(h, g), kv_block(b, h, i, j, e), 0)  # noqa: E731
    in_specs = [
        *_bwd_tile_specs(row, kv, bq, bk, d, dv),
        pl.BlockSpec((_SQ, bq, LANES), lambda b, h, i, j, e: (b, i, 0)) if has_seg else None,
        pl.BlockSpec((_SQ, SUBLANES, bk), lambda b, h, i, j, e: (b, 0, kv_block(b, h, i, j, e)))
        if has_seg else None,
        *_tpu_mod_specs(cfg, mod_in, lambda b, h, i, j, e: (b, h, i, kv_block(b, h, i, j, e))),
    ]
    part_shapes, part_specs = _tpu_partials(cfg, mod_ops, want_q,
                                            lambda b, h, i, j, e: (b, h, i))
    dq, *parts_q = pl.pallas_call(
        dq_kernel,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *part_shapes],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b_, hq, cfg.nq, cfg.width), in_specs=in_specs,
            out_specs=[pl.BlockSpec((_SQ, _SQ, bq, d), row), *part_specs],
            scratch_shapes=[pltpu.VMEM((bq, d), f32)],
        ),
        interpret=cfg.interpret,
        compiler_params=_tpu_params(pltpu, ("parallel", "parallel", "parallel", "arbitrary")),
        name="flash_bwd_dq",
    )(ents, q, k, v, do, m, log_l, di, sq, sk, *mod_in)

    # ---- dk/dv: grid (B, Hkv, nk, group, Wq); query heads of a group accumulate in scratch.
    wt = cfg.width_t

    def q_block(b, hk, c, gi, j, ent):
        h = hk * g + gi
        return _entry(ent[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), c, j])[0]

    def dkv_kernel(ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref, qseg_ref,
                   kseg_ref, *refs):
        mod_refs, (dk_ref, dv_ref, *part_refs, dk_sc, dv_sc) = refs[:n_mod], refs[n_mod:]
        b, hk, c, gi, j = (pl.program_id(a) for a in range(5))
        h = hk * g + gi

        @pl.when((gi == 0) & (j == 0))
        def _init():
            dk_sc[...] = jnp.zeros_like(dk_sc)
            dv_sc[...] = jnp.zeros_like(dv_sc)

        @pl.when(j == 0)  # the partials are per query head: one block per (b, h, key block)
        def _init_partials():
            for r in part_refs:
                r[...] = jnp.zeros_like(r)

        qb, kind = _entry(ent_ref[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), c, j])

        def step(masked):
            vis = _tile_visible(cfg, masked, qseg_ref, kseg_ref, qb * bq, c * bk, h)
            q_blk, do_blk = q_ref[...], do_ref[...]
            p, ds, dblocks = bwd_tile_operands(
                q_blk, k_ref[...], v_ref[...], do_blk, _row_stat(m_ref), _row_stat(log_l_ref),
                _row_stat(di_ref), vis, cfg, (b, h, qb * bq, c * bk),
                _tpu_mod_blocks(cfg, mod_refs), want_kv)
            dv_sc[...] += _mm(p.T.astype(do_blk.dtype), do_blk)
            dk_sc[...] += _mm(ds.T.astype(q_blk.dtype), q_blk)
            _tpu_accumulate(cfg, part_refs, want_kv, dblocks)

        pl.when(kind == 1)(lambda: step(True))
        pl.when(kind == 2)(lambda: step(False))

        @pl.when((gi == g - 1) & (j == wt - 1))
        def _final():
            dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
            dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

    qrow = lambda b, hk, c, gi, j, e: (b, hk * g + gi, q_block(b, hk, c, gi, j, e), 0)  # noqa: E731
    kvrow = lambda b, hk, c, gi, j, e: (b, hk, c, 0)  # noqa: E731
    in_specs = [
        *_bwd_tile_specs(qrow, kvrow, bq, bk, d, dv),
        pl.BlockSpec((_SQ, bq, LANES),
                     lambda b, hk, c, gi, j, e: (b, q_block(b, hk, c, gi, j, e), 0))
        if has_seg else None,
        pl.BlockSpec((_SQ, SUBLANES, bk), lambda b, hk, c, gi, j, e: (b, 0, c))
        if has_seg else None,
        *_tpu_mod_specs(cfg, mod_in, lambda b, hk, c, gi, j, e: (
            b, hk * g + gi, q_block(b, hk, c, gi, j, e), c)),
    ]
    part_shapes, part_specs = _tpu_partials(cfg, mod_ops, want_kv,
                                            lambda b, hk, c, gi, j, e: (b, hk * g + gi, c))
    dk, dv_, *parts_kv = pl.pallas_call(
        dkv_kernel,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   *part_shapes],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b_, hkv, cfg.nk, g, wt), in_specs=in_specs,
            out_specs=[pl.BlockSpec((_SQ, _SQ, bk, d), kvrow),
                       pl.BlockSpec((_SQ, _SQ, bk, dv), kvrow), *part_specs],
            scratch_shapes=[pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, dv), f32)],
        ),
        interpret=cfg.interpret,
        compiler_params=_tpu_params(
            pltpu, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        name="flash_bwd_dkv",
    )(ents_t, q, k, v, do, m, log_l, di, sq, sk, *mod_in)
    dmods = [None] * n_mod
    for n, x in zip(want_q + want_kv, tpu_partials_to_compact(cfg, parts_q, want_q)
                    + tpu_partials_to_compact(cfg, parts_kv, want_kv), strict=True):
        dmods[n] = x
    return dq, dk, dv_, dmods
