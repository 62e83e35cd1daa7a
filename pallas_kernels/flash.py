"""Block-sparse flash attention (forward and backward) in Pallas, for TPU and GPU.

Math (per batch b, query head h, kv head ``h // (Hq // Hkv)``)::

    s_ij = scale * q_i . k_j             (optionally  s <- c * tanh(s / c))
    p_ij = exp(s_ij) / (exp(sink_h) + sum_{visible j'} exp(s_ij'))   over visible j
    o_i  = sum_j p_ij v_j,     lse_i = log(exp(sink_h) + sum_j exp(s_ij))

computed with the online softmax of FlashAttention (Dao et al. 2022; FlashAttention-2, Dao
2023): for each query block, a running max ``m``, sum ``l`` and fp32 accumulator visit only
the non-empty key blocks. Block sparsity follows splash attention (JAX's
``pallas/ops/tpu/splash_attention``): a block map (0 empty / 1 partial / 2 full) is compacted
per query block into a list of non-empty key blocks; empty blocks are neither loaded nor
computed, full blocks skip the mask, partial blocks evaluate ``mask_fn`` on iota indices.
Sinks (per-head logits in the denominator, "attention sinks", Xiao et al. 2023; gpt-oss)
initialise ``m = sink, l = 1``. The backward pass (custom VJP) recomputes
``p = exp((s - m) - log l)`` from the saved row max ``m`` and ``log l``, with
``di = rowsum(o * do)`` precomputed::

    ds_ij = p_ij (do_i . v_j - di_i)      (times 1 - tanh^2 with a soft cap)
    dq = scale * ds k,  dk = scale * ds^T q,  dv = p^T do,
    dsink_h = -sum_i exp(sink_h - lse_i) di_i

``m`` and ``log l`` are kept apart because with huge logits (``|m| >> log l``: logits of 1e7,
or a -1e9 bias) the fp32 ``lse = m + log l`` loses ``log l`` to rounding, and ``exp(s - lse)``
would weigh each of ``l`` tied keys 1 instead of ``1 / l``.

using the forward lists for dq and the transposed lists (per key block, the non-empty query
blocks) for dk/dv. A query row with no visible key (and no sink) outputs 0, gets zero
gradients and ``lse = -inf``.

``normalizer="softpick"`` (Zuhri et al., "Softpick: No Attention Sink, No Massive Activations
with Rectified Softmax", 2025) swaps the softmax for::

    p_ij = relu(e^{s_ij} - 1) / (sum_{visible j'} |e^{s_ij'} - 1| + eps),   eps = 1e-6

streamed with the same running max, clamped at ``m >= 0``: ``e^s - 1 = e^m (e^{s-m} - e^{-m})``,
so numerator and denominator rescale by ``e^{m_old - m_new}`` like the softmax's and no
``e^s`` is ever formed (no fp32 overflow); ``eps`` does not rescale and joins once at the end as
``eps e^{-m}``. Masked keys add 0 to the denominator. The row stats are ``m`` and ``log z``
(``z = Z e^{-m}``), the "lse" is ``log Z`` (a row that sees nothing: ``log eps``, output 0), and
the backward uses ``ds_ij = e^{s_ij} / Z ([s_ij > 0] dp_ij - sign(s_ij) di_i)``. No sinks.

Stick-breaking attention (Tan et al. 2024) is not a kernel normalizer: its weights need, per
query row, the sum of ``log(1 - sigmoid(s))`` over every visible key to the right, and its
``ds_ik`` the sum of ``p dp`` over keys to the left. The forward and dq passes could carry
both right to left through a row's key blocks, but the dk/dv pass owns one key block and
visits query blocks: it would need those per-(row, key block) prefix sums from another pass
(two extra ``[B, Hq, Tq, nk]`` residuals: 1 GiB per batch row and head at T = 128k with
128-wide blocks, or an O(nk) recomputation per tile), which breaks the kernel's O(T)
residuals. ``jattn`` serves it with the blocked xla path (which walks each query block's
key blocks right to left inside one loop, dk/dv included).

A ``score_mod`` (FlexAttention's idea) is applied to the scaled logits before the cap; the arrays
it reads are kernel operands (``score_mod_operands``): per-query-position arrays sliced to the
program's query block and per-key-position arrays to the key block by their BlockSpecs (e.g.
FoX's gate cumsums), small per-(batch, head) tables read whole (ALiBi slopes, T5 buckets; their
entries picked by one-hot sums, as neither Mosaic nor Triton lowers a gather). The backward
kernels pull each tile's ``ds`` back through the score_mod (``jax.vjp`` inside the kernel) and
accumulate each operand's cotangent into a per-program partial output (the dq pass for
query-indexed and whole operands, the dk/dv pass for key-indexed ones); the wrapper sums the
partials over programs, batch and heads with ordinary XLA reductions. No atomics, so operand
gradients are bitwise reproducible (FlexAttention accumulates them with atomics on GPU).

Backends and JAX versions (tested range pinned in ``pyproject.toml``: jax >= 0.10.2, < 0.12):

* TPU (Mosaic): ``pltpu.PrefetchScalarGridSpec`` with the block lists scalar-prefetched into
  SMEM so the k/v index maps jump over empty blocks (no DMA), VMEM scratch accumulators,
  ``pltpu.CompilerParams`` (older JAX named it ``TPUCompilerParams``; looked up by name). Use
  block sizes that are multiples of 128 on real TPUs (segment ids and stats are lane-broadcast).
  A ``mask_fn`` must avoid ``jnp.floor_divide``/``jnp.remainder`` to cross-lower from a CPU
  host: they go through ``sign``, whose Mosaic rule asks the (absent) TPU for its generation.
  ``jattn.masks`` divides with ``lax.div``/``lax.rem`` for that reason.
* GPU: the Triton lowering, selected by passing ``jax.experimental.pallas.triton``'s
  ``CompilerParams``. Available in every JAX of the pinned range; JAX 0.11 deprecates it in
  favour of Mosaic GPU (already the default ``pallas_call`` GPU lowering in 0.10.2) but still
  ships it. Exported modules carry the ``__gpu$xla.gpu.triton`` custom call.
  The GPU kernels loop over the lists inside the kernel (Triton has no scalar prefetch).
  Block sizes and head dims are powers of two (>= 16; head dims are zero-padded). On Hopper
  the forward runs through Mosaic GPU instead (``_flash_mosaic_gpu``: wgmma, TMA, warp
  specialisation; same row stats, so this backward serves it); the backward stays Triton.
* CPU: interpret mode (``interpret=None`` picks it on CPU) runs either driver; ``backend``
  picks the lowering so a CPU host can ``jax.export`` for ``("tpu",)`` or ``("cuda",)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _flash_kernels as fk
from pallas_kernels import _flash_mosaic_gpu as mgpu
from pallas_kernels import block_map as bsp
from pallas_kernels._flash_operands import (
    check_mod_operands,
    gpu_dim,
    pad_axis,
    pad_mod_operand,
    pl_next_pow2,
)

__all__ = ["flash_attention", "resolve_backend", "block_sizes", "NORMALIZERS"]

NORMALIZERS = fk.NORMALIZERS  # the normalizers the kernel computes


def resolve_backend(backend: str | None) -> str:
    """``"tpu"`` or ``"cuda"``: the lowering to build (None: the default platform; CPU -> tpu)."""
    if backend is None:
        return "cuda" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"
    if not isinstance(backend, str) or backend.lower() not in ("tpu", "cuda", "gpu"):
        raise ValueError(f"backend must be None, 'tpu', 'cuda' or 'gpu', got {backend!r}")
    return "tpu" if backend.lower() == "tpu" else "cuda"


def _check_block(n, name, backend):
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    n = int(n)
    if backend == "cuda" and (n & (n - 1) or n < 16):
        raise ValueError(f"{name} must be a power of two >= 16 on GPU (Triton), got {n}")
    if backend == "tpu" and n % 8:
        raise ValueError(f"{name} must be a multiple of 8 on TPU, got {n}")
    return n


def block_sizes(q_len: int, kv_len: int, block_q: int = 128, block_kv: int = 128,
                backend: str | None = None) -> tuple[int, int]:
    """The block sizes the kernel uses: the requested ones, clamped for short sequences.

    A clamped block still covers the whole (short) sequence, so a block map computed for the
    requested sizes stays valid (one block either way).
    """
    backend = resolve_backend(backend)
    floor = 16 if backend == "cuda" else 8
    bq = _check_block(block_q, "block_q", backend)
    bk = _check_block(block_kv, "block_kv", backend)
    bq = min(bq, max(floor, pl_next_pow2(q_len)))
    bk = min(bk, max(floor, pl_next_pow2(kv_len)))
    return bq, bk


def flash_attention(
    q,
    k,
    v,
    *,
    block_map=None,
    mask_fn: Callable | None = None,
    scale: float | None = None,
    sinks=None,
    logits_soft_cap: float | None = None,
    segment_ids=None,
    block_q: int = 128,
    block_kv: int = 128,
    return_lse: bool = False,
    interpret: bool | None = None,
    backend: str | None = None,
    score_mod: Callable | None = None,
    score_mod_operands: tuple = (),
    score_mod_axes: tuple = (),
    normalizer: str = "softmax",
):
    """Block-sparse flash attention. Differentiable in q, k, v, sinks and the score_mod operands
    (custom VJP).

    Args:
      q: ``[B, Tq, Hq, D]``. k: ``[B, Tk, Hkv, D]``. v: ``[B, Tk, Hkv, Dv]``; ``Hq % Hkv == 0``.
      block_map: int ``[nq, nk]``, ``[Hq, nq, nk]`` or ``[B|1, Hq|1, nq, nk]`` (0 empty,
        1 partial, 2 full; may be traced: run-time block sparsity, compacted on device) for
        ``(block_q, block_kv)`` over the sequences padded to whole blocks, or None (every
        block partial if ``mask_fn`` is given, else full except padded key blocks).
      mask_fn: ``f(q_idx, kv_idx, head) -> bool`` of jnp integer ops (True = visible),
        evaluated in partial blocks only; key padding is always masked.
      scale: logit scale, default ``1/sqrt(D)``. logits_soft_cap: ``c`` in ``c*tanh(s/c)``.
        Both static (concrete Python/NumPy scalars: traced values cannot be checked or baked
        in) and finite (NaN/inf are a ValueError); ``c > 0``.
      sinks: float ``[Hq]`` per-head sink logits (denominator only).
      segment_ids: int ``[B, T]`` (needs ``Tq == Tk``) or a pair ``([B, Tq], [B, Tk])``.
      block_q, block_kv: tile sizes (clamped for short sequences, see :func:`block_sizes`).
      return_lse: also return ``lse [B, Hq, Tq]`` (fp32; ``-inf`` for rows seeing nothing).
      interpret: None = interpret mode on CPU only. backend: None / "tpu" / "cuda" / "gpu".
      score_mod: ``f(s, b, h, q_idx, kv_idx, *blocks) -> s'`` elementwise on fp32 logits
        (after ``scale``, before the cap), with scalar ``b``, ``h``, ``[block_q, block_kv]``
        int32 positions and one block per operand; it must capture no arrays (they would be
        kernel constants without gradients): pass them as ``score_mod_operands``.
      score_mod_operands, score_mod_axes: arrays the score_mod reads, and per array how:
        ``"q"``: float ``[B|1, Hq|1, Tq]`` (a per-query-position value; block ``[block_q, 1]``),
        ``"kv"``: float ``[B|1, Hq|1, Tk]`` (block ``[1, block_kv]``), ``"whole"``: float
        ``[B|1, Hq|1, L]``, a small table per (batch, head) handed to ``f`` as a tuple of ``L``
        ``[1, 1]`` entries (no gather needed in the kernel), ``"const"``: any array, passed
        whole as it is (in-kernel gathers need interpret mode or a lowering that has them).
        Their gradients are reduced from per-program partials written by the backward kernels
        (the dq pass for ``q``/``whole``/``const``, the dk/dv pass for ``kv``), summed outside
        the kernel in a fixed order: no atomics, the same bits every run.
      normalizer: ``"softmax"`` or ``"softpick"`` (see the module docstring; no sinks). With
        softpick, ``lse`` is ``log(sum_j |e^{s_ij} - 1| + eps)`` (``log eps`` for a row that sees
        nothing), differentiable like the softmax's.

    Returns:
      ``o [B, Tq, Hq, Dv]`` in ``q.dtype`` (and ``lse`` when ``return_lse``). ``B``, ``Tq`` or
      ``Tk`` = 0 launch nothing and return the closed form: ``o = 0``, ``lse`` = the sink or
      ``-inf`` (zero gradients; ``d lse / d sink = 1``).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D]; got q{tuple(q.shape)} k{tuple(k.shape)} "
            f"v{tuple(v.shape)}")
    b, tq, hq, d = q.shape
    bk_, tk, hkv, dk_ = k.shape
    if bk_ != b or k.shape[:3] != v.shape[:3] or dk_ != d:
        raise ValueError(
            f"k must be [B={b}, Tk, Hkv, D={d}] and v [B, Tk, Hkv, Dv] with the same B/Tk/Hkv; "
            f"got k{tuple(k.shape)} v{tuple(v.shape)}")
    if 0 in (hq, hkv, d, v.shape[-1]):
        raise ValueError(f"q, k, v need heads and head dims >= 1 (only B and T may be 0); got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable(q_idx, kv_idx, head) -> bool, got {mask_fn!r}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be callable(s, b, h, q_idx, kv_idx), got {score_mod!r}")

    if normalizer not in fk.NORMALIZERS:
        raise ValueError(f"normalizer must be one of {fk.NORMALIZERS}, got {normalizer!r}")
    if normalizer != "softmax" and sinks is not None:
        raise ValueError(f"sinks need normalizer='softmax', got {normalizer!r}")
    backend = resolve_backend(backend)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    bq, bk = block_sizes(tq, tk, block_q, block_kv, backend)
    nq, nk = -(-tq // bq), -(-tk // bk)
    # Static scalars are baked into the kernel: NaN/inf would make every output NaN.
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"logits_soft_cap must be finite and positive, got {cap}")

    # --- sinks and segment ids
    has_sinks = sinks is not None
    if has_sinks:
        sinks = jnp.asarray(sinks)
        if sinks.shape != (hq,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(f"sinks must be a float array [Hq={hq}], got {sinks.dtype}"
                             f"{tuple(sinks.shape)}")
    else:
        sinks = jnp.zeros((hq,), jnp.float32)
    seg_q = seg_k = None
    if segment_ids is not None:
        if isinstance(segment_ids, tuple | list):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be [B, T] or a pair ([B, Tq], [B, Tk])")
            seg_q, seg_k = (jnp.asarray(s) for s in segment_ids)
        else:
            seg_q = seg_k = jnp.asarray(segment_ids)
            if tq != tk:
                raise ValueError(f"segment_ids [B, T] needs Tq == Tk (got {tq}, {tk}); "
                                 "pass a pair ([B, Tq], [B, Tk])")
        if seg_q.shape != (b, tq) or seg_k.shape != (b, tk):
            raise ValueError(f"segment_ids must be [B={b}, Tq={tq}] and [B={b}, Tk={tk}], got "
                             f"{tuple(seg_q.shape)} and {tuple(seg_k.shape)}")
        for s in (seg_q, seg_k):
            if not jnp.issubdtype(s.dtype, jnp.integer):
                raise TypeError(f"segment_ids must be integer, got {s.dtype}")
        seg_q, seg_k = seg_q.astype(jnp.int32), seg_k.astype(jnp.int32)

    mod_ops, mod_axes, mod_lens = check_mod_operands(
        score_mod, score_mod_operands, score_mod_axes, b, hq, tq, tk, backend)
    if 0 in (b, tq, tk):  # an empty grid launches nothing; the result is known in closed form
        return _without_keys(q, v, sinks if has_sinks else None, return_lse, normalizer)

    # --- block map -> compacted lists (on the host when the map is static; see block_map)
    if block_map is None:
        bm = bsp.default_block_map(tq, tk, bq, bk, masked=mask_fn is not None)
    elif np.ndim(block_map) == 4:  # per batch and head: [Bm, Hm, nq, nk]
        bm = _normalize_batched_map(block_map, b, hq, nq, nk, tk, bk)
    else:
        bm = bsp.normalize_block_map(block_map, hq, nq, nk, tk, bk)
    if bm.ndim == 3:
        bm = bm[None]  # [1, Hm, nq, nk]
    width, width_t = bsp.static_width(bm), bsp.static_width(bsp.transpose(bm))
    if seg_q is not None:
        bm = bsp.intersect(bm, bsp.segment_block_map(seg_q, seg_k, bq, bk)[:, None])
    ents, cnts = bsp.compact(bm, width)
    # Per key block, the non-empty query blocks (the dk/dv pass).
    ents_t, cnts_t = bsp.compact(bsp.transpose(bm), width_t)

    cfg = fk.Config(
        backend=backend, interpret=bool(interpret), batch=b, q_len=tq, kv_len=tk,
        num_q_heads=hq, num_kv_heads=hkv, block_q=bq, block_kv=bk, nq=nq, nk=nk,
        width=width, width_t=width_t, map_batch=bm.shape[0], map_heads=bm.shape[1],
        scale=scale, soft_cap=cap, mask_fn=mask_fn, has_sinks=has_sinks,
        has_segments=seg_q is not None, score_mod=score_mod, mod_axes=mod_axes,
        mod_lens=mod_lens, normalizer=normalizer,
    )
    mod_ops = tuple(pad_mod_operand(x, a, cfg, backend) for x, a in zip(mod_ops, mod_axes,
                                                                        strict=True))
    o, lse = _flash(cfg, q, k, v, sinks, seg_q, seg_k, ents, cnts, ents_t, cnts_t, mod_ops)
    return (o, lse) if return_lse else o


def _normalize_batched_map(block_map, b: int, hq: int, nq: int, nk: int, kv_len: int,
                           block_kv: int):
    """Validate a ``[Bm, Hm, nq, nk]`` map (``Bm`` in {1, B}, ``Hm`` in {1, Hq}); int32."""
    shape = tuple(np.shape(block_map))
    if shape[2:] != (nq, nk) or shape[0] not in (1, b) or shape[1] not in (1, hq):
        raise ValueError(f"block_map must have shape [B|1={b}, Hq|1={hq}, nq={nq}, nk={nk}] for "
                         f"these block sizes, got {shape}")
    maps = [bsp.normalize_block_map(block_map[n], hq, nq, nk, kv_len, block_kv)
            for n in range(shape[0])]
    return (np if all(bsp.concrete(m) is not None for m in maps) else jnp).stack(maps)


def _without_keys(q, v, sinks, return_lse, normalizer="softmax"):
    """Attention when ``B``, ``Tq`` or ``Tk`` is 0: no query sees a key, so ``o = 0`` and
    ``lse = log(exp(sink))`` = the sink (``-inf`` without sinks; softpick: ``log eps``);
    differentiable in ``sinks`` (``d lse / d sink = 1``), zero gradients for q, k, v."""
    b, tq, hq, _ = q.shape
    o = jnp.zeros((b, tq, hq, v.shape[-1]), q.dtype)
    if not return_lse:
        return o
    if normalizer == "softpick":
        return o, jnp.full((b, hq, tq), math.log(fk.SOFTPICK_EPS), jnp.float32)
    if sinks is None:
        return o, jnp.full((b, hq, tq), -jnp.inf, jnp.float32)
    return o, jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], (b, hq, tq))


