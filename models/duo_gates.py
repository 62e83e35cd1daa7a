"""DuoAttention's gate learning (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads", Sec. 3.2): which KV heads need the full cache.

Every (layer ``l``, KV head ``h``) gets a gate ``alpha_lh in [0, 1]``; each of its query heads
outputs

    ``o = alpha * attn_full(q, K, V) + (1 - alpha) * attn_stream(q, K, V)``

with ``attn_stream`` under the "Lambda" mask (``sink_tokens`` sinks + the ``window`` newest keys,
:func:`jattn.masks.a_shape`). The model's weights are frozen; the gates minimize

    ``L = (1/N) sum_n sum_{j in last l positions} ||H_full[n, j] - H_mixed[n, j]||^2
          + lambda sum_{l,h} |alpha_lh|``

(``H``: the final hidden states, after the final norm; ``H_full`` = the model with every
``alpha = 1``) on synthetic long-context data such as passkey retrieval
(:func:`passkey_batches`), with Adam and ``alpha`` clipped to ``[0, 1]`` after each step
(the paper: init 1, AdamW, lr 0.02, lambda 0.05). Thresholding ``alpha`` gives
``CachePolicy("duo", head_gates=...)``: :func:`gates_from_alpha` (a threshold) or
:func:`models.cache_policies.gates_from_scores` (a fraction of full heads, as the paper sets
its sparsity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jattn
from jattn import masks
from models.block import TransformerBlock
from models.cores.softmax import SoftmaxCore

__all__ = ["GateLearning", "learn_duo_gates", "mixed_hidden", "gates_from_alpha",
           "passkey_batches"]


class GateLearning(NamedTuple):
    """``alpha [layers, kv_heads]`` (float64, in [0, 1]); ``losses`` / ``distill [steps]``:
    the total and the distillation loss before each step."""

    alpha: np.ndarray
    losses: np.ndarray
    distill: np.ndarray


def _check_model(model) -> None:
    for i, layer in enumerate(getattr(model, "layers", ())):
        if not isinstance(layer, TransformerBlock) or not isinstance(layer.attn.core,
                                                                     SoftmaxCore):
            raise TypeError(f"learn_duo_gates needs a models.Decoder of softmax-family layers; "
                            f"layer {i} is {type(layer).__name__} with core "
                            f"{type(getattr(getattr(layer, 'attn', None), 'core', None)).__name__}")
    if getattr(model, "embed", None) is None:
        raise TypeError("learn_duo_gates needs a token models.Decoder (not input_dim)")


def _mixed_core(core: SoftmaxCore, inp, alpha: jax.Array, lam: masks.Mask) -> jax.Array:
    """The core's full-sequence output with each KV head's query group mixed
    ``alpha * full + (1 - alpha) * streaming`` (``alpha [kv_heads]``)."""
    q, k = core.rope(inp.q, inp.positions), core.rope(inp.k, inp.positions)
    t = q.shape[1]
    bias = None
    if core.cfg.position == "alibi":
        bias = jattn.position.alibi_bias(core.cfg.num_heads, t, t)[None]
    mod = core.score_mod(inp)
    extra = {} if mod is None else {"score_mod": mod}
    full = core.attend(q, k, inp.v, mask=core.mask, bias=bias, **extra)
    stream_mask = lam if core.mask is None else core.mask & lam
    stream = core.attend(q, k, inp.v, mask=stream_mask, bias=bias, **extra)
    a = jnp.repeat(alpha, core.cfg.num_heads // core.cfg.kv_heads)[None, None, :, None]
    o = a * full.astype(jnp.float32) + (1.0 - a) * stream.astype(jnp.float32)
    return core.finish(inp, o.astype(full.dtype))


def mixed_hidden(model: nnx.Module, tokens: jax.Array, alpha: jax.Array, *, sink_tokens: int,
                 window: int) -> jax.Array:
    """Final hidden states ``[B, T, D]`` (after the final norm) of a :class:`models.Decoder`
    whose heads mix full and streaming attention by ``alpha [layers, kv_heads]``;
    ``alpha = 1`` is the model itself (its logits are ``model._logits`` of these without the
    norm)."""
    t = tokens.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)
    lam = masks.a_shape(sink_tokens, window)
    h = model._embed(tokens, positions)
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        o = _mixed_core(attn.core, attn._inputs(layer.attn_norm(h), positions), alpha[i], lam)
        h = h + attn.o_proj(o).astype(h.dtype)
        if layer.mlp is not None:
            h = h + layer.mlp(layer.mlp_norm(h)).astype(h.dtype)
    return h if model.final_norm is None else model.final_norm(h)


def learn_duo_gates(model: nnx.Module, batches: Sequence[Any], steps: int, *,
                    sink_tokens: int = 4, window: int = 64, l1: float = 0.05,
                    learning_rate: float = 0.02, init: float = 1.0,
                    last_tokens: int | None = None) -> GateLearning:
    """Learn DuoAttention gates ``alpha [layers, kv_heads]`` for a frozen :class:`models.Decoder`
    (module docstring). ``batches``: token arrays ``[B, T]`` (cycled over ``steps``);
    ``last_tokens``: distill over the last ``l`` positions (None: all); ``init``: the initial
    gate value (the paper's 1, where the distillation loss starts at 0)."""
    _check_model(model)
    batches = [jnp.asarray(b, jnp.int32) for b in batches]
    if not batches or any(b.ndim != 2 for b in batches):
        raise ValueError("batches must be a non-empty sequence of int token arrays [B, T]")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 <= init <= 1.0:
        raise ValueError(f"init must be in [0, 1], got {init!r}")
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1!r}")
    if last_tokens is not None and (not isinstance(last_tokens, int) or last_tokens < 1):
        raise ValueError(f"last_tokens must be a positive int or None, got {last_tokens!r}")
    shape = (len(model.layers), model.layers[0].attn.cfg.kv_heads)
    graphdef, state = nnx.split(model)
    frozen = jax.lax.stop_gradient
    hidden = lambda s, x, a: mixed_hidden(nnx.merge(graphdef, s), x, a,  # noqa: E731
                                          sink_tokens=sink_tokens, window=window)

    def losses(alpha, state, tokens):
        target = frozen(hidden(state, tokens, jnp.ones(shape, jnp.float32)))
        got = hidden(state, tokens, alpha)
        n = tokens.shape[1] if last_tokens is None else min(last_tokens, tokens.shape[1])
        diff = (got - target).astype(jnp.float32)[:, -n:]
        distill = jnp.sum(jnp.square(diff)) / tokens.shape[0]
        return distill + l1 * jnp.sum(jnp.abs(alpha)), distill

    opt = optax.adam(learning_rate)

    @jax.jit
    def step(alpha, opt_state, state, tokens):
        (loss, distill), grad = jax.value_and_grad(losses, has_aux=True)(
            alpha, frozen(state), tokens)
        updates, opt_state = opt.update(grad, opt_state, alpha)
        alpha = jnp.clip(optax.apply_updates(alpha, updates), 0.0, 1.0)
        return alpha, opt_state, loss, distill

    alpha = jnp.full(shape, init, jnp.float32)
    opt_state = opt.init(alpha)
    total, dist = [], []
    for i in range(steps):
        alpha, opt_state, loss, distill = step(alpha, opt_state, state,
                                               batches[i % len(batches)])
        total.append(float(loss))
        dist.append(float(distill))
    return GateLearning(np.asarray(alpha, np.float64), np.asarray(total), np.asarray(dist))


