"""Validation and normalisation of :func:`jattn.attention`'s inputs: shapes, masks, biases,
segment ids and static floats checked once, with errors that name the argument and the
expected shape; :func:`_prepare` returns what every implementation consumes."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib
from jattn import normalizers as normalizers_lib
from jattn import score_mods as score_mods_lib
from jattn._common import Spec
from jattn.masks import Mask

IMPLEMENTATIONS = ("reference", "xla", "pallas")


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_qkv(q, k, v):
    for name, x, desc in (("q", q, "[B, Tq, Hq, Dk]"), ("k", k, "[B, Tk, Hkv, Dk]"),
                          ("v", v, "[B, Tk, Hkv, Dv]")):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array of shape {desc}, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape {desc} (rank 4), got {_shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        # B, Tq, Tk = 0 give empty outputs; zero heads or head dims have no meaning (Hq % Hkv).
        if 0 in x.shape[2:]:
            raise ValueError(f"{name} must have shape {desc} with heads and head dims >= 1 "
                             f"(only B and T may be 0), got {_shape(x)}")
    b, tq, hq, dk = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-1] != dk:
        raise ValueError(f"k must have shape [B, Tk, Hkv, Dk={dk}] (Dk of q), got {k.shape}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have shape [B, Tk={k.shape[1]}, Hkv, Dv] (Tk of k), "
                         f"got {v.shape}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have shape [B, Tk, Hkv={k.shape[2]}, Dv] (Hkv of k), "
                         f"got {v.shape}")
    if hq % k.shape[2]:
        raise ValueError(f"Hq={hq} (q.shape[2]) must be divisible by Hkv={k.shape[2]} "
                         "(k.shape[2]) for grouped-query attention")


def _to_4d(x, name: str, b: int, h: int, tq: int, tk: int, dtype_kind: str):
    """Validate ``x`` broadcastable to ``[B, H, Tq, Tk]``; return it as ``[B|1, H|1, Tq, Tk]``."""
    x = jnp.asarray(x)
    want = f"[B={b}, Hq={h}, Tq={tq}, Tk={tk}] (or broadcastable to it)"
    if dtype_kind == "bool" and x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a bool array {want}, got dtype {x.dtype}")
    if dtype_kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array {want}, got dtype {x.dtype}")
    if x.ndim > 4:
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for got, full, axis in zip(x.shape, (b, h, tq, tk), "BHqk", strict=True):
        if got not in (1, full):
            raise ValueError(f"{name} must have shape {want}, got {x.shape} (axis {axis})")
    return jnp.broadcast_to(x, x.shape[:2] + (tq, tk))


def _check_mask(mask, b: int, hq: int, tq: int, tk: int):
    """``(Mask or None, dense [B|1, Hq|1, Tq, Tk] or None)``; anything else is a TypeError."""
    if mask is None:
        return None, None
    if isinstance(mask, Mask):
        if mask.num_heads is not None and mask.num_heads != hq:
            raise ValueError(f"per-head mask has {mask.num_heads} heads; expected Hq={hq}")
        return mask, None
    accepts = (f"mask must be a jattn.masks.Mask or a bool array broadcastable to "
               f"[B={b}, Hq={hq}, Tq={tq}, Tk={tk}]")
    if isinstance(mask, str):
        constructor = mask in masks_lib.__all__ and mask.islower()  # causal, sliding_window...
        hint = f" (did you mean jattn.masks.{mask}()?)" if constructor else ""
        raise TypeError(f"{accepts}, got the string {mask!r}{hint}")
    if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):  # lists, scalars, callables...
        raise TypeError(f"{accepts}, got {type(mask).__name__}")
    return None, _to_4d(mask, "mask", b, hq, tq, tk, "bool")


def _static_float(value, name: str) -> float:
    """A concrete, finite Python/NumPy real scalar as a float (``scale``, ``logits_soft_cap``).

    These are baked into the compiled computation, so a traced value cannot be used (or
    checked): it is a TypeError, as is a bool. NaN or +-inf would silently make every output NaN.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise TypeError(f"{name} must be a static Python or NumPy real scalar (not traced), got "
                        f"{type(value).__name__}")
    if isinstance(value, np.complexfloating):
        raise TypeError(f"{name} must be a real scalar, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_segments(segment_ids, b: int, tq: int, tk: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be [B, T] or a pair ([B, Tq], [B, Tk])")
        seg_q, seg_k = (jnp.asarray(s) for s in segment_ids)
    else:
        if tq != tk:
            raise ValueError(f"segment_ids as one array needs Tq == Tk (got Tq={tq}, Tk={tk}); "
                             "pass a pair ([B, Tq], [B, Tk]) for cross-attention")
        seg_q = seg_k = jnp.asarray(segment_ids)
    for name, s, t in (("segment_ids (queries)", seg_q, tq), ("segment_ids (keys)", seg_k, tk)):
        if s.shape != (b, t):
            raise ValueError(f"{name} must have shape [B={b}, T={t}], got {s.shape}")
        if not jnp.issubdtype(s.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {s.dtype}")
    return seg_q.astype(jnp.int32), seg_k.astype(jnp.int32)


def _prepare(q, k, v, *, mask, bias, scale, normalizer, sinks, logits_soft_cap, segment_ids,
             return_lse, implementation, score_mod=None):
    """Validate everything; return (spec, bias4, sinks, dense_mask4, seg_q, seg_k)."""
    _check_qkv(q, k, v)
    b, tq, hq, dk = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    norm = normalizers_lib.get(normalizer)
    if implementation not in (None,) + IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    mask_obj, dense = _check_mask(mask, b, hq, tq, tk)
    bias4 = None if bias is None else _to_4d(bias, "bias", b, hq, tq, tk, "float")
    if sinks is not None:
        if not norm.softmax:
            raise ValueError(f"sinks need normalizer='softmax', got {norm.name!r}")
        sinks = jnp.asarray(sinks)
        if sinks.shape != (hq,):
            raise ValueError(f"sinks must have shape [Hq={hq}], got {sinks.shape}")
        if not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise TypeError(f"sinks must be floating, got dtype {sinks.dtype}")
    if return_lse and not norm.softmax:
        raise ValueError(f"return_lse needs normalizer='softmax', got {norm.name!r}")
    if logits_soft_cap is not None:
        logits_soft_cap = _static_float(logits_soft_cap, "logits_soft_cap")
        if logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be a positive float, got {logits_soft_cap!r}")
    scale = 1.0 / math.sqrt(dk) if scale is None else _static_float(scale, "scale")
    seg_q, seg_k = _check_segments(segment_ids, b, tq, tk)
    mod = None
    if score_mod is not None:
        if 0 in (b, tq, tk):  # no score exists; a function gathering by position cannot trace
            if not callable(score_mod):
                raise TypeError(f"score_mod must be callable, got {type(score_mod).__name__}")
        else:
            mod = score_mods_lib.check(score_mod)
    spec = Spec(mask=mask_obj, normalizer=norm, scale=float(scale), soft_cap=logits_soft_cap,
                q_len=tq, kv_len=tk, num_kv_heads=hkv, group=hq // hkv,
                has_bias=bias4 is not None, has_dense_mask=dense is not None,
                has_segments=seg_q is not None, has_sinks=sinks is not None, score_mod=mod)
    if mask_obj is not None:  # surface mask/length mismatches (e.g. neighborhood grids) here
        mask_obj.visible(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), 0,
                         q_len=tq, kv_len=tk)
    return spec, bias4, sinks, dense, seg_q, seg_k
