"""Dual triangle attention, as MECHANISMS.md describes it (tier A, "Dual Triangle Attention"):
"half of each head's subspace masked past+self, half future+self; bidirectional without
positions".

Each head's query/key/value features split in halves ``q = [q_past, q_future]`` (likewise k, v):

``o_i = [ softmax_{j <= i}(q_past_i . k_past_j * scale) v_past ,
          softmax_{j >= i}(q_future_i . k_future_j * scale) v_future ]``

(``j <= i`` and ``j >= i`` end-aligned, as :func:`jattn.masks.causal`; both ANDed with the
caller's mask). Every token sees the whole sequence through one half or the other, and the two
triangles are asymmetric, so the layer knows left from right without a position encoding
(the point of the design). What MECHANISMS.md leaves open, chosen here: the values split in
halves too (the head's output keeps its width), and each half is its own attention with its own
default scale ``1 / sqrt(Dk / 2)``.

Two :func:`jattn.attention` calls, so every implementation (``reference``, ``xla``, ``pallas``)
and the block skipping of the triangular masks come for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import masks as masks_lib
from jattn.attention import attention
from jattn.masks import Mask

__all__ = ["dual_triangle_attention", "past_and_future_masks"]


def past_and_future_masks(mask, q_len: int, kv_len: int):
    """``(mask & causal, mask & local(0, None))``: the two triangles, each ANDed with ``mask``
    (a :class:`jattn.masks.Mask`, a bool array broadcastable to ``[B, H, Tq, Tk]``, or None)."""
    past, future = masks_lib.causal(), masks_lib.local(0, None)
    if mask is None:
        return past, future
    if isinstance(mask, Mask):
        return mask & past, mask & future
    dense = jnp.asarray(mask)
    return dense & past.dense(q_len, kv_len), dense & future.dense(q_len, kv_len)


def dual_triangle_attention(q, k, v, *, mask: Mask | jax.Array | None = None,
                            scale: float | None = None, implementation: str | None = None,
                            **attention_kwargs) -> jax.Array:
    """Dual triangle attention (module docstring), ``[B, Tq, Hq, Dv]``.

    Args:
      q, k, v: ``[B, Tq, Hq, Dk]``, ``[B, Tk, Hkv, Dk]``, ``[B, Tk, Hkv, Dv]`` with ``Dk`` and
        ``Dv`` even (the first half of each head looks back, the second forward).
      mask: ANDed with both triangles. scale: per half (default ``1 / sqrt(Dk / 2)``).
      implementation, attention_kwargs: passed to both :func:`jattn.attention` calls
        (``bias``, ``logits_soft_cap``, ``normalizer``, ...).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", 0) != 4 or x.shape[-1] % 2:
            raise ValueError(f"dual triangle attention splits each head in two: {name} must be "
                             f"[B, T, H, D] with D even, got shape {jnp.shape(x)}")
    past, future = past_and_future_masks(mask, q.shape[1], k.shape[1])
    dk, dv = q.shape[-1] // 2, v.shape[-1] // 2

    def half(sl_k, sl_v, m):
        return attention(q[..., sl_k], k[..., sl_k], v[..., sl_v], mask=m, scale=scale,
                         implementation=implementation, **attention_kwargs)

    o_past = half(slice(0, dk), slice(0, dv), past)
    o_future = half(slice(dk, None), slice(dv, None), future)
    return jnp.concatenate([o_past, o_future], axis=-1)
