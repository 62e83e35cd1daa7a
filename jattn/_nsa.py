"""Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention"): the compressed, selected and sliding-window branches
combined by learned gates, with the learned block compression ``phi``. Public names are
re-exported by :mod:`jattn.sparse`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jattn import masks as masks_lib
from jattn._block_mask import attention_block_sizes, selection_mask
from jattn.attention import attention as _attention

F32 = jnp.float32


def _masked_softmax(s, vis):
    """Softmax over the last axis restricted to ``vis``; rows with nothing visible give 0."""
    m = jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(vis, jnp.exp(jnp.where(vis, s, m) - m), 0.0)
    z = e.sum(-1, keepdims=True)
    return e / jnp.where(z > 0, z, 1.0)


#: The parameters of NSA's learned compression ``phi`` (:func:`compress_blocks`).
COMPRESS_MLP_KEYS = ("pos", "w1", "b1", "w2", "b2")


def _compressed_len(t: int, block_size: int, stride: int) -> int:
    """``nc``: blocks ``[i d, i d + l)`` that fit in ``t`` tokens (0 when ``t < l``)."""
    return (t - block_size) // stride + 1 if t >= block_size else 0


def compress_blocks(x, *, block_size: int, stride: int, mlp: dict | None = None):
    """NSA's token compression ``phi`` (Yuan et al. 2025, eq. 7) over overlapping blocks.

    Block ``i`` holds tokens ``[i d, i d + l)`` (``l = block_size``, ``d = stride``), for
    ``i = 0 .. nc - 1`` with ``nc = floor((T - l) / d) + 1`` (0 when ``T < l``). Per head:

    * ``mlp=None``: ``phi(x_blk) = mean_m x_{id + m}`` (mean pooling, the parameter-free form);
    * ``mlp`` (the paper's learnable MLP with intra-block position encoding)::

          phi(x_blk) = W2^T gelu(W1^T vec(x_blk + pos) + b1) + b2

      with ``pos [l, D]`` added to the block's ``l`` tokens, ``vec`` flattening ``[l, D]`` to
      ``l D``, ``W1 [l D, M]``, ``b1 [M]``, ``W2 [M, D']``, ``b2 [D']``; the weights are
      shared by all heads (keys and values use separate ``mlp`` dicts).

    Args:
      x: ``[B, T, H, D]`` keys or values.
      block_size, stride: ``l`` and ``d`` (positive ints).
      mlp: None or a dict with :data:`COMPRESS_MLP_KEYS` of the shapes above.

    Returns:
      fp32 ``[B, nc, H, D']`` (``D' = D`` for the mean).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {x.shape}")
    for name, n in (("block_size", block_size), ("stride", stride)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    b, t, h, d = x.shape
    nc = _compressed_len(t, block_size, stride)
    gather = jnp.arange(nc)[:, None] * stride + jnp.arange(block_size)[None, :]  # [nc, l]
    blocks = x.astype(F32)[:, gather]  # [B, nc, l, H, D]
    if mlp is None:
        return blocks.mean(2)
    missing = [key for key in COMPRESS_MLP_KEYS if key not in mlp]
    if missing:
        raise ValueError(f"mlp must hold {COMPRESS_MLP_KEYS}, missing {missing}")
    pos, w1, b1, w2, b2 = (jnp.asarray(mlp[key], F32) for key in COMPRESS_MLP_KEYS)
    hidden = w1.shape[-1] if w1.ndim == 2 else -1
    if pos.shape != (block_size, d) or w1.shape != (block_size * d, hidden) \
            or b1.shape != (hidden,) or w2.ndim != 2 or w2.shape[0] != hidden \
            or b2.shape != (w2.shape[1],):
        raise ValueError(f"mlp shapes must be pos [l={block_size}, D={d}], w1 [l*D="
                         f"{block_size * d}, M], b1 [M], w2 [M, D'], b2 [D']; got "
                         f"{ {key: tuple(jnp.shape(mlp[key])) for key in COMPRESS_MLP_KEYS} }")
    blocks = blocks + pos[None, None, :, None, :]
    flat = blocks.transpose(0, 1, 3, 2, 4).reshape(b, nc, h, block_size * d)
    return jax.nn.gelu(flat @ w1 + b1) @ w2 + b2


def nsa_selection(p_cmp, t: int, *, num_kv_heads: int, block_size: int, compress_stride: int,
                  select_blocks: int):
    """NSA's block choice (Yuan et al. 2025, eqs. 8-12, selection blocks ``l' = l``).

    ``p_slc_t[j] = sum_{m < r} sum_{n < r} p_cmp_t[r j - m - n]`` (``r = l / d``), summed over
    the query heads of each GQA group (one choice per kv head); query ``t`` keeps its own block
    ``t // l`` plus the ``select_blocks`` earlier blocks of highest score (ties: lower index).
    The choice is discrete (stop-gradient).

    Args:
      p_cmp: ``[B, Hq, T, nc]`` the compressed branch's attention probabilities.
      t: sequence length. num_kv_heads: ``Hkv``. block_size, compress_stride: ``l``, ``d``.
      select_blocks: ``n >= 0``.

    Returns:
      bool ``[B, Hkv, T, ns]`` with ``ns = ceil(T / l)``.
    """
    b, hq, _, nc = p_cmp.shape
    hkv, l_ = num_kv_heads, block_size
    r = l_ // compress_stride
    pos = jnp.arange(t)
    ns = -(-t // l_)
    j = jnp.arange(ns)
    src = r * j[:, None, None] - jnp.arange(r)[None, :, None] - jnp.arange(r)[None, None, :]
    src = src.reshape(ns, r * r)
    ok = (src >= 0) & (src < nc)
    if nc:
        p_slc = jnp.where(ok, p_cmp[..., jnp.clip(src, 0, nc - 1)], 0.0).sum(-1)
    else:  # no complete compressed block yet: every earlier block scores 0 (ties: lowest)
        p_slc = jnp.zeros((b, hq, t, ns), F32)
    p_shared = lax.stop_gradient(p_slc.reshape(b, hkv, hq // hkv, t, ns).sum(2))
    own = (pos // l_)[:, None] == j[None, :]  # [T, ns]
    earlier = (j[None, :] * l_ <= pos[:, None]) & ~own
    selected = jnp.broadcast_to(own, (b, hkv, t, ns))
    if select_blocks > 0:
        kk = min(select_blocks, ns)
        top, idx = lax.top_k(jnp.where(earlier, p_shared, -jnp.inf), kk)
        selected = selected | selection_mask(idx, top > -jnp.inf, ns)
    return selected


def _selected_dense(q, k, v, selected, block_size: int, scale: float):
    """Selected branch, reference form: a dense ``[B, Hq, T, T]`` mask (``O(T^2)`` memory)."""
    t, g = q.shape[1], q.shape[2] // k.shape[2]
    pos = jnp.arange(t)
    token_sel = selected[..., pos // block_size] & (pos[None, :] <= pos[:, None])
    dense = jnp.repeat(token_sel, g, axis=1)  # [B, Hq, T, T]
    return _attention(q, k, v, mask=dense, scale=scale, implementation="reference")


def _selected_blocked(q, k, v, selected, block_size: int, scale: float):
    """Selected branch, blocked form: the xla kernel skips the key tiles no query of a query
    tile selected (a run-time ``block_mask [B, Hq, nq, nk]`` at the kernel's tile sizes), and a
    score_mod reading the per-token choice ``selected [B, Hkv, T, ns]`` masks the rest inside
    the tiles it visits; no ``[T, T]`` array exists."""
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    ns = selected.shape[-1]
    bq, bk = attention_block_sizes(t, t, "xla")
    nq, nk = -(-t // bq), -(-t // bk)
    # NSA block j covers tokens [j l, (j + 1) l); kernel key tile c covers [c bk, (c + 1) bk)
    j = jnp.arange(ns)[:, None]
    c = jnp.arange(nk)[None, :]
    overlap = ((j * block_size < (c + 1) * bk) & ((j + 1) * block_size > c * bk)).astype(F32)
    tile_sel = jnp.einsum("bhtj,jc->bhtc", selected.astype(F32), overlap) > 0  # [B, Hkv, T, nk]
    tile_sel = jnp.pad(tile_sel, ((0, 0), (0, 0), (0, nq * bq - t), (0, 0)))
    tile_map = tile_sel.reshape(b, hkv, nq, bq, nk).any(3)
    tile_map = jnp.repeat(tile_map, g, axis=1)  # [B, Hq, nq, nk]

    def only_selected(s, bb, h, q_idx, kv_idx):
        return jnp.where(selected[bb, h // g, q_idx, kv_idx // block_size], s, -jnp.inf)

    return _attention(q, k, v, mask=masks_lib.causal(), scale=scale, implementation="xla",
                      score_mod=only_selected, block_mask=tile_map)


def nsa(q, k, v, *, gates, block_size: int, compress_stride: int, select_blocks: int,
        window: int, scale: float | None = None, k_compress: dict | None = None,
        v_compress: dict | None = None, implementation: str = "reference",
        return_branches: bool = False):
    """Native Sparse Attention (Yuan et al. 2025), causal self-attention.

    ``o_t = g_t^cmp Attn(q_t, K~cmp, V~cmp) + g_t^slc Attn(q_t, K~slc, V~slc)
    + g_t^win Attn(q_t, K~win, V~win)`` with the gates ``g in [0, 1]`` from the caller (the
    paper: an MLP with sigmoid on the input). Per head, with ``l = block_size``,
    ``d = compress_stride`` (``d | l``):

    * compression (eq. 7): ``K~cmp_t = {phi(k_{id : id + l}) : 0 <= i <= (t - l) / d}``, the
      blocks ending at or before ``t``; ``phi`` is :func:`compress_blocks`: the paper's
      learnable MLP with an intra-block position encoding (``k_compress`` / ``v_compress``
      parameter dicts) or, when those are None, the mean;
    * selection (eqs. 8-12, :func:`nsa_selection`): ``p_cmp_t = softmax(q_t . K~cmp_t)``;
      selection blocks of size ``l' = l`` score
      ``p_slc_t[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp_t[(l'/d) j - m - n]``, summed over the
      query heads of a GQA group (one choice per kv head); the query's own block plus the
      ``select_blocks`` best earlier blocks are kept, and ``K~slc`` is their tokens up to ``t``;
    * sliding window: ``K~win_t = k_{t - w + 1 : t}``.

    Trainable end to end: gradients reach ``q, k, v``, the compression MLPs and the gates
    through all three branches; the block choice is discrete.

    Two forms, equal in forward and gradients (``implementation``):

    * ``"reference"``: the selected branch under a dense ``[B, Hq, T, T]`` mask (``O(T^2)``
      memory), every branch on ``jattn.attention``'s reference path: the oracle.
    * ``"xla"`` (blocked): the selected branch runs ``jattn.attention``'s blocked path with a
      run-time ``block_mask`` (the kernel tiles any query of a tile selected; the others are
      skipped) and a score_mod reading the per-token choice ``[B, Hkv, T, T / l]``; the window
      branch is the blocked path under ``jattn.masks.sliding_window``; the compressed branch
      (``[T, T / d]`` scores, needed for the selection anyway) stays dense.

    Args:
      q: ``[B, T, Hq, D]``. k: ``[B, T, Hkv, D]``. v: ``[B, T, Hkv, Dv]``.
      gates: ``[B, T, Hq, 3]`` (compressed, selected, window).
      block_size, compress_stride: ``l`` and ``d``. select_blocks: ``n`` (``>= 0``).
      window: ``w >= 1``. scale: default ``1 / sqrt(D)``.
      k_compress, v_compress: None (mean pooling) or :func:`compress_blocks` MLP dicts
        (keys: output width ``D``; values: ``Dv``).
      implementation: ``"reference"`` or ``"xla"``.
      return_branches: also return a dict with ``cmp``, ``slc``, ``win`` (each
        ``[B, T, Hq, Dv]``), ``p_cmp [B, Hq, T, nc]`` and ``selected [B, Hkv, T, ns]``.

    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype (and the dict).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3] \
            or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must be [B, T, Hq, D], [B, T, Hkv, D], [B, T, Hkv, Dv] "
                         f"(self-attention), got {q.shape}, {k.shape}, {v.shape}")
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} must be divisible by Hkv={hkv}")
    if gates.shape != (b, t, hq, 3):
        raise ValueError(f"gates must be [B={b}, T={t}, Hq={hq}, 3], got {gates.shape}")
    for name, n, low in (("block_size", block_size, 1), ("compress_stride", compress_stride, 1),
                         ("select_blocks", select_blocks, 0), ("window", window, 1)):
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise ValueError(f"{name} must be an int >= {low}, got {n!r}")
    if block_size % compress_stride:
        raise ValueError(f"compress_stride={compress_stride} must divide "
                         f"block_size={block_size}")
    if implementation not in ("reference", "xla"):
        raise ValueError(f"implementation must be 'reference' or 'xla', got {implementation!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    g = hq // hkv
    l_, d_ = block_size, compress_stride
    pos = jnp.arange(t)

    # compressed branch: phi over blocks [i d, i d + l), each visible once complete
    nc = _compressed_len(t, l_, d_)
    k_cmp = compress_blocks(k, block_size=l_, stride=d_, mlp=k_compress)  # [B, nc, Hkv, D]
    v_cmp = compress_blocks(v, block_size=l_, stride=d_, mlp=v_compress)
    if k_cmp.shape[-1] != d:
        raise ValueError(f"k_compress must map keys to width D={d}, got {k_cmp.shape[-1]}")
    q5 = q.astype(F32).reshape(b, t, hkv, g, d)
    s_cmp = scale * jnp.einsum("bthgd,bchd->bhgtc", q5, k_cmp)
    vis_cmp = (jnp.arange(nc) * d_ + l_ - 1)[None, :] <= pos[:, None]  # [T, nc]
    if nc:
        p_cmp = _masked_softmax(s_cmp, vis_cmp).reshape(b, hq, t, nc)
    else:  # T < l: no complete block, the compressed branch is 0 (max over nothing fails)
        p_cmp = jnp.zeros((b, hq, t, 0), F32)
    o_cmp = jnp.einsum("bhtc,bchd->bthd", p_cmp, jnp.repeat(v_cmp, g, axis=2))

    selected = nsa_selection(p_cmp, t, num_kv_heads=hkv, block_size=l_, compress_stride=d_,
                             select_blocks=select_blocks)
    branch = _selected_dense if implementation == "reference" else _selected_blocked
    o_slc = branch(q, k, v, selected, l_, scale).astype(F32)
    o_win = _attention(q, k, v, mask=masks_lib.sliding_window(window), scale=scale,
                       implementation=implementation).astype(F32)

    gf = gates.astype(F32)
    out = (gf[..., 0:1] * o_cmp + gf[..., 1:2] * o_slc + gf[..., 2:3] * o_win).astype(q.dtype)
    if not return_branches:
        return out
    return out, {"cmp": o_cmp, "slc": o_slc, "win": o_win, "p_cmp": p_cmp,
                 "selected": selected}
