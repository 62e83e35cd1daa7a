"""Budgeted KV caches: SnapKV, H2O and L2-norm eviction (per-head slots) and DuoAttention heads.

:class:`models.kv_cache.CachePolicy` names the policy; :meth:`SoftmaxCore.decode
<models.cores.softmax.SoftmaxCore.decode>` hands ``"snapkv"``, ``"h2o"`` and ``"l2norm"`` to
:func:`decode`; ``"duo"`` decodes in :mod:`models.duo` (split cache; :func:`duo_visibility` is
its masked reference's rule).

**Layout.** ``k, v [B, L, Hkv, Dh]`` with ``L = budget`` slots (SnapKV: the kept prompt plus
room for the generated tokens), and ``pos [B, Hkv, L]``: the absolute position held by each
(row, KV head, slot), -1 = empty; every (row, KV head) keeps its own tokens. H2O adds
``score [B, Hkv, L]``, the attention each cached token has received so far.

**Positions.** Keys are rotated at their absolute positions before they are cached and queries
at theirs, as the papers' implementations do (HF caches post-RoPE keys): eviction leaves gaps
in the positions and never renumbers them, so with ``budget >= T`` every policy is exactly full
decoding. (Only ``"streaming"`` renumbers, StreamingLLM-style, within the cache.)

**Calls.** A call with ``Tq > 1`` tokens is the prefill, from an empty cache at index 0 (a
concrete other index raises; a traced one gives NaN outputs): the prompt attends causally over
itself, exactly as with the full cache, then the policy picks the prompt tokens it keeps. A call
with one token writes it into the first empty slot, or, when the (row, head) is full, over the
policy's victim chosen *before* the new token attends; then the token attends over the cache.
The newest token is therefore always cached when it attends.

**Rules** (per row and KV head; with GQA a KV head's statistic sums over its query group):

* SnapKV (Li et al. 2024): a prompt of ``P > budget`` tokens keeps its last
  ``w = observation_window`` tokens plus the ``budget - w`` earlier tokens with the largest
  pooled votes ``pool_k(sum_{i in window} A[i, j])``, ``A`` the attention weights of the window's
  queries and ``pool_k`` a stride-1 1-D ``"avg"`` (zero padding, divided by ``k``) or ``"max"``
  pool of width ``k = kernel_size``; later tokens append (no eviction while decoding).
* H2O (Zhang et al. 2023): ``score[j] = sum_i A[i, j]`` over every query that saw ``j``. A prompt
  of ``P > budget`` tokens keeps its ``recent`` newest plus the ``budget - recent`` highest-score
  others; each later step, when full, evicts the lowest-score token outside the ``recent``
  newest (the new token counted among them), then the new token attends and adds its weights.
* L2 norm (Devoto et al. 2024): keep the keys of lowest ``||k_j||_2`` (RoPE is a rotation: the
  norm is that of the unrotated key). The prompt keeps its ``recent`` newest plus the lowest-norm
  rest; a full step evicts the highest-norm key outside the ``recent`` newest. Since norms never
  change, after step ``t`` the cache holds exactly the ``max(recent, 1)`` newest tokens plus the
  lowest-norm ``budget - max(recent, 1)`` of the others. Chosen here: no attention sinks (the
  paper observes sinks have low key norms, so the rule keeps them anyway), ``recent = 0``.
* DuoAttention (Xiao et al. 2024): retrieval heads (gate True) see every token; streaming heads
  see the ``sink_tokens`` first and the ``window`` newest (the "Lambda" mask, at prefill too).
  Full heads cache ``max_len`` tokens, streaming heads a ring buffer of ``sink_tokens + window``
  slots (:mod:`models.duo`; the masked full layout, :func:`models.duo.masked_decode`, is the
  reference it equals).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from models.kv_cache import CachePolicy
from models.validation import is_concrete

__all__ = ["decode", "duo_visibility", "gates_from_scores"]


def decode(core: Any, inp: Any, cache: dict, index: jax.Array,
           policy: CachePolicy) -> tuple[jax.Array, dict]:
    """``(o [B, Tq, Hq, Dh], cache)`` for a per-head policy (``"snapkv"``, ``"h2o"``,
    ``"l2norm"``); ``core`` is a :class:`models.cores.softmax.SoftmaxCore`, ``inp`` its
    :class:`CoreInputs` of ``Tq`` new tokens at ``index ..``. See the module docstring."""
    tq = inp.q.shape[1]
    if is_concrete(index):
        i = int(index)
        if tq > 1 and i != 0:
            raise ValueError(f"policy {policy.kind!r}: a call with {tq} tokens is the prefill "
                             f"and must start at index=0, got index={i}; decode one token "
                             f"per call after it")
        if i < 0:
            raise ValueError(f"decode index={i} must be >= 0")
    p = jnp.asarray(index, jnp.int32)
    o, cache, invalid = (_prefill if tq > 1 else _step)(core, inp, cache, p, policy)
    o = core.finish(inp, o)
    return jnp.where(invalid, jnp.asarray(jnp.nan, o.dtype), o), cache


def _prefill(core, inp, cache, p, policy):
    t, size = inp.q.shape[1], cache["k"].shape[1]
    if policy.kind == "snapkv" and t > size:
        raise ValueError(f"{t} prompt tokens do not fit the KV cache of {size} slots; size it "
                         f"with init_cache(batch, max_len >= prompt + new tokens)")
    pos = p + jnp.arange(t, dtype=jnp.int32)
    q, k = core.rope(inp.q, pos), core.rope(inp.k, pos)
    # attend over max(L, P) key slots like the full cache does (same shapes, same numbers)
    width = max(size, t)
    k_pos = jnp.arange(width, dtype=jnp.int32)
    vis = ((k_pos[None, :] <= pos[:, None]) & (k_pos < t))[None, None]
    vis = vis & core._pattern(pos, k_pos)
    bias = core.alibi(pos, k_pos)
    dtype = cache["k"].dtype
    k_wide = _pad(k.astype(dtype), width, axis=1, value=0)
    o = core.attend(q, k_wide, _pad(inp.v.astype(dtype), width, axis=1, value=0), mask=vis,
                    bias=bias)
    idx, score = _select_prompt(core, q, k_wide, vis, bias, policy, size, t)
    n = idx.shape[-1]
    room = n + size - t if policy.kind == "snapkv" else size  # SnapKV: kept + new tokens

    def kept(x):  # [B, T, Hkv, Dh] -> [B, room, Hkv, Dh]
        x = jnp.take_along_axis(x, jnp.swapaxes(idx, 1, 2)[..., None], axis=1)
        return _pad(x.astype(dtype), room, axis=1, value=0)

    new = {**cache, "k": kept(k), "v": kept(inp.v), "pos": _pad(idx, room, axis=2, value=-1)}
    if score is not None:
        new["score"] = _pad(score, room, axis=2, value=0)
    return o, new, p != 0


def _select_prompt(core, q, k, vis, bias, policy: CachePolicy, size: int, t: int):
    """Kept prompt positions ``idx [B, Hkv, n]`` (ascending) and, for H2O, their scores.
    ``k [B, W, Hkv, Dh]``, ``vis``/``bias`` ``[., ., P, W]``: the prompt's ``t`` keys padded to
    ``W >= t`` slots (the padding is masked)."""
    b, hkv = k.shape[0], k.shape[2]
    all_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, hkv, t))
    if policy.kind == "snapkv":
        keep = min(t, policy.budget)
        if keep == t:
            return all_idx, None
        w = policy.observation_window
        a = core.weights(q[:, -w:], k, mask=vis[:, :, -w:],
                         bias=None if bias is None else bias[:, :, -w:])
        votes = _pool(_group_sum(a.sum(2), hkv)[..., :t - w], policy.kernel_size,
                      policy.pooling)
        top = jnp.sort(jax.lax.top_k(votes, keep - w)[1], axis=-1)
        return jnp.concatenate([top.astype(jnp.int32), all_idx[..., t - w:]], axis=-1), None
    score = None
    if policy.kind == "h2o":
        score = _column_sums(core, q, k, vis, bias, hkv)[..., :t]
        rank = score
    else:  # l2norm: lowest norm first
        rank = -jnp.moveaxis(_norm(k[:, :t]), 1, 2)
    keep = min(t, size)
    if keep == t:
        idx = all_idx
    else:
        protected = jnp.arange(t) >= t - min(policy.recent, size)
        idx = jax.lax.top_k(jnp.where(protected, jnp.inf, rank), keep)[1]
        idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    return idx, None if score is None else jnp.take_along_axis(score, idx, axis=-1)


def _step(core, inp, cache, p, policy):
    pos, k_cache = cache["pos"], cache["k"]
    size = pos.shape[-1]
    q, k_new = core.rope(inp.q, p[None]), core.rope(inp.k, p[None])
    filled = pos >= 0
    has_empty = ~filled.all(-1)
    first_empty = jnp.argmin(filled, axis=-1)
    if policy.kind == "snapkv":  # no eviction after the prefill
        victim, can_evict = first_empty, jnp.zeros_like(has_empty)
    else:
        # the recent window is capped at the cache (max_len may be below the budget)
        evictable = filled & (pos <= p - min(policy.recent, size))
        if policy.kind == "h2o":
            victim = jnp.argmin(jnp.where(evictable, cache["score"], jnp.inf), axis=-1)
        else:
            norms = jnp.moveaxis(_norm(k_cache), 1, 2)
            victim = jnp.argmax(jnp.where(evictable, norms, -jnp.inf), axis=-1)
        can_evict = evictable.any(-1)
    invalid = (p < 0) | ~jnp.all(has_empty | can_evict)
    slot = jnp.where(has_empty, first_empty, victim)
    write = (jnp.arange(size) == slot[..., None]) & ~invalid  # [B, Hkv, L]
    write_k = jnp.swapaxes(write, 1, 2)[..., None]  # [B, L, Hkv, 1]
    k = jnp.where(write_k, k_new.astype(k_cache.dtype), k_cache)
    v = jnp.where(write_k, inp.v.astype(cache["v"].dtype), cache["v"])
    pos = jnp.where(write, p, pos)
    new = {**cache, "k": k, "v": v, "pos": pos}
    vis, bias = _per_head_view(core, p[None], pos)
    o = core.attend(q, k, v, mask=vis, bias=bias)
    if policy.kind == "h2o":
        a = _group_sum(core.weights(q, k, mask=vis, bias=bias)[:, :, 0], pos.shape[1])
        score = jnp.where(write, 0.0, cache["score"]) + a
        new["score"] = jnp.where(invalid, cache["score"], score)
    return o, new, invalid


def _per_head_view(core, q_pos: jax.Array, pos: jax.Array):
    """Visibility ``[B, Hq, Tq, L]`` of per-head slots ``pos [B, Hkv, L]`` (filled, causal,
    the core's mask at absolute positions) and the ALiBi bias (or None)."""
    hq = core.cfg.num_heads
    kpos = jnp.repeat(pos, hq // pos.shape[1], axis=1)[:, :, None, :]  # [B, Hq, 1, L]
    qq = q_pos[None, None, :, None]
    vis = (kpos >= 0) & (kpos <= qq)
    if core.mask is not None:
        n = 1 << 30  # absolute positions: Tq = Tk, no end-alignment offset
        head = 0 if core.mask.num_heads is None else jnp.arange(hq)[None, :, None, None]
        vis = vis & core.mask.visible(qq, jnp.maximum(kpos, 0), head, q_len=n, kv_len=n)
    bias = None
    if core.cfg.position == "alibi":
        slopes = jattn.position.alibi_slopes(hq)[None, :, None, None]
        bias = -slopes * jnp.abs(qq - kpos).astype(jnp.float32)
    return vis, bias


def duo_visibility(policy: CachePolicy, q_pos: jax.Array, k_pos: jax.Array, num_heads: int,
                   kv_heads: int) -> jax.Array:
    """DuoAttention's per-head visibility ``[1, Hq, Tq, L]`` (AND it with the causal mask):
    retrieval heads (gate True) see every slot; streaming heads see ``k < sink_tokens`` or
    ``q - k < window`` (absolute positions ``q_pos [Tq]``, ``k_pos [L]``)."""
    gates = jnp.asarray(policy.layer_gates(kv_heads), bool)
    full = jnp.repeat(gates, num_heads // kv_heads)[None, :, None, None]
    qq, kk = q_pos[:, None], k_pos[None, :]
    streaming = (kk < policy.sink_tokens) | (qq - kk < policy.window)
    return full | streaming[None, None]


def gates_from_scores(scores: Any, full_fraction: float = 0.5, *,
                      kv_heads: int | None = None) -> tuple[tuple[bool, ...], ...]:
    """DuoAttention head gates ``[layers][kv_heads]`` from retrieval scores ``[L, H]`` (e.g.
    ``jattn.analysis`` retrieval-head scores, Wu et al. 2024, or learned gate values ``alpha``).

    The ``round(full_fraction * L * H)`` highest-scoring (layer, head) pairs, ranked across all
    layers as DuoAttention thresholds its gates, get the full cache (True); the rest stream.
    With ``kv_heads`` and ``H`` query heads (``H % kv_heads == 0``), a KV head's score is the max
    over its query group (it must keep everything if any of its query heads retrieves).
    Use: ``CachePolicy("duo", budget=..., head_gates=gates_from_scores(s, 0.25))``.
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty [layers, heads] array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if not 0.0 <= full_fraction <= 1.0:
        raise ValueError(f"full_fraction must be in [0, 1], got {full_fraction!r}")
    if kv_heads is not None and s.shape[1] != kv_heads:
        if kv_heads < 1 or s.shape[1] % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide the scores' heads {s.shape[1]}")
        s = s.reshape(s.shape[0], kv_heads, -1).max(-1)
    order = np.argsort(-s, axis=None, kind="stable")
    gates = np.zeros(s.size, bool)
    gates[order[:round(full_fraction * s.size)]] = True
    return tuple(tuple(bool(g) for g in row) for row in gates.reshape(s.shape))


def _column_sums(core, q, k, vis, bias, kv_heads: int, chunk: int = 256) -> jax.Array:
    """``sum_i A[i, j]`` over all queries, per KV head ``[B, Hkv, W]``, ``chunk`` query rows at
    a time (the ``[B, Hq, P, W]`` weights of a long prompt are never materialized at once)."""
    total = 0.0
    for s in range(0, q.shape[1], chunk):
        rows = slice(s, s + chunk)
        a = core.weights(q[:, rows], k, mask=vis[:, :, rows],
                         bias=None if bias is None else bias[:, :, rows])
        total = total + _group_sum(a.sum(2), kv_heads)
    return total


# --- helpers --------------------------------------------------------------------------------------
def _group_sum(x: jax.Array, kv_heads: int) -> jax.Array:
    """``[B, Hq, ...] -> [B, Hkv, ...]``: sum over each KV head's query group."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[2:]).sum(2)


def _norm(k: jax.Array) -> jax.Array:
    """``||k||_2`` over the last axis, fp32."""
    return jnp.sqrt(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1))


def _pool(x: jax.Array, width: int, mode: str) -> jax.Array:
    """Stride-1 1-D pooling of ``x [..., N]`` over ``width`` (odd) neighbours, same length:
    ``"avg"`` pads with zeros and divides by ``width`` (PyTorch's ``avg_pool1d`` default, as
    SnapKV calls it), ``"max"`` pads with ``-inf``."""
    n, half = x.shape[-1], width // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    xp = jnp.pad(x, pad, constant_values=0.0 if mode == "avg" else -jnp.inf)
    win = jnp.stack([xp[..., i:i + n] for i in range(width)], axis=0)
    return win.sum(0) / width if mode == "avg" else win.max(0)


def _pad(x: jax.Array, size: int, *, axis: int, value) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
