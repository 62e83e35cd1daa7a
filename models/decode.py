"""Autoregressive decoding for :class:`models.decoder.Decoder`: prefill, then token by token.

Softmax layers keep a KV cache (``CachePolicy("full")``: the whole context up to ``max_len``;
``CachePolicy("streaming", sink_tokens, window)``: StreamingLLM's attention sinks + recent
window, constant memory; budgeted SnapKV / H2O / L2-norm / DuoAttention caches); linear layers
keep their recurrent state ``[B, H, K, V]`` and advance it with ``jattn.linear``
(``initial_state`` / ``output_final_state``). Everything runs under
``jax.jit`` around ``nnx.split`` / ``nnx.merge``:

* :func:`decode_fns` returns jitted ``prefill(state, tokens, cache)`` and
  ``step(state, tokens, cache, index)`` (the cache is donated);
* :func:`generate` runs the prefill and a ``lax.scan`` over new tokens in one jitted program.

The prompt is processed in one call (its queries attend causally over the cache; SnapKV, H2O
and L2-norm then pick the prompt tokens they keep, :mod:`models.cache_policies`); the streaming
policy feeds the prompt one token at a time, so each token sees exactly what it would see while
generating. ``CachePolicy(kind, budget=...)`` picks the policy (``"full"``, ``"streaming"``,
``"snapkv"``, ``"h2o"``, ``"l2norm"``, ``"duo"``; see :class:`models.kv_cache.CachePolicy`).

Bad input raises a ValueError where the values are concrete (token ids outside
``[0, vocab_size)``, an index past the full KV cache or the learned position table, an empty
prompt, a negative temperature). Under ``jit`` they are traced and cannot raise: an
out-of-range id or position embeds as NaN and a step past the KV cache returns NaN logits
without touching the cache, so the error shows in the outputs instead of a plausible number.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.kv_cache import (
    ABSOLUTE_SLOT_POLICIES,
    PER_HEAD_POLICIES,
    CachePolicy,
    check_cache_index,
)
from models.validation import check_ids, is_concrete

__all__ = ["decode_fns", "generate", "sample"]


def _check_temperature(temperature: float) -> float:
    try:
        t = float(temperature)
    except TypeError:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    return t


def sample(logits: jax.Array, rng: jax.Array | None, temperature: float) -> jax.Array:
    """Greedy (``temperature == 0``) or categorical sampling from ``logits [B, V]``
    (``softmax(logits / temperature)``; ``temperature`` a finite float ``>= 0``)."""
    _check_temperature(temperature)
    if temperature == 0.0 or rng is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def _prefill(model, tokens, cache, policy: CachePolicy):
    """Logits of the last prompt token ``[B, V]`` and the filled cache."""
    if policy.kind != "streaming":  # one call; streaming renumbers, so token by token
        logits, cache = model.decode(tokens, cache, jnp.zeros((), jnp.int32), policy)
        return logits[:, -1], cache

    def body(cache, xs):
        tok, i = xs
        logits, cache = model.decode(tok[:, None], cache, i, policy)
        return cache, logits[:, 0]

    t = tokens.shape[1]
    cache, logits = jax.lax.scan(body, cache, (tokens.T, jnp.arange(t, dtype=jnp.int32)))
    return logits[-1], cache


def _cache_slots(cache) -> int | None:
    """Slots of the smallest KV cache in a decoder's cache (None: no KV cache)."""
    sizes = [leaf.shape[-1] for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
             if path and getattr(path[-1], "key", None) == "pos"]
    return min(sizes) if sizes else None


def _check_new_tokens(model, tokens, cache, index, policy: CachePolicy, what: str) -> None:
    """The concrete checks of a decode call (ids, learned positions, KV cache size): the
    jitted function only sees traced values, where a bad one gives NaN logits instead."""
    tq = tokens.shape[1]
    if getattr(model, "embed", None) is not None:
        check_ids(tokens, model.cfg.vocab_size, "token ids", "vocab_size")
    if not is_concrete(index):
        return
    i = int(index)
    if i < 0:
        raise ValueError(f"decode index={i} must be >= 0")
    if hasattr(model, "check_positions"):  # a Decoder (decode_fns takes any such module)
        model.check_positions(i + tq, what)
    if policy.kind in PER_HEAD_POLICIES and tq > 1 and i != 0:
        raise ValueError(f"policy {policy.kind!r}: {what} is a prefill and must start at "
                         f"index=0")
    slots = _cache_slots(cache)
    if policy.kind in ABSOLUTE_SLOT_POLICIES and slots is not None:
        check_cache_index(i, tq, slots, what)