def gates_from_alpha(alpha: Any, threshold: float = 0.5) -> tuple[tuple[bool, ...], ...]:
    """``head_gates`` ``[layers][kv_heads]``: True (full cache) where ``alpha > threshold``."""
    a = np.asarray(alpha, np.float64)
    if a.ndim != 2 or a.size == 0 or not np.all((a >= 0) & (a <= 1)):
        raise ValueError(f"alpha must be a non-empty [layers, kv_heads] array in [0, 1], got "
                         f"shape {a.shape}")
    return tuple(tuple(bool(x > threshold) for x in row) for row in a)


def passkey_batches(key: jax.Array, num_batches: int, batch: int, seq_len: int,
                    vocab_size: int, *, passkey_len: int = 4) -> list[jax.Array]:
    """Synthetic passkey retrieval, ``num_batches`` int arrays ``[batch, seq_len]``: random
    filler tokens in ``[3, vocab_size)``, at a random depth the marker 1 then a random passkey
    of ``passkey_len`` tokens, and at the end the marker 2 then the passkey again (its
    retrieval: distill over ``last_tokens = passkey_len + 1``)."""
    n = passkey_len
    if vocab_size < 4 or seq_len < 2 * n + 4:
        raise ValueError(f"need vocab_size >= 4 and seq_len >= 2 * passkey_len + 4, got "
                         f"vocab_size={vocab_size}, seq_len={seq_len}")
    out = []
    for k in jax.random.split(key, num_batches):
        kf, kp, kd = jax.random.split(k, 3)
        tok = jax.random.randint(kf, (batch, seq_len), 3, vocab_size)
        pk = jax.random.randint(kp, (batch, n), 3, vocab_size)
        depth = jax.random.randint(kd, (batch,), 0, seq_len - 2 * n - 2)
        col = jnp.arange(seq_len)[None]
        rel = col - depth[:, None]
        tok = jnp.where(rel == 0, 1, tok)
        at = jnp.take_along_axis(pk, jnp.clip(rel - 1, 0, n - 1), axis=1)
        tok = jnp.where((rel >= 1) & (rel <= n), at, tok)
        tok = tok.at[:, seq_len - n - 1].set(2).at[:, seq_len - n:].set(pk)
        out.append(tok.astype(jnp.int32))
    return out
