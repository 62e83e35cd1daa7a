"""DuoAttention's KV cache (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference
with Retrieval and Streaming Heads"): full heads keep every token, streaming heads a ring buffer.

Per layer and ``CachePolicy("duo", head_gates=...)`` row of gates (True = retrieval / full head),
:func:`models.kv_cache.init` allocates two fixed-size buffers:

* full heads: ``"k", "v" [B, max_len, Hf, Dh]``, slot = absolute position, ``"pos" [max_len]``;
* streaming heads: ``"stream_k", "stream_v" [B, Ls, Hs, Dh]`` with ``Ls = min(S + W, max_len)``
  (``S = sink_tokens``, ``W = window``), a ring buffer as StreamingLLM's: position ``j`` goes to
  slot ``j`` if ``j < S`` else ``S + (j - S) mod W``; ``"stream_pos" [Ls]``.

Keys of both are rotated at their absolute positions, so a streaming head computes exactly
what the masked form computes (the full layout with the "Lambda" mask: key ``j`` visible to
query ``i`` iff ``j <= i`` and (``j < S`` or ``i - j < W``)), :func:`masked_decode`, kept as
the reference.

**Memory.** Per layer, ``2 B Dh bytes (Hf max_len + Hs Ls)`` instead of
``2 B Dh bytes Hkv max_len``: a full-head fraction ``f`` stores ``f + (1 - f) Ls / max_len`` of
the full cache. E.g. ``Hkv = 8``, ``max_len = 32768``, ``S + W = 1024``, ``f = 0.25``: 0.273
of the full cache (a 3.7x saving); :func:`cache_bytes` measures a cache.

**A call** (``Tq`` tokens at ``index = p``, any ``Tq``: prefill, chunked prefill or a step):
the full heads write their keys at slots ``p ..``; the streaming heads attend over their ring
as it was before the call plus the ``Tq`` new keys (the ring holds the sinks and the ``W``
newest tokens before ``p``: everything a query at ``i >= p`` may see before ``p``), then the
new tokens are written into the ring (the last one per slot wins). All heads attend in ONE
call of the core's ``attend`` over a key axis of fixed width (per-head key positions and
visibility, see :func:`models.cache_policies._per_head_view`), so per-head parameters (``sinks``
logits, ALiBi slopes, per-head masks, output gates in ``finish``) apply unchanged. That width is
``max_len`` (the streaming heads' tokens scattered to their absolute slots: the same key
columns as the masked form) when the layer has a full head, else ``Ls + Tq`` (the ring then the
new keys): decoding compute is only saved in layers whose heads all stream (one call per head
subset would need every core's per-head parameters split). A step past ``max_len`` raises for a
concrete index and gives NaN outputs with the cache unchanged for a traced one, as ``"full"``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models import kv_cache
from models.cache_policies import _per_head_view, duo_visibility
from models.kv_cache import CachePolicy

__all__ = ["decode", "masked_decode", "cache_bytes"]


def decode(core: Any, inp: Any, cache: dict, index: jax.Array,
           policy: CachePolicy) -> tuple[jax.Array, dict]:
    """``(o [B, Tq, Hq, Dh], cache)`` of a :class:`models.cores.softmax.SoftmaxCore` for the
    ``Tq`` new tokens ``inp`` at ``index ..`` with the split cache above (``policy`` holds one
    layer's gates)."""
    tq, size = inp.q.shape[1], cache["pos"].shape[0]
    hkv = core.cfg.kv_heads
    gates = policy.layer_gates(hkv)
    if tq > size:  # static: raise even under jit
        raise ValueError(f"{tq} new tokens do not fit the KV cache of {size} slots")
    kv_cache.check_cache_index(index, tq, size)
    p = jnp.asarray(index, jnp.int32)
    skip = kv_cache.overflow(p, tq, size)
    q_pos = p + jnp.arange(tq, dtype=jnp.int32)
    q, k_new = core.rope(inp.q, q_pos), core.rope(inp.k, q_pos)
    dtype = cache["k"].dtype
    k_new, v_new = k_new.astype(dtype), inp.v.astype(dtype)
    full = [h for h in range(hkv) if gates[h]]
    stream = [h for h in range(hkv) if not gates[h]]
    zero = jnp.zeros((), jnp.int32)
    start = (zero, p, zero, zero)
    new = dict(cache)
    if full:
        new["k"] = kv_cache.write_unless(skip, cache["k"], k_new[:, :, full], start)
        new["v"] = kv_cache.write_unless(skip, cache["v"], v_new[:, :, full], start)
    new["pos"] = kv_cache.write_unless(skip, cache["pos"], q_pos, (p,))
    # streaming heads: the ring before this call followed by the new keys
    ring_pos = jnp.concatenate([cache["stream_pos"], q_pos])
    ring_k = jnp.concatenate([cache["stream_k"], k_new[:, :, stream]], axis=1)
    ring_v = jnp.concatenate([cache["stream_v"], v_new[:, :, stream]], axis=1)
    if full:  # scatter them to their absolute slots: the key columns of the full heads
        dest = jnp.where(ring_pos >= 0, ring_pos, size)  # empty slots are dropped
        ring_k = _scatter(ring_k, dest, size)
        ring_v = _scatter(ring_v, dest, size)
        ring_pos = jnp.full((size,), -1, jnp.int32).at[dest].set(ring_pos, mode="drop")
    rank = {h: i for i, h in enumerate(full)} | {h: i for i, h in enumerate(stream)}
    k = jnp.stack([new["k"][:, :, rank[h]] if gates[h] else ring_k[:, :, rank[h]]
                   for h in range(hkv)], axis=2)
    v = jnp.stack([new["v"][:, :, rank[h]] if gates[h] else ring_v[:, :, rank[h]]
                   for h in range(hkv)], axis=2)
    pos = jnp.stack([new["pos"] if gates[h] else ring_pos for h in range(hkv)])[None]
    vis, bias = _per_head_view(core, q_pos, pos)  # filled, causal, the core's mask, ALiBi
    group = core.cfg.num_heads // hkv
    kk = jnp.repeat(pos, group, axis=1)[:, :, None, :]  # [1, Hq, 1, W]
    qq = q_pos[None, None, :, None]
    lam = (kk < policy.sink_tokens) | (qq - kk < policy.window)
    is_full = jnp.repeat(jnp.asarray(gates, bool), group)[None, :, None, None]
    o = core.attend(q, k, v, mask=vis & (is_full | lam), bias=bias)
    o = core.finish(inp, o)
    if stream:  # the ring after this call: slot s takes the latest new position mapped to it
        src, took = _ring_sources(cache["stream_pos"].shape[0], tq, p, policy)
        took = took & ~skip
        for name, x in (("stream_k", k_new), ("stream_v", v_new)):
            x = jnp.take(x[:, :, stream], jnp.clip(src - p, 0, tq - 1), axis=1)
            new[name] = jnp.where(took[None, :, None, None], x, cache[name])
        new["stream_pos"] = jnp.where(took, src, cache["stream_pos"])
    return jnp.where(skip, jnp.asarray(jnp.nan, o.dtype), o), new


def _scatter(x: jax.Array, dest: jax.Array, size: int) -> jax.Array:
    """``[B, N, H, Dh] -> [B, size, H, Dh]``: row ``n`` to slot ``dest[n]`` (``size``: dropped),
    zeros elsewhere; ``dest`` holds distinct slots."""
    out = jnp.zeros((x.shape[0], size, *x.shape[2:]), x.dtype)
    return out.at[:, dest].set(x, mode="drop")


def _ring_sources(ring: int, tq: int, p: jax.Array, policy: CachePolicy):
    """For each of the ``ring`` slots, the latest of the positions ``p .. p + Tq - 1`` that the
    ring maps to it (sinks: ``j = s``; window slots: ``j = last - ((last - s) mod W)``, the
    largest ``j <= last`` with ``j = s (mod W)``) and whether that position is new."""
    n_sink, window = policy.sink_tokens, policy.window
    s = jnp.arange(ring, dtype=jnp.int32)
    last = p + tq - 1
    j = jnp.where(s < n_sink, s, last - jnp.mod(last - s, window))
    return j, (j >= p) & (j <= last) & ((s < n_sink) | (j >= n_sink))


def masked_decode(core: Any, inp: Any, cache: dict, index: jax.Array,
                  policy: CachePolicy) -> tuple[jax.Array, dict]:
    """The reference DuoAttention decode: a ``CachePolicy("full")`` cache (every head keeps
    every token) with the streaming heads masked to sinks + recent window
    (:func:`models.cache_policies.duo_visibility`). Same outputs as :func:`decode`, no memory
    saved; ``cache`` from ``core.init_cache(B, max_len, CachePolicy())``."""
    tq = inp.q.shape[1]
    full = CachePolicy()
    new_pos = jnp.asarray(index, jnp.int32) + jnp.arange(tq, dtype=jnp.int32)
    cache = kv_cache.update(cache, core.rope(inp.k, new_pos), inp.v, index, full)
    view = kv_cache.visible(cache, index, tq, full)
    q = core.rope(inp.q, view.q_pos)
    vis = view.mask & core._pattern(view.q_pos, view.k_pos)
    vis = vis & duo_visibility(policy, view.q_pos, view.k_pos, core.cfg.num_heads,
                               core.cfg.kv_heads)
    o = core.attend(q, cache["k"], cache["v"], mask=vis, bias=core.alibi(view.q_pos, view.k_pos))
    o = core.finish(inp, o)
    return jnp.where(view.invalid, jnp.asarray(jnp.nan, o.dtype), o), cache


def cache_bytes(cache: Any) -> int:
    """Bytes held by a (decoder's) cache: every array leaf, positions included."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(cache))
