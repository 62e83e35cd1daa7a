"""Glue from ``jattn.attention(..., implementation="pallas")`` to :mod:`pallas_kernels.flash`.

Which implementation serves a call is decided in :mod:`jattn._dispatch` (from
:func:`unsupported_reason` here); this module only translates the call for the kernel.

The kernel takes plain arrays and functions: a block map (built here from the
:class:`~jattn.masks.Mask` at the kernel's block sizes, evaluated at trace time so the TPU grid
only spans non-empty blocks) and ``mask.index_fn(Tq, Tk)``. Features the kernel does not have
raise ``NotImplementedError`` naming them.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jattn.masks import Mask
from jattn.score_mods import check_elementwise
from pallas_kernels import flash as flash_lib

__all__ = ["attention_pallas", "pallas_supported", "unsupported_reason"]

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 128


def _closes_over_array(mask: Mask) -> bool:
    """True if the mask tree holds an array (``from_array``): its index_fn cannot run in-kernel."""
    if not dataclasses.is_dataclass(mask):
        return False
    for field in dataclasses.fields(mask):
        val = getattr(mask, field.name)
        vals = val if isinstance(val, tuple) else (val,)
        for x in vals:
            if isinstance(x, Mask) and _closes_over_array(x):
                return True
            if isinstance(x, np.ndarray | jax.Array):
                return True
    return False


def kernel_block_sizes(q_len: int, kv_len: int) -> tuple[int, int]:
    """The kernel's ``(block_q, block_kv)`` for these lengths (where a ``block_mask`` lives)."""
    return flash_lib.block_sizes(q_len, kv_len, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV)


def unsupported_reason(*, mask=None, dense_mask=None, bias=None, normalizer="softmax",
                       **_unused) -> str | None:
    """Why the Pallas kernel cannot serve this call (None if it can)."""
    if bias is not None:
        return "bias (additive score bias) is not supported by the Pallas flash kernel"
    if normalizer != "softmax":
        return f"normalizer={normalizer!r} is not supported by the Pallas flash kernel (softmax)"
    if dense_mask is not None:
        return ("dense bool-array masks are not supported by the Pallas flash kernel; "
                "use a jattn.masks.Mask (or segment_ids for per-batch document masks)")
    if mask is not None:
        if not isinstance(mask, Mask):
            return f"mask of type {type(mask).__name__} is not supported by the Pallas kernel"
        if _closes_over_array(mask):
            return ("masks.from_array masks (an index_fn closing over an array) are not "
                    "supported by the Pallas flash kernel")
    return None


def pallas_supported(q=None, k=None, v=None, **kwargs) -> bool:
    """Whether :func:`attention_pallas` can serve a call with these keyword arguments."""
    return unsupported_reason(**kwargs) is None


def score_mod_captures(score_mod, block_q: int, block_kv: int) -> bool:
    """True if ``score_mod`` closes over arrays (traced or concrete): the kernel would bake them
    in as constants and could not return their gradients."""
    f32, i32 = jax.numpy.float32, jax.numpy.int32
    tile = jax.ShapeDtypeStruct((block_q, block_kv), f32)
    scalar = jax.ShapeDtypeStruct((), i32)
    _, consts = jax.closure_convert(score_mod, tile, scalar, scalar,
                                    jax.ShapeDtypeStruct((block_q, block_kv), i32),
                                    jax.ShapeDtypeStruct((block_q, block_kv), i32))
    if consts:
        return True
    idx = jax.ShapeDtypeStruct((block_q, block_kv), i32)
    check_elementwise(score_mod, tile, scalar, scalar, idx, idx)
    out = jax.eval_shape(score_mod, tile, scalar, scalar, idx, idx)
    if getattr(out, "shape", None) != tile.shape:
        raise TypeError(f"score_mod {getattr(score_mod, '__qualname__', score_mod)} must be "
                        f"elementwise: on a [{block_q}, {block_kv}] tile it returned {out}")
    return bool(jax.make_jaxpr(score_mod)(tile, scalar, scalar, idx, idx).consts)


def attention_pallas(q, k, v, *, mask, dense_mask, bias, scale, normalizer, sinks,
                     logits_soft_cap, segment_ids, return_lse, block_q=None, block_kv=None,
                     interpret=None, backend=None, score_mod=None, block_mask=None):
    """Softmax attention through :func:`pallas_kernels.flash_attention`.

    ``mask`` is a :class:`jattn.masks.Mask` or None; ``dense_mask``/``bias`` must be None and
    ``normalizer`` ``"softmax"`` (else ``NotImplementedError``). Shapes as in
    :func:`jattn.attention`. ``score_mod`` must capture no arrays (else
    ``NotImplementedError``): scalars and Python numbers are fine. ``block_mask``: bool
    ``[B|1, Hq|1, nq, nk]`` at the kernel's block sizes (see :func:`kernel_block_sizes`),
    ANDed with the mask's static map into the kernel's per-(batch, head) block map.
    """
    reason = unsupported_reason(mask=mask, dense_mask=dense_mask, bias=bias,
                                normalizer=normalizer)
    if reason is not None:
        raise NotImplementedError(reason)
    tq, hq = q.shape[1], q.shape[2]
    tk = k.shape[1]
    bq, bk = flash_lib.block_sizes(tq, tk, block_q or DEFAULT_BLOCK_Q,
                                   block_kv or DEFAULT_BLOCK_KV, backend)
    if score_mod is not None and score_mod_captures(score_mod, bq, bk):
        raise NotImplementedError(
            "score_mod with captured arrays (e.g. alibi slopes, a bias table, gate cumsums) is "
            "not supported by the Pallas flash kernel yet: their gradients would need kernel "
            "operands; use implementation='xla' (implementation=None falls back to it)")
    block_map = mask_fn = None
    if mask is not None:
        if mask.num_heads is not None and mask.num_heads not in (1, hq):
            raise ValueError(f"per-head mask has {mask.num_heads} heads; expected Hq={hq}")
        if tq > 0 and tk > 0:  # an empty sequence has no blocks (the kernel launches nothing)
            with jax.ensure_compile_time_eval():  # static block map: the grid skips empty blocks
                block_map = mask.block_map(tq, tk, bq, bk)
            mask_fn = mask.index_fn(tq, tk)
    if block_mask is not None:
        if block_q is not None or block_kv is not None:
            raise ValueError("block_mask is defined at the kernel's default block sizes")
        codes = jax.numpy.where(block_mask, 2, 0).astype(jax.numpy.int32)  # full / empty
        if block_map is not None:  # [nq, nk] or [H, nq, nk] -> [1, H|1, nq, nk]
            static = np.asarray(block_map, np.int32)
            codes = jax.numpy.minimum(codes, static.reshape((1,) * (4 - static.ndim)
                                                            + static.shape))
        block_map = codes
    return flash_lib.flash_attention(
        q, k, v, block_map=block_map, mask_fn=mask_fn, scale=scale, sinks=sinks,
        logits_soft_cap=logits_soft_cap, segment_ids=segment_ids, block_q=bq, block_kv=bk,
        return_lse=return_lse, interpret=interpret, backend=backend, score_mod=score_mod)
