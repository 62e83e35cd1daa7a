"""Kernel bodies and the two pallas_call drivers (TPU Mosaic, GPU Triton) for flash.py.

The math of one (query block, key block) tile lives in backend-neutral functions
(``_logits``, ``_visible``, ``_fwd_update``, ``_bwd_tile``); two drivers feed them:

* TPU: grid ``(B, Hq, nq, W)`` with the key-block axis innermost and sequential; the
  compacted block list is scalar-prefetched into SMEM and the k/v index maps follow it, so
  empty blocks are never DMA'd; running max / sum / accumulator live in VMEM scratch; row
  statistics are stored lane-broadcast ``[..., T, 128]`` as in splash attention. The dk/dv
  pass runs over ``(B, Hkv, nk, Hq // Hkv, Wq)`` and accumulates the query heads that share
  a kv head in scratch (GQA without copying k/v).
* GPU (Triton lowering): grid ``(nq, B, Hq)``; the kernel holds one query block and loops
  ``count`` times over its list, slicing the whole-sequence k/v refs (Triton has no scalar
  prefetch and no sequential grid axes). The dk/dv pass writes one slice per query head
  (fp32 when Hq > Hkv) and the wrapper sums the heads of a group.

Partial blocks evaluate ``mask_fn`` (plus key bounds and segment ids) from iota; full blocks
skip it. The forward pass saves each row's max ``m`` and ``log l`` separately, and the backward
recomputes ``p = exp((s - m) - log l)``: with huge logits (``|m| >> log l``) the fp32 sum
``lse = m + log l`` rounds ``log l`` away, and ``exp(s - lse)`` would give each of ``l`` tied keys
weight 1 instead of ``1 / l``. Rows with no visible key get ``l = 0``: output 0 and ``m = +inf``,
``log l = 0``, so every recomputed weight is exactly 0 and every gradient stays finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LANES, SUBLANES = 128, 8
_NT = (((1,), (1,)), ((), ()))
_SQ = getattr(pl, "squeezed", None)  # squeezed block dim (None in older JAX)
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one flash call (hashable: custom_vjp nondiff argument)."""

    backend: str  # "tpu" | "cuda"
    interpret: bool
    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    block_q: int
    block_kv: int
    nq: int
    nk: int
    width: int  # forward / dq list width (TPU grid extent)
    width_t: int  # dk/dv list width
    map_batch: int  # 1 or B: leading dims of the block lists
    map_heads: int  # 1 or Hq
    scale: float
    soft_cap: float | None
    mask_fn: Callable | None
    has_sinks: bool
    has_segments: bool
    # score_mod(s, b, h, q_idx, kv_idx) capturing no arrays (jattn checks), applied to the
    # scaled logits before the soft-cap; scalars b, h and [bq, bk] iota indices.
    score_mod: Callable | None = None

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_pad(self) -> int:
        return self.nq * self.block_q

    @property
    def kv_pad(self) -> int:
        return self.nk * self.block_kv


# ------------------------------------------------------------------------------------------
# Tile math shared by both drivers.
# ------------------------------------------------------------------------------------------
def _logits(q, k, cfg: Config, pos):
    """``s = cap(score_mod(scale * q k^T))`` in fp32 and ``ds / d(scale q k^T)`` (None if 1).

    ``pos = (b, h, q0, k0)``: the tile's batch, query head and first row/column (score_mod).
    """
    s = lax.dot_general(q, k, _NT, preferred_element_type=f32) * cfg.scale
    grad = None
    if cfg.score_mod is not None:
        b, h, q0, k0 = pos
        shape = (cfg.block_q, cfg.block_kv)
        # clamp padding rows/columns into the sequence, as the xla path does
        qi = jnp.minimum(q0 + lax.broadcasted_iota(jnp.int32, shape, 0), cfg.q_len - 1)
        ki = jnp.minimum(k0 + lax.broadcasted_iota(jnp.int32, shape, 1), cfg.kv_len - 1)
        # elementwise in s, so the JVP with a tangent of ones is the derivative
        s, grad = jax.jvp(lambda x: cfg.score_mod(x, b, h, qi, ki).astype(f32), (s,),
                          (jnp.ones_like(s),))
    if cfg.soft_cap is None:
        return s, grad
    t = jnp.tanh(s * (1.0 / cfg.soft_cap))
    cap_grad = 1.0 - t * t
    return t * cfg.soft_cap, cap_grad if grad is None else cap_grad * grad


