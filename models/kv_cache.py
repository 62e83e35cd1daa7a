"""The key/value cache of softmax-family layers while decoding, behind ``init / update / visible``.

A cache is a dict ``{"k", "v": [B, L, Hkv, Dh], "pos": [L] int32}`` (``pos`` = the absolute
position held by each slot, -1 = empty). :class:`CachePolicy` decides ``L`` and where a new
token goes:

* ``"full"``: slot = absolute position, ``L = max_len``; keys are stored already rotated.
* ``"streaming"``: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
  Attention Sinks", 2024): the first ``sink_tokens`` tokens plus the last ``window`` tokens in a
  ring buffer of ``sink_tokens + window`` slots; keys are stored before RoPE and rotated at
  their position *within the cache* (sinks at ``0 .. sink - 1``, the recent window contiguous
  after them), as in the paper.

``update`` writes the new tokens; ``visible`` returns the query/key positions to rotate with
and the ``[1, 1, Tq, L]`` visibility of the slots. Recurrent layers keep a state instead (see
:class:`models.cores.recurrent.RecurrentCore`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models.validation import is_concrete

__all__ = ["CachePolicy", "CacheView", "init", "update", "visible", "check_cache_index"]

CACHE_POLICIES = ("full", "streaming")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How softmax layers keep past keys/values while decoding (static, hashable).

    * ``"full"``: every token up to ``max_len`` (exact).
    * ``"streaming"``: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
      Attention Sinks", 2024): the first ``sink_tokens`` tokens plus the last ``window`` tokens,
      in a ring buffer of ``sink_tokens + window`` slots; memory and time per step are constant.
    """

    kind: str = "full"
    sink_tokens: int = 4
    window: int = 256

    def __post_init__(self):
        if self.kind not in CACHE_POLICIES:
            raise ValueError(f"policy kind must be one of {CACHE_POLICIES}, got {self.kind!r}")
        if self.sink_tokens < 0 or self.window <= 0:
            raise ValueError(f"need sink_tokens >= 0 and window > 0, got {self.sink_tokens}, "
                             f"{self.window}")

    def slots(self, max_len: int) -> int:
        """Cache length ``L`` for sequences of up to ``max_len`` tokens."""
        return max_len if self.kind == "full" else self.sink_tokens + self.window


class CacheView(NamedTuple):
    """What attention over the cache needs after an update.

    ``q_pos [Tq]`` / ``k_pos [L]``: positions to rotate queries / cached keys with (absolute
    under ``"full"``, within-cache under ``"streaming"``); ``mask`` bool ``[1, 1, Tq, L]``;
    ``invalid``: bool scalar, True when the step did not fit (its outputs must be NaN).
    """

    q_pos: jax.Array
    k_pos: jax.Array
    mask: jax.Array
    invalid: jax.Array


def init(batch: int, max_len: int, policy: CachePolicy, kv_heads: int, head_dim: int,
         dtype: Any) -> dict:
    """An empty cache: ``{"k", "v": zeros [B, L, Hkv, Dh], "pos": full([L], -1)}``."""
    size = policy.slots(max_len)
    shape = (batch, size, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((size,), -1, jnp.int32)}