# ------------------------------------------------------------------------------------------
# custom VJP
# ------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, sinks, seg_q, seg_k, ents, cnts, ents_t, cnts_t, mod_ops):
    o, m, log_l = _forward(cfg, q, k, v, sinks, seg_q, seg_k, ents, cnts, mod_ops)
    return o, _public_lse(m, log_l)


def _flash_fwd(cfg, q, k, v, sinks, seg_q, seg_k, ents, cnts, ents_t, cnts_t, mod_ops):
    o, m, log_l = _forward(cfg, q, k, v, sinks, seg_q, seg_k, ents, cnts, mod_ops)
    res = (q, k, v, sinks, seg_q, seg_k, ents, cnts, ents_t, cnts_t, mod_ops, o, m, log_l)
    return (o, _public_lse(m, log_l)), res


def _flash_bwd(cfg, res, cts):
    q, k, v, sinks, seg_q, seg_k, ents, cnts, ents_t, cnts_t, mod_ops, o, m, log_l = res
    do, dlse = cts
    do = do.astype(q.dtype)
    di = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    di = di - dlse.astype(jnp.float32)
    dq, dk, dv, dmods = _backward(cfg, q, k, v, do, m, log_l, di, seg_q, seg_k, ents, cnts,
                                  ents_t, cnts_t, mod_ops)
    dsinks = None
    if cfg.has_sinks:
        p_sink = jnp.exp((sinks.astype(jnp.float32)[None, :, None] - m) - log_l)
        dsinks = (-jnp.sum(p_sink * di, axis=(0, 2))).astype(sinks.dtype)
    dmods = tuple(_reduce_partials(x, d) for x, d in zip(mod_ops, dmods, strict=True))
    return dq, dk, dv, dsinks, None, None, None, None, None, None, dmods