def _visible(cfg: Config, q0, k0, head, q_seg, k_seg):
    """Bool ``[bq, bk]`` of visible pairs in the tile at rows ``q0``, columns ``k0``."""
    shape = (cfg.block_q, cfg.block_kv)
    qi = q0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    ki = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = ki < cfg.kv_len
    if cfg.mask_fn is not None:
        vis = vis & cfg.mask_fn(qi, ki, head)
    if q_seg is not None:
        vis = vis & (q_seg == k_seg)
    return vis


def _fwd_update(q, k, v, m_prev, l_prev, acc_prev, vis, cfg: Config, pos):
    """One online-softmax step; ``m, l`` are ``[bq]``, ``acc`` is ``[bq, Dv]`` (fp32)."""
    s, _ = _logits(q, k, cfg, pos)
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=f32)
    return m_new, l_new, alpha[:, None] * acc_prev + pv


def _finalize(m, l, acc):
    """Output ``acc / l`` (0 where l = 0) and the backward's row stats ``m`` (+inf where
    l = 0) and ``log l`` (0 where l = 0)."""
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o = acc / l_safe[:, None]
    return o, jnp.where(empty, jnp.inf, m), jnp.log(l_safe)


def _bwd_tile(q, k, v, do, m, log_l, di, vis, cfg: Config, pos):
    """``p`` and ``ds = dL/ds`` (before ``scale``) of a tile; m, log_l, di are ``[bq]``."""
    s, grad = _logits(q, k, cfg, pos)
    p = jnp.exp((s - m[:, None]) - log_l[:, None])  # s - m first: exact for tied maxima
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
    ds = p * (dp - di[:, None])
    if grad is not None:
        ds = ds * grad
    return p, ds


def _mm(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=f32)


def _entry(e):
    """Unpack ``block * 4 + kind``."""
    return lax.div(e, 4), lax.rem(e, 4)


def _sel(idx, n):
    return idx if n > 1 else 0


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


def tpu_forward(cfg: Config, ents, q, k, v, sinks, seg_q, seg_k):
    """q ``[B, Hq, Tq_pad, D]``, k/v ``[B, Hkv, Tk_pad, D]`` -> o and the row stats m, log_l
    (lane-broadcast ``[B, Hq, Tq_pad, 128]``)."""
    pltpu = _tpu()
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    d, dv, g, w = q.shape[-1], v.shape[-1], cfg.group, cfg.width

    def kv_block(b, h, i, j, ent):
        return _entry(ent[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])[0]

    def kernel(ent_ref, q_ref, k_ref, v_ref, sink_ref, qseg_ref, kseg_ref,
               o_ref, m_ref, log_l_ref, m_sc, l_sc, acc_sc):
        b, h, i, j = (pl.program_id(a) for a in range(4))

        @pl.when(j == 0)
        def _init():
            if cfg.has_sinks:
                m_sc[...] = sink_ref[0, h] * jnp.ones_like(m_sc)
                l_sc[...] = jnp.ones_like(l_sc)
            else:
                m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
                l_sc[...] = jnp.zeros_like(l_sc)
            acc_sc[...] = jnp.zeros_like(acc_sc)

        kb, kind = _entry(ent_ref[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])

        def step(masked):
            vis = None
            if masked:
                q_seg, k_seg = _tpu_segs(qseg_ref, kseg_ref)
                vis = _visible(cfg, i * bq, kb * bk, h, q_seg, k_seg)
            m, l, acc = _fwd_update(q_ref[...], k_ref[...], v_ref[...], _row_stat(m_sc),
                                    _row_stat(l_sc), acc_sc[...], vis, cfg,
                                    (b, h, i * bq, kb * bk))
            m_sc[...] = _lanes(m, m_sc.shape)
            l_sc[...] = _lanes(l, l_sc.shape)
            acc_sc[...] = acc

        pl.when(kind == 1)(lambda: step(True))
        pl.when(kind == 2)(lambda: step(False))

        @pl.when(j == w - 1)
        def _final():
            o, m, log_l = _finalize(_row_stat(m_sc), _row_stat(l_sc), acc_sc[...])
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
    )(ents, q, k, v, sinks_in, sq, sk)
    return o, m, log_l


