"""Wrapper plumbing of the chunked linear-attention kernels (private; see ``chunk.py``):
argument checks, the static ``Config``, layout glue ``[B, T, H, D] <-> [B*H, T_pad, D]``, the
within-chunk cumulative gates, feature padding for Triton and the packed-sequence counts."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _chunk_kernels as ck
from pallas_kernels._input_checks import check_log_decay_values

F32 = jnp.float32
_SUB = 16
# Log-gates are clamped at this floor (see chunk.py's docstring): exp(-110) == 0 in fp32.
LOG_DECAY_FLOOR = -110.0


def _target(interpret, backend):
    platform = jax.default_backend()
    if backend is None:
        target = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "cpu")
    else:
        name = str(backend).lower()
        if name in ("gpu", "cuda"):
            target = "gpu"
        elif name == "tpu":
            target = "tpu"
        else:
            raise ValueError(f"backend must be None, 'tpu', 'cuda' or 'gpu'; got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    return target, bool(interpret)


def _check_chunk_for(target, chunk_size):
    if target == "gpu" and chunk_size & (chunk_size - 1):
        raise NotImplementedError(
            f"pallas chunk kernels on GPU (Triton) need a power-of-two chunk_size; got {chunk_size}"
        )


def _check(q, k, v, g, initial_state, chunk_size):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D]; got shape {x.shape}")
    b, t, h, kd = q.shape
    if kd == 0:
        raise ValueError(f"q and k must have a head dim K >= 1; got shape {q.shape}")
    if k.shape != (b, t, h, kd):
        raise ValueError(f"k must have shape {(b, t, h, kd)} like q; got {k.shape}")
    if v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B, T, H, V] = {(b, t, h)} + (V,); got {v.shape}")
    if g is not None and g.shape not in ((b, t, h), (b, t, h, kd)):
        raise ValueError(f"g must be [B, T, H] = {(b, t, h)} or [B, T, H, K]; got {g.shape}")
    vd = v.shape[-1]
    if initial_state is not None and initial_state.shape != (b, h, kd, vd):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = {(b, h, kd, vd)}; got {initial_state.shape}"
        )
    if g is not None:
        check_log_decay_values("g", g)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if chunk_size % _SUB:
        raise NotImplementedError(
            f"pallas chunk kernels need chunk_size a multiple of {_SUB}; got {chunk_size}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point; got {x.dtype}")


def _to_bh(x, t_pad):
    """[B, T, H, D] -> [B*H, T_pad, D] (zero padding at the end of time)."""
    b, t, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t_pad, d)


def _from_bh(x, b, h, t):
    return jnp.transpose(x.reshape(b, h, -1, x.shape[-1])[:, :, :t], (0, 2, 1, 3))


def _gates(g, shape_bthk, t_pad, chunk):
    """Log-gates -> within-chunk cumulative ``G`` [B*H, T_pad, K] fp32 (0 in the padding)."""
    b, t, h, kd = shape_bthk
    if g is None:
        g = jnp.zeros((b, t, h, kd), F32)
    g = jnp.maximum(g.astype(F32), LOG_DECAY_FLOOR)  # -inf (reset): finite cumsums, same values
    if g.ndim == 3:
        g = jnp.broadcast_to(g[..., None], (b, t, h, kd))
    g = _to_bh(g, t_pad)
    g = g.reshape(b * h, t_pad // chunk, chunk, kd)
    return jnp.cumsum(g, axis=2).reshape(b * h, t_pad, kd)


def _state_in(initial_state, b, h, kd, vd):
    if initial_state is None:
        return jnp.zeros((b * h, vd, kd), F32)
    return jnp.swapaxes(initial_state.astype(F32), -1, -2).reshape(b * h, vd, kd)


def _state_out(h_t, b, h, kd, vd):
    return jnp.swapaxes(h_t[:, :vd, :kd].reshape(b, h, vd, kd), -1, -2)


def _empty_result(initial_state, shape_bthk, vd, dtype, output_final_state):
    """``B``, ``T``, ``H`` or ``V`` = 0 (nothing to launch): empty ``o`` and the initial state
    (differentiable: its cotangent passes straight through) as the final state."""
    b, t, h, kd = shape_bthk
    o = jnp.zeros((b, t, h, vd), dtype)
    if not output_final_state:
        return o, None
    if initial_state is None:
        return o, jnp.zeros((b, h, kd, vd), F32)
    return o, initial_state.astype(F32)


def _feature_pad(target, *dims):
    """Triton block shapes are powers of two (>= 16 for ``tl.dot``): on GPU, zero-pad K and V
    (zero q/k/v channels, zero gate, zero state rows: the padded channels stay exactly 0)."""
    if target != "gpu":
        return dims
    return tuple(max(16, 1 << (d - 1).bit_length()) for d in dims)


def _pad_last(x, size, axis=-1, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode) if size != x.shape[axis] else x


def _padded_inputs(q, k, v, g, t_pad, chunk, dt, kp, vp):
    """[B*H, T_pad, D] views, feature dims padded to (kp, vp). Gates pad by edge replication
    so that scalar gates stay equal across K (the kernels rely on it); padded channels have
    q = k = 0 and zero state rows, so their gate value is irrelevant."""
    b, t, h, kd = q.shape
    qb = _pad_last(_to_bh(q.astype(dt), t_pad), kp)
    kb = _pad_last(_to_bh(k.astype(dt), t_pad), kp)
    gb = _pad_last(_gates(g, (b, t, h, kd), t_pad, chunk), kp, mode="edge")
    vb = _pad_last(_to_bh(v.astype(dt), t_pad), vp)
    return qb, kb, vb, gb




class _Layout(NamedTuple):
    """One call in the kernels' layout: ``[B*H, T_pad, D]`` rows (``q, k, g`` padded to ``kp``
    features, ``v`` to ``vp``), the ``[B*H, vp, kp]`` fp32 initial state and the segment
    starts (None without ``segment_ids``)."""

    t_pad: int
    kp: int
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    h0: jax.Array
    seg: jax.Array | None


def _layout(q, k, v, g, initial_state, segment_ids, cfg, dt) -> _Layout:
    """The inputs every chunk kernel reads, padded to whole chunks (and, on GPU, to Triton's
    feature block shapes)."""
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    t_pad = -(-t // cfg.chunk) * cfg.chunk
    kp, vp = _feature_pad(cfg.target, kd, vd)
    qb, kb, vb, gb = _padded_inputs(q, k, v, g, t_pad, cfg.chunk, dt, kp, vp)
    h0 = _pad_last(_pad_last(_state_in(initial_state, b, h, kd, vd), kp), vp, axis=1)
    seg = _segments(segment_ids, h, t_pad, cfg.chunk)
    return _Layout(t_pad, kp, qb, kb, vb, gb, h0, seg)


def _outputs(o, h_t, shape_bthk, vd, output_final_state):
    """The kernels' ``o [B*H, T_pad, vp]`` and ``h_t`` back to ``(o [B, T, H, V], S_T or
    None)``."""
    b, t, h, kd = shape_bthk
    o = _from_bh(o[..., :vd], b, h, t)
    return o, (_state_out(h_t, b, h, kd, vd) if output_final_state else None)


def _gate_kind(g):
    return "none" if g is None else ("scalar" if g.ndim == 3 else "channel")


def _l2norm(x, eps=1e-6):
    x32 = x.astype(F32)
    return (x32 * lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _config(t, kd, g, scale, chunk_size, interpret, backend) -> ck.Config:
    """The static kernel configuration shared by chunk_gla and chunk_delta_rule."""
    target, interp = _target(interpret, backend)
    _check_chunk_for(target, chunk_size)
    return ck.Config(
        scale=float(1.0 / math.sqrt(kd) if scale is None else scale),
        chunk=chunk_size,
        sub=_SUB,
        target=target,
        interpret=interp,
        t_real=t,
        gate=_gate_kind(g),
    )


def _check_segments(segment_ids, b, t):
    if segment_ids is None:
        return
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
    ):
        raise TypeError(f"segment_ids must be an integer array [B, T]; got dtype {dtype}")
    if segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}; got {segment_ids.shape}")


def _segments(segment_ids, h, t_pad, chunk):
    """Packed sequences: ``segment_ids [B, T]`` -> the kernels' ``seg [B*H, T_pad, 1]`` fp32,
    per row the number of segment starts (id changes) from its chunk's first row up to and
    including it. Padded steps start nothing (they join the last segment). None -> None.
    A few ``jnp`` ops on traced ids: moving the boundaries does not recompile."""
    if segment_ids is None:
        return None
    b, t = segment_ids.shape
    ids = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    starts = jnp.pad(starts, ((0, 0), (0, t_pad - t)))
    counts = jnp.cumsum(starts.reshape(b, t_pad // chunk, chunk).astype(jnp.int32), axis=2)
    counts = jnp.broadcast_to(counts.reshape(b, 1, t_pad).astype(F32), (b, h, t_pad))
    return counts.reshape(b * h, t_pad, 1)
