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

* ``"duo"``: DuoAttention, two buffers per layer: its full (retrieval) KV heads at slot =
  absolute position (``"k", "v" [B, max_len, Hf, Dh]``, ``"pos" [max_len]``), its streaming
  heads in a ring buffer of ``sink_tokens + window`` slots (``"stream_k", "stream_v"
  [B, S + W, Hs, Dh]``, ``"stream_pos" [S + W]``), keys rotated at absolute positions; decoded
  by :func:`models.duo.decode`.
* ``"snapkv"``, ``"h2o"``, ``"l2norm"``: per-head slots, ``pos [B, Hkv, L]``, handled by
  :mod:`models.cache_policies` (keys rotated at absolute positions).

``update`` writes the new tokens; ``visible`` returns the query/key positions to rotate with
and the ``[1, 1, Tq, L]`` visibility of the slots. Recurrent layers keep a state instead (see
:class:`models.cores.recurrent.RecurrentCore`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.validation import is_concrete

__all__ = ["CachePolicy", "CacheView", "init", "update", "visible", "check_cache_index"]

CACHE_POLICIES = ("full", "streaming", "snapkv", "h2o", "l2norm", "duo")
#: policies whose slots differ per (batch, KV head): ``pos`` is ``[B, Hkv, L]``
PER_HEAD_POLICIES = ("snapkv", "h2o", "l2norm")
#: policies whose ``pos [L]`` is slot = absolute position (keys rotated); ``"duo"``: its full
#: heads (``max_len`` bounds the decoded positions as for ``"full"``)
ABSOLUTE_SLOT_POLICIES = ("full", "duo")
POOLINGS = ("avg", "max")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How softmax layers keep past keys/values while decoding (static, hashable).

    ``budget`` is in tokens per (batch row, KV head); every policy but ``"streaming"`` caches
    keys rotated at their absolute positions (queries too), so a budget that holds the whole
    sequence reproduces full decoding exactly. Policies (see :mod:`models.cache_policies` for
    the rules in full):

    * ``"full"``: every token up to ``max_len`` (exact; ``budget`` is ignored).
    * ``"streaming"``: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
      Attention Sinks", 2024): the first ``sink_tokens`` tokens plus the last ``window`` tokens,
      in a ring buffer of ``sink_tokens + window`` slots; memory and time per step are constant.
      Keys are rotated at their position *within the cache*. ``budget`` (when given) sets
      ``window = budget - sink_tokens``.
    * ``"snapkv"``: SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before
      Generation", 2024): at prefill the last ``observation_window`` (default
      ``min(32, budget // 2)``, the paper's 32) queries vote; the
      ``budget - observation_window`` prompt tokens with the most (``kernel_size``-pooled,
      ``pooling`` "avg"/"max") votes plus the window are kept; generated tokens append.
    * ``"h2o"``: H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
      Inference of Large Language Models", 2023): the ``recent`` newest tokens plus the
      heaviest hitters by accumulated attention, ``budget`` in all; the lightest is evicted
      each step when full. ``recent`` defaults to ``budget // 2`` (the paper's even split).
    * ``"l2norm"``: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
      Compression" (2024): the ``budget`` keys with the lowest L2 norm (the ``recent`` newest
      always kept; default 0: no recent window, the newest token still attends to itself).
    * ``"duo"``: DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM
      Inference with Retrieval and Streaming Heads", 2024): per (layer, KV head) gates
      ``head_gates[layer][head]``: True = retrieval head (full cache), False = streaming head
      (``sink_tokens`` sinks + the ``window`` newest; ``budget`` sets
      ``window = budget - sink_tokens``). Full heads cache ``max_len`` tokens, streaming heads
      ``min(sink_tokens + window, max_len)`` (a ring buffer): a gate fraction ``f`` stores
      ``f + (1 - f) (S + W) / max_len`` of the full cache (:mod:`models.duo`). Build gates from
      retrieval scores with :func:`models.cache_policies.gates_from_scores` or learn them with
      :func:`models.duo_gates.learn_duo_gates`.
    """

    kind: str = "full"
    sink_tokens: int = 4
    window: int = 256
    budget: int | None = None
    recent: int | None = None
    observation_window: int | None = None
    kernel_size: int = 5
    pooling: str = "avg"
    head_gates: tuple[tuple[bool, ...], ...] | None = None

    def __post_init__(self):
        if self.kind not in CACHE_POLICIES:
            raise ValueError(f"policy kind must be one of {CACHE_POLICIES}, got {self.kind!r}")
        budget = self.budget
        if budget is not None and (not _is_int(budget) or budget < 1):
            raise ValueError(f"budget must be a positive int (tokens per KV head) or None, "
                             f"got {budget!r}")
        if self.kind in PER_HEAD_POLICIES and budget is None:
            raise ValueError(f"policy {self.kind!r} needs budget= (tokens kept per KV head)")
        if self.kind in ("streaming", "duo") and budget is not None:
            if budget <= self.sink_tokens:
                raise ValueError(f"budget={budget} must exceed sink_tokens={self.sink_tokens} "
                                 f"(the rest is the recent window)")
            object.__setattr__(self, "window", budget - self.sink_tokens)
        if self.sink_tokens < 0 or self.window <= 0:
            raise ValueError(f"need sink_tokens >= 0 and window > 0, got {self.sink_tokens}, "
                             f"{self.window}")
        if self.kind == "snapkv":
            if budget < 2:
                raise ValueError(f"policy 'snapkv' needs budget >= 2 (an observation window "
                                 f"and a voted token), got budget={budget}")
            w = self.observation_window
            if w is None:  # the paper's 32, at most half the budget
                w = min(32, budget // 2)
                object.__setattr__(self, "observation_window", w)
            if not _is_int(w) or not 1 <= w < budget:
                raise ValueError(f"observation_window must be an int in [1, budget={budget}), "
                                 f"got {w!r}")
            if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be a positive odd int, got "
                                 f"{self.kernel_size!r}")
            if self.pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.kind in ("h2o", "l2norm"):
            recent = self.recent
            if recent is None:
                recent = budget // 2 if self.kind == "h2o" else 0
            if not _is_int(recent) or not 0 <= recent <= budget:
                raise ValueError(f"recent must be an int in [0, budget={budget}], got {recent!r}")
            object.__setattr__(self, "recent", recent)
        elif self.recent is not None:
            raise ValueError(f"recent applies to the 'h2o' and 'l2norm' policies, not "
                             f"{self.kind!r}")
        if self.kind == "duo":
            if self.head_gates is None:
                raise ValueError("policy 'duo' needs head_gates= (per layer, per KV head: True = "
                                 "full cache, False = streaming); see "
                                 "models.cache_policies.gates_from_scores")
            object.__setattr__(self, "head_gates", _as_gates(self.head_gates))
        elif self.head_gates is not None:
            raise ValueError(f"head_gates applies to the 'duo' policy, not {self.kind!r}")

    def slots(self, max_len: int) -> int:
        """Cache length ``L`` for sequences of up to ``max_len`` tokens. SnapKV starts with
        ``max_len`` slots and its prefill shrinks the cache to ``min(P, budget) + max_len - P``
        (the kept prompt plus room for the generated tokens)."""
        if self.kind == "streaming":
            return self.sink_tokens + self.window
        if self.kind in ("h2o", "l2norm"):
            return min(self.budget, max_len)
        return max_len

    def for_layer(self, layer: int) -> CachePolicy:
        """The policy layer ``layer`` of a model decodes with: ``"duo"`` keeps that layer's row
        of ``head_gates``; the others are the same for every layer."""
        if self.kind != "duo" or len(self.head_gates) == 1:
            return self
        if not 0 <= layer < len(self.head_gates):
            raise ValueError(f"head_gates has {len(self.head_gates)} layers, the model at least "
                             f"{layer + 1}")
        return dataclasses.replace(self, head_gates=(self.head_gates[layer],))

    def layer_gates(self, kv_heads: int) -> tuple[bool, ...]:
        """``"duo"``: the gates of one layer (after :meth:`for_layer`), one per KV head."""
        if len(self.head_gates) != 1:
            raise ValueError(f"head_gates holds {len(self.head_gates)} layers: a single layer "
                             f"decodes with policy.for_layer(layer_index)")
        gates = self.head_gates[0]
        if len(gates) != kv_heads:
            raise ValueError(f"head_gates rows must have one gate per KV head ({kv_heads}), "
                             f"got {len(gates)}")
        return gates


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_gates(gates) -> tuple[tuple[bool, ...], ...]:
    """Nested sequences / a ``[layers, kv_heads]`` array of bools or 0/1 -> tuples of bools."""
    try:
        rows = tuple(tuple(bool(g) for g in row) for row in np.asarray(gates).tolist())
        arr = np.asarray(gates)
    except TypeError:
        raise ValueError(f"head_gates must be [layers][kv_heads] bools, got {gates!r}") from None
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"head_gates must be [layers][kv_heads] bools (True = full cache), "
                         f"got shape {arr.shape} values {np.unique(arr)[:4]}")
    return rows


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
    """An empty cache: ``{"k", "v": zeros [B, L, Hkv, Dh], "pos": full([L], -1)}``.

    Per-head policies (``"snapkv"``, ``"h2o"``, ``"l2norm"``) hold different tokens in each
    (batch row, KV head): ``pos`` is ``[B, Hkv, L]``; H2O adds the accumulated attention
    ``"score": zeros [B, Hkv, L]`` (fp32). ``"duo"`` (one layer's gates, see
    :meth:`CachePolicy.for_layer`): ``"k", "v" [B, max_len, Hf, Dh]`` and ``"pos" [max_len]``
    for its ``Hf`` full heads, ``"stream_k", "stream_v" [B, Ls, Hs, Dh]`` and
    ``"stream_pos" [Ls]`` for its ``Hs`` streaming heads, ``Ls = min(S + W, max_len)``."""
    if policy.kind == "duo":
        gates = policy.layer_gates(kv_heads)
        n_full, ring = sum(gates), min(policy.sink_tokens + policy.window, max_len)
        full = (batch, max_len, n_full, head_dim)
        stream = (batch, ring, kv_heads - n_full, head_dim)
        return {"k": jnp.zeros(full, dtype), "v": jnp.zeros(full, dtype),
                "pos": jnp.full((max_len,), -1, jnp.int32),
                "stream_k": jnp.zeros(stream, dtype), "stream_v": jnp.zeros(stream, dtype),
                "stream_pos": jnp.full((ring,), -1, jnp.int32)}
    size = policy.slots(max_len)
    shape = (batch, size, kv_heads, head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if policy.kind not in PER_HEAD_POLICIES:
        return {**cache, "pos": jnp.full((size,), -1, jnp.int32)}
    cache["pos"] = jnp.full((batch, kv_heads, size), -1, jnp.int32)
    if policy.kind == "h2o":
        cache["score"] = jnp.zeros((batch, kv_heads, size), jnp.float32)
    return cache


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
    if policy.kind != "full":
        raise ValueError(f"kv_cache.update handles 'full' and 'streaming'; policy "
                         f"{policy.kind!r} decodes through models.cache_policies / models.duo")
    if tq > size:  # static: raise even under jit
        raise ValueError(f"{tq} new tokens do not fit the KV cache of {size} slots")
    check_cache_index(index, tq, size)
    index = jnp.asarray(index, jnp.int32)
    skip = overflow(index, tq, size)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index, zero, zero)
    q_pos = index + jnp.arange(tq, dtype=jnp.int32)
    return {**cache, "k": write_unless(skip, cache["k"], k, start),
            "v": write_unless(skip, cache["v"], v, start),
            "pos": write_unless(skip, cache["pos"], q_pos, (index,))}


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
    return CacheView(q_pos, k_pos, vis[None, None], overflow(p, tq, size))


def require_full(policy: CachePolicy, mechanism: str, why: str = "") -> None:
    """Raise NotImplementedError unless ``policy`` is the full KV cache: ``mechanism`` reads
    state that an evicting policy would lose (``why`` says which, for the message)."""
    if policy.kind != "full":
        reason = f" ({why})" if why else ""
        raise NotImplementedError(f"{mechanism} decodes with the full KV cache only{reason}, got "
                                  f"policy {policy.kind!r}")


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


def overflow(index: jax.Array, tq: int, size: int) -> jax.Array:
    return (index < 0) | (index + tq > size)


def _streaming_slot(p: jax.Array, policy: CachePolicy) -> jax.Array:
    n_sink = policy.sink_tokens
    return jnp.where(p < n_sink, p, n_sink + (p - n_sink) % policy.window)


def write_unless(skip: jax.Array, buf: jax.Array, new: jax.Array, start: tuple) -> jax.Array:
    """``dynamic_update_slice(buf, new, start)``, or ``buf`` unchanged when ``skip`` (a traced
    out-of-range start, which the update would clamp). Only the ``new``-sized slice is read."""
    new = new.astype(buf.dtype)
    old = jax.lax.dynamic_slice(buf, start, new.shape)
    return jax.lax.dynamic_update_slice(buf, jnp.where(skip, old, new), start)