def tpu_backward(cfg: Config, ents, ents_t, q, k, v, do, m, log_l, di, seg_q, seg_k):
    """dq ``[B, Hq, Tq_pad, D]``, dk ``[B, Hkv, Tk_pad, D]``, dv ``[B, Hkv, Tk_pad, Dv]``.

    ``m``/``log_l``/``di`` come lane-broadcast ``[B, Hq, Tq_pad, 128]``.
    """
    pltpu = _tpu()
    b_, hq, hkv, bq, bk = cfg.batch, cfg.num_q_heads, cfg.num_kv_heads, cfg.block_q, cfg.block_kv
    d, dv, g = q.shape[-1], v.shape[-1], cfg.group
    sq, sk = _tpu_seg_inputs(cfg, seg_q, seg_k)
    has_seg = sq is not None

    # ---- dq: same grid and lists as the forward pass.
    def kv_block(b, h, i, j, ent):
        return _entry(ent[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])[0]

    def dq_kernel(ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref, qseg_ref,
                  kseg_ref, dq_ref, dq_sc):
        b, h, i, j = (pl.program_id(a) for a in range(4))

        @pl.when(j == 0)
        def _init():
            dq_sc[...] = jnp.zeros_like(dq_sc)

        kb, kind = _entry(ent_ref[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), i, j])

        def step(masked):
            vis = None
            if masked:
                q_seg, k_seg = _tpu_segs(qseg_ref, kseg_ref)
                vis = _visible(cfg, i * bq, kb * bk, h, q_seg, k_seg)
            k_blk = k_ref[...]
            _, ds = _bwd_tile(q_ref[...], k_blk, v_ref[...], do_ref[...], _row_stat(m_ref),
                              _row_stat(log_l_ref), _row_stat(di_ref), vis, cfg,
                              (b, h, i * bq, kb * bk))
            dq_sc[...] += _mm(ds.astype(k_blk.dtype), k_blk)

        pl.when(kind == 1)(lambda: step(True))
        pl.when(kind == 2)(lambda: step(False))

        @pl.when(j == cfg.width - 1)
        def _final():
            dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)

    row = lambda b, h, i, j, e: (b, h, i, 0)  # noqa: E731
    kv = lambda b, h, i, j, e: (b, lax.div(h, g), kv_block(b, h, i, j, e), 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), row),
        pl.BlockSpec((_SQ, _SQ, bk, d), kv),
        pl.BlockSpec((_SQ, _SQ, bk, dv), kv),
        pl.BlockSpec((_SQ, _SQ, bq, dv), row),
        pl.BlockSpec((_SQ, _SQ, bq, LANES), row),
        pl.BlockSpec((_SQ, _SQ, bq, LANES), row),
        pl.BlockSpec((_SQ, _SQ, bq, LANES), row),
        pl.BlockSpec((_SQ, bq, LANES), lambda b, h, i, j, e: (b, i, 0)) if has_seg else None,
        pl.BlockSpec((_SQ, SUBLANES, bk), lambda b, h, i, j, e: (b, 0, kv_block(b, h, i, j, e)))
        if has_seg else None,
    ]
    dq = pl.pallas_call(
        dq_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b_, hq, cfg.nq, cfg.width), in_specs=in_specs,
            out_specs=pl.BlockSpec((_SQ, _SQ, bq, d), row),
            scratch_shapes=[pltpu.VMEM((bq, d), f32)],
        ),
        interpret=cfg.interpret,
        compiler_params=_tpu_params(pltpu, ("parallel", "parallel", "parallel", "arbitrary")),
        name="flash_bwd_dq",
    )(ents, q, k, v, do, m, log_l, di, sq, sk)

    # ---- dk/dv: grid (B, Hkv, nk, group, Wq); query heads of a group accumulate in scratch.
    wt = cfg.width_t

    def q_block(b, hk, c, gi, j, ent):
        h = hk * g + gi
        return _entry(ent[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), c, j])[0]

    def dkv_kernel(ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref, qseg_ref,
                   kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc):
        b, hk, c, gi, j = (pl.program_id(a) for a in range(5))
        h = hk * g + gi

        @pl.when((gi == 0) & (j == 0))
        def _init():
            dk_sc[...] = jnp.zeros_like(dk_sc)
            dv_sc[...] = jnp.zeros_like(dv_sc)

        qb, kind = _entry(ent_ref[_sel(b, cfg.map_batch), _sel(h, cfg.map_heads), c, j])

        def step(masked):
            vis = None
            if masked:
                q_seg, k_seg = _tpu_segs(qseg_ref, kseg_ref)
                vis = _visible(cfg, qb * bq, c * bk, h, q_seg, k_seg)
            q_blk, do_blk = q_ref[...], do_ref[...]
            p, ds = _bwd_tile(q_blk, k_ref[...], v_ref[...], do_blk, _row_stat(m_ref),
                              _row_stat(log_l_ref), _row_stat(di_ref), vis, cfg,
                              (b, h, qb * bq, c * bk))
            dv_sc[...] += _mm(p.T.astype(do_blk.dtype), do_blk)
            dk_sc[...] += _mm(ds.T.astype(q_blk.dtype), q_blk)

        pl.when(kind == 1)(lambda: step(True))
        pl.when(kind == 2)(lambda: step(False))

        @pl.when((gi == g - 1) & (j == wt - 1))
        def _final():
            dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
            dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

    qrow = lambda b, hk, c, gi, j, e: (b, hk * g + gi, q_block(b, hk, c, gi, j, e), 0)  # noqa: E731
    kvrow = lambda b, hk, c, gi, j, e: (b, hk, c, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), qrow),
        pl.BlockSpec((_SQ, _SQ, bk, d), kvrow),
        pl.BlockSpec((_SQ, _SQ, bk, dv), kvrow),
        pl.BlockSpec((_SQ, _SQ, bq, dv), qrow),
        pl.BlockSpec((_SQ, _SQ, bq, LANES), qrow),
        pl.BlockSpec((_SQ, _SQ, bq, LANES), qrow),
        pl.BlockSpec((_SQ, _SQ, bq, LANES), qrow),
        pl.BlockSpec((_SQ, bq, LANES),
                     lambda b, hk, c, gi, j, e: (b, q_block(b, hk, c, gi, j, e), 0))
        if has_seg else None,
        pl.BlockSpec((_SQ, SUBLANES, bk), lambda b, hk, c, gi, j, e: (b, 0, c))
        if has_seg else None,
    ]
    dk, dv_ = pl.pallas_call(
        dkv_kernel,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b_, hkv, cfg.nk, g, wt), in_specs=in_specs,
            out_specs=[pl.BlockSpec((_SQ, _SQ, bk, d), kvrow),
                       pl.BlockSpec((_SQ, _SQ, bk, dv), kvrow)],
            scratch_shapes=[pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, dv), f32)],
        ),
        interpret=cfg.interpret,
        compiler_params=_tpu_params(
            pltpu, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        name="flash_bwd_dkv",
    )(ents_t, q, k, v, do, m, log_l, di, sq, sk)
    return dq, dk, dv_


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
    return (_sel(b, cfg.map_batch) * cfg.map_heads + _sel(h, cfg.map_heads)) * n_rows + i