def _reduce_partials(x, d):
    """An operand's gradient from the kernels' per-(batch, query head) sums ``d``: summed over
    the batch/head axes the operand broadcasts over (a fixed-order XLA reduction)."""
    if d is None:  # integer operand: no cotangent
        return None
    if d.ndim == x.ndim + 2:  # const: [B, Hq, *shape]
        return d.sum((0, 1)).astype(x.dtype)
    axes = tuple(a for a in (0, 1) if x.shape[a] == 1)
    return (d.sum(axes, keepdims=True) if axes else d).astype(x.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _public_lse(m, log_l):
    """``lse = m + log l``, ``-inf`` on rows that see nothing (internal ``m = +inf``)."""
    return jnp.where(m == jnp.inf, -jnp.inf, m + log_l)


def _forward(cfg, q, k, v, sinks, seg_q, seg_k, ents, cnts, mod_ops=()):
    """o ``[B, Tq, Hq, Dv]`` and the row stats ``m``, ``log_l`` ``[B, Hq, Tq]`` (``m = +inf``,
    ``log_l = 0`` where nothing is seen)."""
    tq, dv = cfg.q_len, v.shape[-1]
    if seg_q is not None:
        seg_q = pad_axis(seg_q, 1, cfg.q_pad)
        seg_k = pad_axis(seg_k, 1, cfg.kv_pad)
    if cfg.backend == "tpu":
        qt = pad_axis(q, 1, cfg.q_pad).transpose(0, 2, 1, 3)
        kt = pad_axis(k, 1, cfg.kv_pad).transpose(0, 2, 1, 3)
        vt = pad_axis(v, 1, cfg.kv_pad).transpose(0, 2, 1, 3)
        o, m, log_l = fk.tpu_forward(cfg, ents, qt, kt, vt, sinks, seg_q, seg_k, mod_ops)
        return o.transpose(0, 2, 1, 3)[:, :tq], m[:, :, :tq, 0], log_l[:, :, :tq, 0]
    if mgpu.applies(cfg, q, v):  # Hopper: warp-specialised wgmma/TMA forward (same stats)
        out = mgpu.padded_forward(cfg, ents, cnts, q, k, v, sinks)
        if out is not None:  # None: it failed to trace (warned); the Triton kernel follows
            return out
    dp, dvp = gpu_dim(q.shape[-1]), gpu_dim(dv)
    qp = pad_axis(pad_axis(q, 1, cfg.q_pad), 3, dp)
    kp = pad_axis(pad_axis(k, 1, cfg.kv_pad), 3, dp)
    vp = pad_axis(pad_axis(v, 1, cfg.kv_pad), 3, dvp)
    o, m, log_l = fk.gpu_forward(cfg, ents, cnts, qp, kp, vp, sinks, seg_q, seg_k, mod_ops)
    return o[:, :tq, :, :dv], m[:, :, :tq], log_l[:, :, :tq]


def _backward(cfg, q, k, v, do, m, log_l, di, seg_q, seg_k, ents, cnts, ents_t, cnts_t,
              mod_ops=()):
    tq, tk, d, dv = cfg.q_len, cfg.kv_len, q.shape[-1], v.shape[-1]
    if seg_q is not None:
        seg_q = pad_axis(seg_q, 1, cfg.q_pad)
        seg_k = pad_axis(seg_k, 1, cfg.kv_pad)
    m = pad_axis(m, 2, cfg.q_pad, jnp.inf)  # padded rows: p = 0
    log_l = pad_axis(log_l, 2, cfg.q_pad)
    di = pad_axis(di, 2, cfg.q_pad)
    if cfg.backend == "tpu":
        tr = lambda x, n: pad_axis(x, 1, n).transpose(0, 2, 1, 3)  # noqa: E731
        lanes = lambda x: jax.lax.broadcast_in_dim(x, x.shape + (fk.LANES,), (0, 1, 2))  # noqa: E731
        dq, dk, dv_, dmods = fk.tpu_backward(
            cfg, ents, ents_t, tr(q, cfg.q_pad), tr(k, cfg.kv_pad), tr(v, cfg.kv_pad),
            tr(do, cfg.q_pad), lanes(m), lanes(log_l), lanes(di), seg_q, seg_k, mod_ops)
        back = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]  # noqa: E731
        return back(dq, tq), back(dk, tk), back(dv_, tk), dmods
    dp, dvp = gpu_dim(d), gpu_dim(dv)
    pad = lambda x, n, dd: pad_axis(pad_axis(x, 1, n), 3, dd)  # noqa: E731
    dq, dk, dv_, dmods = fk.gpu_backward(
        cfg, ents, cnts, ents_t, cnts_t, pad(q, cfg.q_pad, dp), pad(k, cfg.kv_pad, dp),
        pad(v, cfg.kv_pad, dvp), pad(do, cfg.q_pad, dvp), m, log_l, di, seg_q, seg_k, mod_ops)
    return dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv_[:, :tk, :, :dv], dmods
