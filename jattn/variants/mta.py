"""Multi-token attention, MTA (Golovneva, Wang, Weston & Sukhbaatar, "Multi-Token Attention",
2025): attention weights conditioned on several queries and keys at once, by convolutions over
the score map and across heads before the softmax.

With ``A = scale q k^T`` per head, ``[Tq, Tk]``, and the mask's visibility ``M``:

1. ``A0 = Mask_0(A)``: invisible entries set to 0 (no future information enters the conv).
2. Key-query convolution, per head ``h`` with kernel ``theta_h [c_q, c_k]``::

       C_h[i, j] = sum_{a < c_q} sum_{b < c_k} theta_h[a, b] A0_h[i - a, j + floor(c_k / 2) - b]

   causal in the query direction (query ``i`` reads queries ``i - c_q + 1 .. i`` only) and
   centred in the key direction (keys ``j - ceil(c_k / 2) + 1 .. j + floor(c_k / 2)``), the
   paper's index ranges ``i' in [0, c_q)``, ``j' in [-floor(c_k / 2), ceil(c_k / 2))``. Entries
   outside the map are 0. The paper's indicator ``1[i >= j - j']`` (no key after query ``i``)
   is implemented as in its eq. (3) and code: the conv reads ``Mask_0(A)``, where every key
   after its own query is already 0.
3. Head mixing (optional): query heads in consecutive groups of ``c_h``; within a group,
   ``H_h = sum_{h' in group} w[group, h, h'] C_{h'}``, applied to the logits as well (the
   paper's pre-softmax variant; it also studies mixing after the softmax).
4. ``p = softmax(Mask_{-inf}(H))`` over visible keys, ``o = p v``.

The paper's identity initialization (``theta_h`` a delta at ``a = 0, b = floor(c_k / 2)``,
``w`` the identity) is exactly softmax attention: :func:`mta_identity_kernels`. The group norm
with depth scaling the paper puts on the head outputs belongs to the model
(:mod:`models.cores.mta`), not here.

The ``"xla"`` form computes each output tile from a halo tile: the scores of queries
``i0 - c_q + 1 .. i0 + bq - 1`` and keys ``j0 - ceil(c_k / 2) + 1 .. j0 + bk - 1 + floor(c_k/2)``
(recomputed from q and k: the neighbours' scores), masks them to 0, convolves, mixes heads and
folds the tile into an online softmax. Memory O(T * block); gradients by autodiff (to q, k, v
and both kernels) through the rematerialized tile loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn import _blocked
from jattn._common import Spec, scores, split_heads, visible
from jattn.masks import Mask
from jattn.variants import _tiles
from jattn.variants._api import prepare

__all__ = ["multi_token_attention", "mta_identity_kernels"]

F32 = jnp.float32


def mta_identity_kernels(num_heads: int, query_kernel: int, key_kernel: int,
                         head_group: int | None = None):
    """``(kq_kernel [H, c_q, c_k], head_kernel [H / c_h, c_h, c_h] or None)`` that make MTA
    equal to softmax attention (the paper's initialization)."""
    kq = np.zeros((num_heads, query_kernel, key_kernel), np.float32)
    kq[:, 0, key_kernel // 2] = 1.0
    if head_group is None:
        return kq, None
    return kq, np.tile(np.eye(head_group, dtype=np.float32), (num_heads // head_group, 1, 1))


def _key_halo(ck: int) -> tuple[int, int]:
    """Keys the conv reads left and right of its output key: ``(ceil(c_k/2) - 1, floor(c_k/2))``."""
    return (ck + 1) // 2 - 1, ck // 2


def _kq_conv(spec: Spec, a0, kernel, rows: int, cols: int):
    """``C[.., r, c] = sum_{a, b} theta[a, b] a0[.., r + c_q - 1 - a, c + c_k - 1 - b]``.

    ``a0 [B, Hkv, G, rows + c_q - 1, cols + c_k - 1]`` (query halo above, key halo both sides);
    ``kernel [Hq, c_q, c_k]``. Returns ``[B, Hkv, G, rows, cols]``."""
    _, cq, ck = kernel.shape
    theta = split_heads(kernel.astype(F32)[None], spec.num_kv_heads, spec.group)  # [1,Hkv,G,..]
    out = jnp.zeros(a0.shape[:3] + (rows, cols), F32)
    for a in range(cq):
        for b in range(ck):
            window = a0[..., cq - 1 - a: cq - 1 - a + rows, ck - 1 - b: ck - 1 - b + cols]
            out = out + theta[..., a, b][..., None, None] * window
    return out


def _head_mix(spec: Spec, c, head_kernel):
    """Mix logits across each group of ``c_h`` consecutive query heads (None: unchanged)."""
    if head_kernel is None:
        return c
    b, hkv, g = c.shape[:3]
    n, ch, _ = head_kernel.shape
    flat = c.reshape((b, n, ch) + c.shape[3:])
    mixed = jnp.einsum("noi,bni...->bno...", head_kernel.astype(F32), flat)
    return mixed.reshape((b, hkv, g) + c.shape[3:])


def _check_kernels(q, kq_kernel, head_kernel):
    hq = q.shape[2]
    if jnp.ndim(kq_kernel) != 3 or jnp.shape(kq_kernel)[0] != hq or 0 in jnp.shape(kq_kernel):
        raise ValueError(f"kq_kernel must have shape [Hq={hq}, c_q, c_k] with c_q, c_k >= 1, "
                         f"got {jnp.shape(kq_kernel)}")
    if head_kernel is not None:
        shape = jnp.shape(head_kernel)
        if (len(shape) != 3 or shape[1] != shape[2] or shape[1] < 1
                or shape[0] * shape[1] != hq):
            raise ValueError(f"head_kernel must have shape [Hq / c_h, c_h, c_h] with Hq={hq} "
                             f"divisible by c_h, got {shape}")


def multi_token_attention(q, k, v, kq_kernel, head_kernel=None, *,
                          mask: Mask | jax.Array | None = None, scale: float | None = None,
                          implementation: str | None = None, block_q: int | None = None,
                          block_kv: int | None = None) -> jax.Array:
    """Multi-token attention (module docstring), ``[B, Tq, Hq, Dv]`` in q's dtype.

    Args:
      q, k, v: ``[B, Tq, Hq, Dk]``, ``[B, Tk, Hkv, Dk]``, ``[B, Tk, Hkv, Dv]`` (GQA by ratio).
      kq_kernel: ``theta [Hq, c_q, c_k]``, the key-query convolution per head.
      head_kernel: ``w [Hq / c_h, c_h, c_h]`` (``w[group, out, in]``) or None (no head mixing).
      mask, scale, implementation, block_q, block_kv: as in
        :func:`jattn.variants.clipped_softmax_attention`.
    """
    call = prepare("multi_token_attention", q, k, v, mask=mask, scale=scale,
                   implementation=implementation)
    _check_kernels(q, kq_kernel, head_kernel)
    spec = call.spec
    _, cq, ck = jnp.shape(kq_kernel)
    left, right = _key_halo(ck)
    if call.implementation == "reference":
        s, vis = _tiles.dense_scores(spec, q, k, None, call.dense_mask)
        a0 = jnp.pad(jnp.where(vis, s, 0.0), [(0, 0)] * 3 + [(cq - 1, 0), (left, right)])
        logits = _head_mix(spec, _kq_conv(spec, a0, kq_kernel, spec.q_len, spec.kv_len),
                           head_kernel)
        return _tiles.weighted_values(_tiles.dense_softmax(logits, vis), v).astype(q.dtype)

    bq, bk = _tiles.block_sizes(spec, block_q, block_kv)
    nq, nk = _blocked._num_blocks(spec.q_len, bq), _blocked._num_blocks(spec.kv_len, bk)
    b, hkv, g = q.shape[0], spec.num_kv_heads, spec.group
    # the halo tiles' sources: q with c_q - 1 rows above, k with the key halo on both sides
    q_pad = jnp.pad(q, [(0, 0), (cq - 1, nq * bq - spec.q_len), (0, 0), (0, 0)])
    k_pad = jnp.pad(k, [(0, 0), (left, nk * bk - spec.kv_len + right), (0, 0), (0, 0)])
    dense = call.dense_mask
    if dense is not None:
        dense = jnp.pad(dense, [(0, 0), (0, 0), (cq - 1, nq * bq - spec.q_len),
                                (left, nk * bk - spec.kv_len + right)])
    rows, cols = bq + cq - 1, bk + ck - 1

    def step(carry, tile, _):
        q_ext = lax.dynamic_slice_in_dim(q_pad, tile.i0, rows, axis=1).astype(F32)
        k_ext = lax.dynamic_slice_in_dim(k_pad, tile.j0, cols, axis=1).astype(F32)
        s_ext = scores(spec, q_ext.reshape(b, rows, hkv, g, q.shape[-1]), k_ext, None)[1]
        q_idx = tile.i0 - (cq - 1) + jnp.arange(rows, dtype=jnp.int32)
        k_idx = tile.j0 - left + jnp.arange(cols, dtype=jnp.int32)
        dense_ext = None
        if dense is not None:
            dense_ext = lax.dynamic_slice_in_dim(
                lax.dynamic_slice_in_dim(dense, tile.i0, rows, axis=2), tile.j0, cols, axis=3)
        vis_ext = visible(spec, q_idx, k_idx, dense_ext, None, None)
        vis_ext = vis_ext & ((q_idx >= 0)[:, None] & (k_idx >= 0)[None, :])
        a0 = jnp.where(vis_ext, s_ext, 0.0)
        logits = _head_mix(spec, _kq_conv(spec, a0, kq_kernel, bq, bk), head_kernel)
        return _tiles.softmax_step(carry, logits, tile.vis, tile.v)

    out = _tiles.tile_loop(spec, q, k, v, None, call.dense_mask, block_q=bq, block_kv=bk,
                           init=lambda row: _tiles.softmax_init(row, v.shape[-1]), step=step,
                           finish=lambda c, _: _tiles.softmax_finish(c)[0])
    return _tiles.to_output(out).astype(q.dtype)