def gpu_forward(cfg: Config, ents, cnts, q, k, v, sinks, seg_q, seg_k):
    """q ``[B, Tq_pad, Hq, D]``, k/v ``[B, Tk_pad, Hkv, D]`` -> o, m, log_l ``[B, Hq, Tq_pad]``."""
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    d, dv, g, w = q.shape[-1], v.shape[-1], cfg.group, cfg.width
    ents_f, cnts_f = _pow2_pad(ents.reshape(-1)), _pow2_pad(cnts.reshape(-1))
    has_seg = seg_q is not None

    def kernel(cnt_ref, ent_ref, q_ref, k_ref, v_ref, sink_ref, qseg_ref, kseg_ref,
               o_ref, m_ref, log_l_ref):
        i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row = _gpu_row(cfg, b, h, i, cfg.nq)
        q_blk = q_ref[...]
        q_seg = qseg_ref[...][:, None] if has_seg else None
        if cfg.has_sinks:
            m0 = jnp.zeros((bq,), f32) + sink_ref[h]
            l0 = jnp.ones((bq,), f32)
        else:
            m0 = jnp.full((bq,), MASK_VALUE, f32)
            l0 = jnp.zeros((bq,), f32)
        acc0 = jnp.zeros((bq, dv), f32)

        def body(j, carry):
            kb, kind = _entry(ent_ref[row * w + j])
            sl = pl.ds(kb * bk, bk)
            k_blk, v_blk = k_ref[sl, :], v_ref[sl, :]

            def masked(c):
                k_seg = kseg_ref[sl][None, :] if has_seg else None
                vis = _visible(cfg, i * bq, kb * bk, h, q_seg, k_seg)
                return _fwd_update(q_blk, k_blk, v_blk, *c, vis, cfg, (b, h, i * bq, kb * bk))

            def full(c):
                return _fwd_update(q_blk, k_blk, v_blk, *c, None, cfg, (b, h, i * bq, kb * bk))

            return lax.cond(kind == 1, masked, full, carry)

        m, l, acc = lax.fori_loop(0, cnt_ref[row], body, (m0, l0, acc0))
        o, m, log_l = _finalize(m, l, acc)
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
    )(cnts_f, ents_f, q, k, v, sinks_in, seg_q_in, seg_k_in)
    return o, m, log_l