def decode_fns(model: nnx.Module, policy: CachePolicy = CachePolicy()):  # noqa: B008
    """``(state, prefill, step)`` for ``model``: ``prefill(state, tokens [B, P], cache) ->
    (last logits [B, V], cache)`` and ``step(state, tokens [B, 1], cache, index) ->
    (logits [B, 1, V], cache)``, both jitted (cache donated).

    Before the jitted call each checks what it can see concretely: token ids in
    ``[0, vocab_size)``, ``index >= 0``, learned positions within ``max_len`` and, under the
    full policy, that the KV cache has room (``dynamic_update_slice`` would otherwise clamp and
    overwrite the last slot): a ValueError. A concrete ``index`` held on the device is read
    back for this (a sync). Called inside another ``jit`` the values are traced; then a step
    past the cache returns NaN logits and leaves the cache unchanged. ``prefill.jitted`` /
    ``step.jitted`` are the jitted functions (e.g. ``step.jitted._cache_size()``).
    """
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def prefill_jit(state, tokens, cache):
        return _prefill(nnx.merge(graphdef, state), tokens, cache, policy)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def step_jit(state, tokens, cache, index):
        return nnx.merge(graphdef, state).decode(tokens, cache, index, policy)

    def prefill(state, tokens, cache):
        _check_new_tokens(model, tokens, cache, 0, policy, f"{tokens.shape[1]} prompt tokens")
        return prefill_jit(state, tokens, cache)

    def step(state, tokens, cache, index):
        _check_new_tokens(model, tokens, cache, index, policy,
                          f"decode index={index} with {tokens.shape[1]} new token(s)")
        return step_jit(state, tokens, cache, index)

    prefill.jitted, step.jitted = prefill_jit, step_jit  # for introspection (compile counts)
    return state, prefill, step


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, cache, num_new: int, temperature: float,
              policy: CachePolicy, rng):
    model = nnx.merge(graphdef, state)
    p = prompt.shape[1]
    logits, cache = _prefill(model, prompt, cache, policy)
    keys = jax.random.split(rng, num_new)
    first = sample(logits, keys[0], temperature)

    def body(carry, xs):
        tok, cache = carry
        i, key = xs
        logits, cache = model.decode(tok[:, None], cache, i, policy)
        nxt = sample(logits[:, 0], key, temperature)
        return (nxt, cache), nxt

    idx = p + jnp.arange(num_new - 1, dtype=jnp.int32)
    _, rest = jax.lax.scan(body, (first, cache), (idx, keys[1:]))
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *,
             rng: jax.Array | None = None, temperature: float = 0.0, max_len: int | None = None,
             policy: CachePolicy = CachePolicy()) -> jax.Array:  # noqa: B008
    """``[B, P + N]``: ``prompt [B, P]`` followed by ``N = max_new_tokens`` sampled tokens.

    ``max_len`` sizes the full and DuoAttention KV caches (default ``P + N``) and SnapKV's
    before its prefill shrinks it to ``min(P, budget) + max_len - P``; the streaming cache has
    ``sink_tokens + window`` slots and H2O / L2-norm ``budget``, whatever the length.
    ValueError for an empty prompt, a negative or non-finite ``temperature``, prompt ids
    outside ``[0, vocab_size)`` (checked when the prompt is concrete; traced ids give NaN
    logits), and ``P + N`` past a learned position table (``DecoderConfig.max_len``).
    """
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an int array [B, P], got {prompt.dtype}{prompt.shape}")
    b, p = prompt.shape
    if p == 0:
        raise ValueError(f"prompt must hold at least one token per row (a BOS token if "
                         f"nothing else), got shape {prompt.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    temperature = _check_temperature(temperature)
    if getattr(model, "embed", None) is None:
        raise ValueError("generate needs a token model (a Decoder without input_dim)")
    check_ids(prompt, model.cfg.vocab_size, "prompt token ids", "vocab_size")
    if hasattr(model, "check_positions"):
        model.check_positions(p + max_new_tokens,
                              f"prompt length {p} + max_new_tokens {max_new_tokens}")
    max_len = p + max_new_tokens if max_len is None else max_len
    if policy.kind not in ("streaming", "h2o", "l2norm") and max_len < p + max_new_tokens:
        raise ValueError(f"max_len={max_len} < prompt length {p} + max_new_tokens "
                         f"{max_new_tokens}")
    cache = model.init_cache(b, max_len, policy)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompt.astype(jnp.int32), cache, max_new_tokens,
                     temperature, policy, rng)
