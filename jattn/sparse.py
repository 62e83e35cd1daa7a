"""Trainable sparse attention: routers that pick each query's support from the data.

* :func:`topk_blocks`: MoBA's block router (Lu et al. 2025, "MoBA: Mixture of Block Attention
  for Long-Context LLMs"), returning a run-time block mask for
  ``jattn.attention(..., block_mask=...)``.
* :func:`nsa`: Native Sparse Attention (Yuan et al. 2025): compressed, selected and
  sliding-window branches combined by learned gates.
* :func:`lightning_indexer`: DeepSeek Sparse Attention's indexer and top-k token selection
  (DeepSeek-AI 2025, DeepSeek-V3.2-Exp), with :func:`selection_mask` (the dense reference form)
  and :func:`gathered_attention` (attention over the gathered selected tokens).

Selections are discrete (top-k): no gradient flows through the choice itself. As in both papers,
the attention over the chosen support is trained end to end; DSA trains its indexer separately
(a KL loss to the dense attention distribution), which these functions leave to the caller.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# NSA has its own module; its public names belong to this one
from jattn._block_mask import selection_mask  # noqa: F401 (re-exported)
from jattn._nsa import COMPRESS_MLP_KEYS, compress_blocks, nsa, nsa_selection  # noqa: F401 (re-exported)
from jattn.masks import Mask

__all__ = ["topk_blocks", "nsa", "compress_blocks", "nsa_selection", "lightning_indexer",
           "selection_mask", "gathered_attention"]

F32 = jnp.float32


def _pool(x, block: int, pooling: str):
    """``x [B, T, H, D]`` -> per-block pooled ``[B, n, H, D]`` over the real (unpadded) tokens."""
    b, t, h, d = x.shape
    n = max(1, -(-t // block))
    xp = jnp.pad(x.astype(F32), ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
    xp = xp.reshape(b, n, block, h, d)
    real = (jnp.arange(n * block) < t).reshape(1, n, block, 1, 1)
    if pooling == "mean":
        count = jnp.maximum(real.sum(2), 1)
        return jnp.where(real, xp, 0.0).sum(2) / count
    return jnp.where(real, xp, -jnp.inf).max(2)  # "max"


def topk_blocks(q, k, *, block_q: int, block_kv: int, k_blocks: int, mask: Mask | None = None,
                pooling: str = "mean"):
    """MoBA's block router: for each query block, its own block(s) plus the top-k key blocks.

    MoBA (Lu et al. 2025) splits the keys into blocks ``I_j`` and gates each query ``q`` by

        s_j = <q, mean_{t in I_j} k_t>,     g_j = 1  iff  s_j in TopK({s_j}, k)

    with future blocks excluded (causal) and the query's current block always on (attended
    with the causal mask inside). The paper gates per query token; here a query block shares
    one choice (``block_mask`` granularity), so ``q`` is the mean of the block's queries:
    ``s_ij = <mean_{t in Q_i} q_t, pool_{t in I_j} k_t>`` per query head (the key pool of its
    kv head: grouped-query heads share key blocks, not choices). ``block_q = 1`` is the
    per-token rule exactly. Caveat for autoregressive training: with ``block_q > 1`` the
    choice for query ``t`` depends on the later queries of its block (through the pooled
    query), a small causal leak; models route per token (``models.cores.sparse.moba_support``).

    Candidates exclude the blocks ``mask`` leaves empty (its block map: with
    :func:`jattn.masks.causal`, every block after the query block) and, when ``Tq == Tk``, the
    query's own blocks (those overlapping its positions), which are always kept when the mask
    lets them see anything; among the rest the ``k_blocks`` highest scores are kept (fewer if
    there are fewer candidates; ties go to the lower block index).

    Args:
      q: ``[B, Tq, Hq, D]``. k: ``[B, Tk, Hkv, D]`` (``Hq % Hkv == 0``).
      block_q, block_kv: block sizes of the result (use :func:`jattn.attention_block_sizes`).
      k_blocks: how many blocks besides the own ones (``>= 0``).
      mask: None or a :class:`jattn.masks.Mask` (without per-head maps).
      pooling: ``"mean"`` (MoBA) or ``"max"`` for the key blocks (queries are always averaged).

    Returns:
      bool ``[B, Hq, nq, nk]`` with ``nq = ceil(Tq / block_q)``, ``nk = ceil(Tk / block_kv)``.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [B, Tq, Hq, D] and k [B, Tk, Hkv, D] (same B and D), got "
                         f"{q.shape} and {k.shape}")
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} (q.shape[2]) must be divisible by Hkv={hkv} (k.shape[2])")
    for name, n in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if isinstance(k_blocks, bool) or not isinstance(k_blocks, int) or k_blocks < 0:
        raise ValueError(f"k_blocks must be a non-negative int, got {k_blocks!r}")
    if pooling not in ("mean", "max"):
        raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be None or a jattn.masks.Mask, got {type(mask).__name__}")
    nq, nk = max(1, -(-tq // block_q)), max(1, -(-tk // block_kv))
    g = hq // hkv
    q_pool = _pool(q, block_q, "mean")  # [B, nq, Hq, D]
    k_pool = _pool(k, block_kv, pooling)  # [B, nk, Hkv, D]
    q_pool = q_pool.reshape(b, nq, hkv, g, -1)
    s = jnp.einsum("bihgd,bjhd->bhgij", q_pool, k_pool).reshape(b, hq, nq, nk)

    allowed = jnp.ones((nq, nk), bool)
    if mask is not None and tq > 0 and tk > 0:
        with jax.ensure_compile_time_eval():
            bm = jnp.asarray(mask.block_map(tq, tk, block_q, block_kv))
        allowed = bm.reshape((-1, nq, nk)).max(0) > 0
    i = jnp.arange(nq)[:, None]
    j = jnp.arange(nk)[None, :]
    if tq == tk:  # own blocks: key block j overlaps query block i's positions
        own = (j * block_kv < (i + 1) * block_q) & ((j + 1) * block_kv > i * block_q)
        own = own & allowed
    else:
        own = jnp.zeros((nq, nk), bool)
    candidate = allowed & ~own
    chosen = own[None, None]
    if k_blocks > 0:
        kk = min(k_blocks, nk)
        masked = jnp.where(candidate, s, -jnp.inf)
        top, idx = lax.top_k(masked, kk)  # ties: the lower index first
        chosen = chosen | selection_mask(idx, top > -jnp.inf, nk)
    return jnp.broadcast_to(chosen, (b, hq, nq, nk))


def lightning_indexer(q_idx, k_idx, weights, top_k: int, *, mask: Mask | None = None):
    """DeepSeek Sparse Attention's lightning indexer and top-k token selection.

    For query token ``t`` and key token ``s`` (DeepSeek-V3.2-Exp, eq. 1):

        I_ts = sum_{j=1}^{H_I} w_tj * relu(q_tj . k_s)

    with a few small indexer heads ``j`` (``q_idx``, ``w`` from the query token, one shared
    ``k_idx`` per key token). Each query then attends only to the ``top_k`` keys of highest
    ``I_ts`` among those ``mask`` lets it see (causal in the paper).

    Args:
      q_idx: ``[B, T, H_I, D_I]``. k_idx: ``[B, S, D_I]``. weights: ``[B, T, H_I]``.
      top_k: tokens kept per query (``>= 1``; a query with fewer visible keys keeps them all).
      mask: None or a :class:`jattn.masks.Mask` (without per-head maps) over ``[T, S]``.

    Returns:
      ``(scores [B, T, S] fp32, -inf where masked; indices [B, T, k] int32; valid [B, T, k]
      bool)`` with ``k = min(top_k, S)``, indices in decreasing score order (ties: lower
      index first) and ``valid`` False for slots beyond a query's visible keys.
    """
    if q_idx.ndim != 4 or k_idx.ndim != 3 or weights.ndim != 3:
        raise ValueError(f"q_idx must be [B, T, H_I, D_I], k_idx [B, S, D_I] and weights "
                         f"[B, T, H_I]; got {q_idx.shape}, {k_idx.shape}, {weights.shape}")
    b, t, hi, di = q_idx.shape
    if k_idx.shape[0] != b or k_idx.shape[2] != di:
        raise ValueError(f"k_idx must be [B={b}, S, D_I={di}], got {k_idx.shape}")
    if weights.shape != (b, t, hi):
        raise ValueError(f"weights must be [B={b}, T={t}, H_I={hi}], got {weights.shape}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be None or a jattn.masks.Mask, got {type(mask).__name__}")
    s_len = k_idx.shape[1]
    dots = jnp.einsum("btjd,bsd->btjs", q_idx.astype(F32), k_idx.astype(F32))
    scores = jnp.einsum("btj,btjs->bts", weights.astype(F32), jax.nn.relu(dots))
    if mask is not None:
        qi = jnp.arange(t, dtype=jnp.int32)[:, None]
        ki = jnp.arange(s_len, dtype=jnp.int32)[None, :]
        vis = mask.visible(qi, ki, 0, q_len=t, kv_len=s_len)
        scores = jnp.where(vis[None], scores, -jnp.inf)
    kk = min(top_k, s_len)
    if kk == 0:
        return scores, jnp.zeros((b, t, 0), jnp.int32), jnp.zeros((b, t, 0), bool)
    top, indices = lax.top_k(scores, kk)
    return scores, indices.astype(jnp.int32), top > -jnp.inf


def gathered_attention(q, k, v, indices, valid, *, scale: float | None = None):
    """Softmax attention of each query over its selected keys only, gathered (no ``[T, S]``).

    ``o_t = sum_{n valid} softmax_n(scale * q_t . k_{idx_tn}) v_{idx_tn}``: one selection per
    query token shared by all heads (DSA selects per token, MQA-style). Memory is
    ``O(B T k H D)``; the cost is independent of ``S``. Differentiable in ``q, k, v`` (the
    gathers scatter-add their cotangents). A query with no valid key returns 0.

    Args:
      q: ``[B, T, Hq, D]``. k: ``[B, S, Hkv, D]``. v: ``[B, S, Hkv, Dv]``.
      indices: int ``[B, T, k]`` into ``S``. valid: bool ``[B, T, k]``.
      scale: default ``1 / sqrt(D)``.

    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype (fp32 accumulation).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if indices.shape[:2] != (b, t) or valid.shape != indices.shape:
        raise ValueError(f"indices and valid must be [B={b}, T={t}, k] (the same shape), got "
                         f"{indices.shape} and {valid.shape}")
    if hq % hkv:
        raise ValueError(f"Hq={hq} must be divisible by Hkv={hkv}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    g = hq // hkv
    take = jax.vmap(lambda x, idx: x[idx])  # per batch: [S, H, D][T, k] -> [T, k, H, D]
    k_sel = take(k.astype(F32), indices)
    v_sel = take(v.astype(F32), indices)
    q5 = q.astype(F32).reshape(b, t, hkv, g, d)
    s = scale * jnp.einsum("bthgd,btnhd->bthgn", q5, k_sel)
    vis = valid[:, :, None, None, :]
    m = jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(vis, jnp.exp(jnp.where(vis, s, m) - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = e / jnp.where(z > 0, z, 1.0)
    out = jnp.einsum("bthgn,btnhd->bthgd", p, v_sel)
    return out.reshape(b, t, hq, -1).astype(q.dtype)