def gpu_backward(cfg: Config, ents, cnts, ents_t, cnts_t, q, k, v, do, m, log_l, di, seg_q,
                 seg_k):
    """dq ``[B, Tq_pad, Hq, D]``; dk/dv ``[B, Tk_pad, Hkv, .]`` (summed over each group)."""
    b_, hq, bq, bk = cfg.batch, cfg.num_q_heads, cfg.block_q, cfg.block_kv
    d, dv, g = q.shape[-1], v.shape[-1], cfg.group
    has_seg = seg_q is not None
    params = _triton_params(d)

    # ---- dq
    ents_f, cnts_f = _pow2_pad(ents.reshape(-1)), _pow2_pad(cnts.reshape(-1))
    w = cfg.width

    def dq_kernel(cnt_ref, ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref,
                  qseg_ref, kseg_ref, dq_ref):
        i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row = _gpu_row(cfg, b, h, i, cfg.nq)
        q_blk, do_blk, di_r = q_ref[...], do_ref[...], di_ref[...]
        m_r, log_l_r = m_ref[...], log_l_ref[...]
        q_seg = qseg_ref[...][:, None] if has_seg else None

        def body(j, acc):
            kb, kind = _entry(ent_ref[row * w + j])
            sl = pl.ds(kb * bk, bk)
            k_blk, v_blk = k_ref[sl, :], v_ref[sl, :]

            def tile(vis):
                _, ds = _bwd_tile(q_blk, k_blk, v_blk, do_blk, m_r, log_l_r, di_r, vis, cfg,
                                  (b, h, i * bq, kb * bk))
                return acc + _mm(ds.astype(k_blk.dtype), k_blk)

            def masked():
                k_seg = kseg_ref[sl][None, :] if has_seg else None
                return tile(_visible(cfg, i * bq, kb * bk, h, q_seg, k_seg))

            return lax.cond(kind == 1, masked, lambda: tile(None))

        acc = lax.fori_loop(0, cnt_ref[row], body, jnp.zeros((bq, d), f32))
        dq_ref[...] = (acc * cfg.scale).astype(dq_ref.dtype)

    qspec = lambda dd: pl.BlockSpec((_SQ, bq, _SQ, dd), lambda i, b, h: (b, i, h, 0))  # noqa: E731
    kvfull = lambda dd: pl.BlockSpec(  # noqa: E731
        (_SQ, cfg.kv_pad, _SQ, dd), lambda i, b, h: (b, 0, lax.div(h, g), 0))
    stat = pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))
    in_specs = [_full(cnts_f), _full(ents_f), qspec(d), kvfull(d), kvfull(dv), qspec(dv),
                stat, stat, stat,
                pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)) if has_seg else None,
                pl.BlockSpec((_SQ, cfg.kv_pad), lambda i, b, h: (b, 0)) if has_seg else None]
    dq = pl.pallas_call(
        dq_kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(cfg.nq, b_, hq), in_specs=in_specs, out_specs=qspec(d),
        interpret=cfg.interpret, compiler_params=params, name="flash_bwd_dq",
    )(cnts_f, ents_f, q, k, v, do, m, log_l, di, seg_q, seg_k)

    # ---- dk/dv: one program per (key block, batch, query head).
    ents_tf, cnts_tf = _pow2_pad(ents_t.reshape(-1)), _pow2_pad(cnts_t.reshape(-1))
    wt = cfg.width_t

    def dkv_kernel(cnt_ref, ent_ref, q_ref, k_ref, v_ref, do_ref, m_ref, log_l_ref, di_ref,
                   qseg_ref, kseg_ref, dk_ref, dv_ref):
        c, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row = _gpu_row(cfg, b, h, c, cfg.nk)
        k_blk, v_blk = k_ref[...], v_ref[...]
        k_seg = kseg_ref[...][None, :] if has_seg else None

        def body(j, carry):
            dk_acc, dv_acc = carry
            qb, kind = _entry(ent_ref[row * wt + j])
            sl = pl.ds(qb * bq, bq)
            q_blk, do_blk = q_ref[sl, :], do_ref[sl, :]
            m_r, log_l_r, di_r = m_ref[sl], log_l_ref[sl], di_ref[sl]

            def tile(vis):
                p, ds = _bwd_tile(q_blk, k_blk, v_blk, do_blk, m_r, log_l_r, di_r, vis, cfg,
                                  (b, h, qb * bq, c * bk))
                return (dk_acc + _mm(ds.T.astype(q_blk.dtype), q_blk),
                        dv_acc + _mm(p.T.astype(do_blk.dtype), do_blk))

            def masked():
                q_seg = qseg_ref[sl][:, None] if has_seg else None
                return tile(_visible(cfg, qb * bq, c * bk, h, q_seg, k_seg))

            return lax.cond(kind == 1, masked, lambda: tile(None))

        dk_acc, dv_acc = lax.fori_loop(0, cnt_ref[row], body,
                                       (jnp.zeros((bk, d), f32), jnp.zeros((bk, dv), f32)))
        dk_ref[...] = (dk_acc * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc.astype(dv_ref.dtype)

    kvspec = lambda dd: pl.BlockSpec((_SQ, bk, _SQ, dd), lambda c, b, h: (b, c, lax.div(h, g), 0))  # noqa: E731
    qfull = lambda dd: pl.BlockSpec((_SQ, cfg.q_pad, _SQ, dd), lambda c, b, h: (b, 0, h, 0))  # noqa: E731
    statf = pl.BlockSpec((_SQ, _SQ, cfg.q_pad), lambda c, b, h: (b, h, 0))
    outspec = lambda dd: pl.BlockSpec((_SQ, bk, _SQ, dd), lambda c, b, h: (b, c, h, 0))  # noqa: E731
    in_specs = [_full(cnts_tf), _full(ents_tf), qfull(d), kvspec(d), kvspec(dv), qfull(dv),
                statf, statf, statf,
                pl.BlockSpec((_SQ, cfg.q_pad), lambda c, b, h: (b, 0)) if has_seg else None,
                pl.BlockSpec((_SQ, bk), lambda c, b, h: (b, c)) if has_seg else None]
    acc_dtype = (lambda x: x.dtype) if g == 1 else (lambda x: f32)
    dk, dv_ = pl.pallas_call(
        dkv_kernel,
        out_shape=[jax.ShapeDtypeStruct((b_, cfg.kv_pad, hq, d), acc_dtype(k)),
                   jax.ShapeDtypeStruct((b_, cfg.kv_pad, hq, dv), acc_dtype(v))],
        grid=(cfg.nk, b_, hq), in_specs=in_specs, out_specs=[outspec(d), outspec(dv)],
        interpret=cfg.interpret, compiler_params=params, name="flash_bwd_dkv",
    )(cnts_tf, ents_tf, q, k, v, do, m, log_l, di, seg_q, seg_k)
    if g > 1:
        dk = dk.reshape(b_, cfg.kv_pad, cfg.num_kv_heads, g, d).sum(3).astype(k.dtype)
        dv_ = dv_.reshape(b_, cfg.kv_pad, cfg.num_kv_heads, g, dv).sum(3).astype(v.dtype)
    return dq, dk, dv_


__all__ = ["Config", "MASK_VALUE", "tpu_forward", "tpu_backward", "gpu_forward",
           "gpu_backward"]
