"""Outlier tokens: attention sinks (Gu et al. 2024), value-norm drain (Guo et al. 2024)
and massive activations (Sun et al. 2024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.analysis._validate import _weights


def sink_importance(weights, k: int = 0, normalize: bool = False) -> jax.Array:
    r"""Attention importance of key ``k`` per head: ``alpha_k = mean_{i >= k} p_{i,k}``.

    Gu et al. 2024 (Sec. 3): ``alpha_k^{l,h} = 1/(T - k) * sum_{i=k}^{T-1} p^{l,h}_{i,k}``
    (0-indexed rows ``i`` from ``k`` to ``T-1``: the queries that can see key ``k`` under
    a causal mask). The weights are first averaged over the batch (the mean attention map
    over sequences), then averaged over the rows.

    Args:
      weights: ``[B, H, T, T]`` or ``[L, B, H, T, T]`` (square: self-attention).
      k: the key (token) index, ``0 <= k < T``.
      normalize: first divide each row by its sum, ``p / (sum_j p_ij + 1e-8)``, as Gu et al.'s
        evaluation code does for attention without normalization (sigmoid, elu + 1): their
        reported Sink of ~0.4% for sigmoid attention is on row-normalized weights. Raw sigmoid
        weights are ~0.5 everywhere at init, so every head would clear ``eps = 0.3``.

    Returns:
      ``[H]`` or ``[L, H]``.
    """
    w = _weights(weights)
    if normalize:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-8)
    t = w.shape[-1]
    if w.shape[-2] != t:
        raise ValueError(f"weights must be square self-attention [.., T, T], got {w.shape}")
    if not (isinstance(k, int) and 0 <= k < t):
        raise ValueError(f"k must be an int in [0, T={t}), got {k!r}")
    p = jnp.mean(w, axis=-4)  # average over the batch: [.., H, T, T]
    return jnp.mean(p[..., k:, k], axis=-1)


def sink_score(weights, k: int = 0, eps: float = 0.3, normalize: bool = False) -> jax.Array:
    r"""Gu et al.'s attention-sink metric ``Sink_k^eps`` in percent.

    ``Sink_k^eps = 100 / (L H) * sum_{l, h} 1[alpha_k^{l,h} > eps]`` with ``alpha_k`` from
    :func:`sink_importance` (batch averaged first, then rows ``i >= k``). Gu et al. use
    ``k = 0`` (the first token) and ``eps = 0.3``.

    Args:
      weights: ``[B, H, T, T]`` (one layer: the percentage of heads) or
        ``[L, B, H, T, T]`` (the percentage of (layer, head) pairs).
      k: key index. eps: threshold on ``alpha_k``. normalize: row-normalize the weights first
        (Gu et al.'s evaluation of unnormalized attention; see :func:`sink_importance`).

    Returns:
      A scalar in ``[0, 100]``.

    Example: weights with all mass on token 0 (``p[..., i, 0] = 1``) score 100; uniform
    causal weights on ``T`` tokens have ``alpha_0 = H_T / T`` (``H_T`` the harmonic
    number), e.g. ``0.61 > 0.3`` at ``T = 3`` (score 100), ``0.21 < 0.3`` at ``T = 16``
    (score 0).
    """
    alpha = sink_importance(weights, k, normalize)
    return 100.0 * jnp.mean((alpha > eps).astype(jnp.float32))


def token_norm_ratio(norms, k: int = 0) -> jax.Array:
    r"""``||x_k|| / mean_{j != k} ||x_j||``: how much token ``k``'s norm stands out.

    Guo et al. 2024 measure value-state drains (small ``||V_<s>||``: ratio << 1) and
    residual-state peaks (large ``||Res_<s>||``: ratio >> 1) at the sink token.

    Args:
      norms: per-token norms ``[..., T]`` (e.g. ``value_norms [B, T, H]`` moved to
        ``[B, H, T]``, or ``residual_norms [B, T]``); averaged over all leading axes.
      k: token index.
    """
    n = jnp.asarray(norms, jnp.float32)
    t = n.shape[-1]
    if n.ndim < 1 or t < 2:
        raise ValueError(f"norms must have shape [..., T] with T >= 2, got {n.shape}")
    n = n.reshape(-1, t).mean(axis=0)
    others = (jnp.sum(n) - n[k]) / (t - 1)
    return n[k] / others


def massive_activations(
    hidden_states, min_magnitude: float = 100.0, min_ratio: float = 1000.0
) -> dict[str, jax.Array]:
    r"""Massive-activation detection per layer (Sun et al. 2024).

    Sun et al. call an activation massive when its magnitude exceeds 100 and is about
    1000x the median magnitude of the layer's hidden state. Per layer ``l``:
    ``top_l = max |h_l|``, ``median_l = median |h_l|`` (over batch, tokens, channels),
    ``ratio_l = top_l / median_l``, ``flag_l = top_l > min_magnitude and
    ratio_l > min_ratio``. Lower both thresholds for small models.

    Args:
      hidden_states: ``[L, B, T, D]`` or a sequence of ``[B, T, D]`` (residual stream
        after each layer).

    Returns:
      dict with ``top``, ``median``, ``ratio`` (float ``[L]``), ``flag`` (bool ``[L]``),
      ``token`` and ``channel`` (int ``[L]``: where the top activation is; with several
      sequences, the token index within its sequence).
    """
    if isinstance(hidden_states, list | tuple):
        hidden_states = jnp.stack([jnp.asarray(h) for h in hidden_states])
    h = jnp.asarray(hidden_states, jnp.float32)
    if h.ndim != 4:
        raise ValueError(f"hidden_states must have shape [L, B, T, D], got {h.shape}")
    n_layers, _, t, d = h.shape
    a = jnp.abs(h).reshape(n_layers, -1)
    top = jnp.max(a, axis=-1)
    median = jnp.median(a, axis=-1)
    ratio = top / jnp.maximum(median, 1e-30)
    arg = jnp.argmax(a, axis=-1)
    return {
        "top": top,
        "median": median,
        "ratio": ratio,
        "flag": (top > min_magnitude) & (ratio > min_ratio),
        "token": (arg // d) % t,
        "channel": arg % d,
    }