def update(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array,
           policy: CachePolicy) -> dict:
    """Write ``k, v [B, Tq, Hkv, Dh]`` of the tokens at ``index .. index + Tq - 1``.

    ``"full"``: at slots ``index ..``. ``dynamic_update_slice`` clamps its start, so a step past
    the cache would silently overwrite the last slots: a concrete ``index`` outside
    ``[0, L - Tq]`` raises a ValueError (:func:`check_cache_index`); a traced one leaves the
    cache unchanged (:func:`visible` then flags the step invalid), at the cost of a ``Tq``-slot
    read and a select. ``"streaming"``: one token per call, at its ring-buffer slot.
    """
    tq, size = k.shape[1], cache["k"].shape[1]
    if policy.kind == "streaming":
        if tq != 1:
            raise ValueError("streaming cache decodes one token per call (prefill token by token)")
        if is_concrete(index) and int(index) < 0:
            raise ValueError(f"decode index={int(index)} must be >= 0")
        p = jnp.asarray(index, jnp.int32)
        slot = _streaming_slot(p, policy)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, slot, zero, zero)
        return {**cache,
                "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start),
                "pos": jax.lax.dynamic_update_slice(cache["pos"], p[None], (slot,))}
    if tq > size:  # static: raise even under jit
        raise ValueError(f"{tq} new tokens do not fit the KV cache of {size} slots")
    check_cache_index(index, tq, size)
    index = jnp.asarray(index, jnp.int32)
    skip = _overflow(index, tq, size)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index, zero, zero)
    q_pos = index + jnp.arange(tq, dtype=jnp.int32)
    return {**cache, "k": _write_unless(skip, cache["k"], k, start),
            "v": _write_unless(skip, cache["v"], v, start),
            "pos": _write_unless(skip, cache["pos"], q_pos, (index,))}


def visible(cache: dict, index: jax.Array, tq: int, policy: CachePolicy) -> CacheView:
    """Positions and slot visibility for the ``tq`` tokens at ``index ..`` (after
    :func:`update`). ``"full"``: slot ``j`` is visible to query position ``i`` iff it is filled
    and ``j <= i``; ``"streaming"``: every filled slot."""
    size = cache["k"].shape[1]
    p = jnp.asarray(index, jnp.int32)
    pos = cache["pos"]
    if policy.kind == "streaming":
        n_sink, window = policy.sink_tokens, policy.window
        offset = jnp.maximum(0, p - window + 1 - n_sink)
        k_pos = jnp.where(pos < n_sink, pos, pos - offset)
        q_pos = (p - offset)[None]
        return CacheView(q_pos, k_pos, (pos >= 0)[None, None, None, :], p < 0)
    q_pos = p + jnp.arange(tq, dtype=jnp.int32)
    k_pos = jnp.arange(size, dtype=jnp.int32)
    vis = (k_pos[None, :] <= q_pos[:, None]) & (pos[None, :] >= 0)
    return CacheView(q_pos, k_pos, vis[None, None], _overflow(p, tq, size))


def check_cache_index(index: Any, tq: int, size: int, what: str | None = None) -> None:
    """For a concrete ``index``: raise unless the full KV cache of ``size`` slots holds the
    ``tq`` new tokens at ``index .. index + tq - 1``. ``what`` overrides the description of
    the new tokens in the message. Traced indices are not checked."""
    if not is_concrete(index):
        return
    i = int(index)
    if i < 0:
        raise ValueError(f"decode index={i} must be >= 0")
    if i + tq > size:
        what = what or f"decode index={i} with {tq} new token(s)"
        raise ValueError(f"{what} needs slots up to {i + tq - 1}, past the KV cache of {size} "
                         f"slots; size it for the whole sequence with "
                         f"init_cache(batch, max_len >= {i + tq})")


def _overflow(index: jax.Array, tq: int, size: int) -> jax.Array:
    return (index < 0) | (index + tq > size)


def _streaming_slot(p: jax.Array, policy: CachePolicy) -> jax.Array:
    n_sink = policy.sink_tokens
    return jnp.where(p < n_sink, p, n_sink + (p - n_sink) % policy.window)


def _write_unless(skip: jax.Array, buf: jax.Array, new: jax.Array, start: tuple) -> jax.Array:
    """``dynamic_update_slice(buf, new, start)``, or ``buf`` unchanged when ``skip`` (a traced
    out-of-range start, which the update would clamp). Only the ``new``-sized slice is read."""
    new = new.astype(buf.dtype)
    old = jax.lax.dynamic_slice(buf, start, new.shape)
    return jax.lax.dynamic_update_slice(buf, jnp.where(skip, old, new), start)
