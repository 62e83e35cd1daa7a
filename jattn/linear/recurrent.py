"""Token-by-token (decoding) form: single-step functions and their scan over a sequence.

The step functions take one token per batch/head (``q_t [B, H, K]``, no time axis) and the
recurrent state, and return ``(o_t, new_state)``; the state is fp32 whatever the input dtype
and ``o_t`` has the inputs' dtype. ``state=None`` means a zero state (the first token).
``implementation="recurrent"`` of the sequence functions is a ``lax.scan`` of these steps,
so the decoding path is exactly what the tests check against the reference.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn.linear import _checks
from jattn.linear.feature_maps import resolve_feature_map

L2NORM_EPS = 1e-6


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, in fp32 (returns fp32)."""
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class LinearAttentionState(NamedTuple):
    """State of (normalized) linear attention: ``kv = sum phi(k)^T v [B, H, F, V]`` and the
    normalizer ``z = sum phi(k) [B, H, F]``, both fp32."""

    kv: jax.Array
    z: jax.Array


# --- update rules shared by the step functions and the recurrent scans (fp32, no checks) ---


def _gla_update(S, q_t, k_t, v_t, g_t, scale):
    decay = jnp.exp(g_t if g_t.ndim == 3 else g_t[..., None])[..., None]
    S = decay * S + k_t[..., :, None] * v_t[..., None, :]
    return scale * jnp.einsum("bhk,bhkv->bhv", q_t, S), S


def _delta_update(S, q_t, k_t, v_t, b_t, g_t, scale):
    if g_t is not None:
        S = jnp.exp(g_t if g_t.ndim == 3 else g_t[..., None])[..., None] * S
    v_new = b_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S))
    S = S + k_t[..., :, None] * v_new[..., None, :]
    return scale * jnp.einsum("bhk,bhkv->bhv", q_t, S), S


def _dplr_update(S, q_t, k_t, v_t, a_t, b_t, g_t, scale):
    read = jnp.einsum("bhk,bhkv->bhv", b_t, S)  # b_t S_{t-1}, before the decay
    if g_t is not None:
        S = jnp.exp(g_t if g_t.ndim == 3 else g_t[..., None])[..., None] * S
    S = S + a_t[..., :, None] * read[..., None, :] + k_t[..., :, None] * v_t[..., None, :]
    return scale * jnp.einsum("bhk,bhkv->bhv", q_t, S), S


def _linear_update(state, fq, fk, v_t, normalize, scale):
    kv = state.kv + fk[..., :, None] * v_t[..., None, :]
    z = state.z + fk
    num = jnp.einsum("bhf,bhfv->bhv", fq, kv)
    if normalize:
        den = jnp.einsum("bhf,bhf->bh", fq, z)
        o = num / jnp.where(den == 0, 1.0, den)[..., None]
    else:
        o = scale * num
    return o, LinearAttentionState(kv, z)


# --- validation of one-token inputs ---


def _check_token(q_t, k_t, v_t, state):
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.check_float(name, x)
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape [B, H, D] (one token), got {x.shape}")
    B, H, K = q_t.shape
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t must have the shape of q_t [B, H, K] = {q_t.shape}, got {k_t.shape}")
    if v_t.shape[:2] != (B, H):
        raise ValueError(f"v_t must have shape [B, H, V] with B, H = {(B, H)}, got {v_t.shape}")
    V = v_t.shape[-1]
    _checks.check_state("state", state, B, H, K, V)
    return B, H, K, V


def _check_token_gate(name, g_t, B, H, K):
    _checks.check_float(name, g_t)
    if g_t.shape not in ((B, H), (B, H, K)):
        raise ValueError(
            f"{name} must have shape [B, H] = {(B, H)} or [B, H, K] = {(B, H, K)}, got {g_t.shape}"
        )
    _checks.check_log_decay_values(name, g_t)


def _f32(*xs):
    return tuple(None if x is None else x.astype(jnp.float32) for x in xs)


# --- public step functions ---


def gla_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    g_t: jax.Array,
    state: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of gated linear attention (see :func:`jattn.linear.gla`).

    ``S = exp(g_t)[:, None] * S + k_t^T v_t``; ``o_t = scale * q_t S``.

    Args:
      q_t, k_t: ``[B, H, K]``; v_t: ``[B, H, V]``; g_t: log-decay ``[B, H]`` or ``[B, H, K]``
        (<= 0, -inf resets; a concrete entry > 0 or NaN raises ``ValueError``).
      state: ``[B, H, K, V]`` (fp32) or None (zeros). scale: default ``1/sqrt(K)``.

    Returns:
      ``(o_t [B, H, V], state [B, H, K, V] fp32)``.
    """
    B, H, K, V = _check_token(q_t, k_t, v_t, state)
    _check_token_gate("g_t", g_t, B, H, K)
    dtype = _checks.out_dtype(q_t, k_t, v_t)
    S = jnp.zeros((B, H, K, V), jnp.float32) if state is None else state.astype(jnp.float32)
    o, S = _gla_update(S, *_f32(q_t, k_t, v_t, g_t), _checks.default_scale(scale, K))
    return o.astype(dtype), S


def delta_rule_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    beta_t: jax.Array,
    state: jax.Array | None = None,
    *,
    g_t: jax.Array | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of the (gated) delta rule (see :func:`jattn.linear.delta_rule`).

    ``S' = exp(g_t) S``; ``S = S' + beta_t k_t^T (v_t - k_t S')``; ``o_t = scale * q_t S``.

    Args:
      q_t, k_t: ``[B, H, K]``; v_t: ``[B, H, V]``; beta_t: ``[B, H]``; concrete inputs with
        ``beta_t |k_t|^2`` outside ``[0, 2]`` (unstable) warn, as in ``delta_rule``.
      state: ``[B, H, K, V]`` or None. g_t: None, ``[B, H]`` or ``[B, H, K]`` log-decay
        (<= 0; a concrete entry > 0 or NaN raises ``ValueError``).
      use_qk_l2norm: L2-normalize ``q_t`` and ``k_t`` first.

    Returns:
      ``(o_t [B, H, V], state [B, H, K, V] fp32)``.
    """
    B, H, K, V = _check_token(q_t, k_t, v_t, state)
    _checks.check_float("beta_t", beta_t)
    if beta_t.shape != (B, H):
        raise ValueError(f"beta_t must have shape [B, H] = {(B, H)}, got {beta_t.shape}")
    if g_t is not None:
        _check_token_gate("g_t", g_t, B, H, K)
    _checks.warn_if_unstable(k_t, beta_t, L2NORM_EPS if use_qk_l2norm else None)
    dtype = _checks.out_dtype(q_t, k_t, v_t)
    q32, k32, v32, b32, g32 = _f32(q_t, k_t, v_t, beta_t, g_t)
    if use_qk_l2norm:
        q32, k32 = l2norm(q32), l2norm(k32)
    S = jnp.zeros((B, H, K, V), jnp.float32) if state is None else state.astype(jnp.float32)
    o, S = _delta_update(S, q32, k32, v32, b32, g32, _checks.default_scale(scale, K))
    return o.astype(dtype), S


def dplr_delta_rule_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    a_t: jax.Array,
    b_t: jax.Array,
    state: jax.Array | None = None,
    *,
    g_t: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of the diagonal-plus-low-rank delta rule
    (see :func:`jattn.linear.dplr_delta_rule`).

    ``S = (diag(exp g_t) + a_t^T b_t) S + k_t^T v_t``; ``o_t = scale * q_t S``.

    Args:
      q_t, k_t, a_t, b_t: ``[B, H, K]``; v_t: ``[B, H, V]``.
      state: ``[B, H, K, V]`` or None. g_t: None, ``[B, H]`` or ``[B, H, K]`` log-decay
        (<= 0; a concrete entry > 0 or NaN raises ``ValueError``).

    Returns:
      ``(o_t [B, H, V], state [B, H, K, V] fp32)``.
    """
    B, H, K, V = _check_token(q_t, k_t, v_t, state)
    for name, x in (("a_t", a_t), ("b_t", b_t)):
        _checks.check_float(name, x)
        if x.shape != (B, H, K):
            raise ValueError(f"{name} must have shape [B, H, K] = {(B, H, K)}, got {x.shape}")
    if g_t is not None:
        _check_token_gate("g_t", g_t, B, H, K)
    dtype = _checks.out_dtype(q_t, k_t, v_t, a_t, b_t)
    S = jnp.zeros((B, H, K, V), jnp.float32) if state is None else state.astype(jnp.float32)
    o, S = _dplr_update(S, *_f32(q_t, k_t, v_t, a_t, b_t, g_t), _checks.default_scale(scale, K))
    return o.astype(dtype), S


def linear_attention_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    state: LinearAttentionState | tuple | None = None,
    *,
    feature_map: Any = "elu1",
    feature_map_params: Any = None,
    normalize: bool = True,
    scale: float | None = None,
) -> tuple[jax.Array, LinearAttentionState]:
    """One decoding step of causal linear attention (see :func:`jattn.linear.linear_attention`).

    ``kv += phi(k_t)^T v_t``, ``z += phi(k_t)``; ``o_t = phi(q_t) kv / (phi(q_t) . z)``
    (``scale * phi(q_t) kv`` if not normalize).

    Args:
      q_t, k_t: ``[B, H, D]``; v_t: ``[B, H, V]``.
      state: :class:`LinearAttentionState` ``(kv [B, H, F, V], z [B, H, F])`` or None.

    Returns:
      ``(o_t [B, H, V], LinearAttentionState)`` (fp32 state).
    """
    B, H, D, V = _check_token(q_t, k_t, v_t, None)
    phi = resolve_feature_map(feature_map, feature_map_params, D)
    dtype = _checks.out_dtype(q_t, k_t, v_t)
    fq, fk = phi(q_t.astype(jnp.float32)), phi(k_t.astype(jnp.float32))
    F = fk.shape[-1]
    state = check_linear_state("state", state, B, H, F, V)
    o, state = _linear_update(
        state, fq, fk, v_t.astype(jnp.float32), normalize, _checks.default_scale(scale, D)
    )
    return o.astype(dtype), state


def check_linear_state(
    name: str, state: Any, B: int, H: int, F: int, V: int
) -> LinearAttentionState:
    """Validate a linear-attention state (None -> zeros); return it as fp32 NamedTuple."""
    if state is None:
        return LinearAttentionState(
            jnp.zeros((B, H, F, V), jnp.float32), jnp.zeros((B, H, F), jnp.float32)
        )
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(
            f"{name} must be a LinearAttentionState (kv [B, H, F, V], z [B, H, F]) "
            f"= ({(B, H, F, V)}, {(B, H, F)}), got {type(state).__name__}"
        )
    kv, z = state
    _checks.check_state(f"{name}.kv", kv, B, H, F, V)
    _checks.check_float(f"{name}.z", z)
    if z.shape != (B, H, F):
        raise ValueError(f"{name}.z must have shape [B, H, F] = {(B, H, F)}, got {z.shape}")
    return LinearAttentionState(kv.astype(jnp.float32), z.astype(jnp.float32))


# --- sequence forms: scans of the update rules (inputs validated by the caller) ---


def _scan_time(update, carry, *xs, start=None):
    """Scan ``update(carry, *x_t) -> (o_t, carry)`` over time; ``start [B, T]`` bool zeroes
    the carry (every leaf) of the batch rows where a new segment starts."""
    xs = tuple(None if x is None else jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in xs)
    if start is None:
        carry, o = lax.scan(lambda c, x: update(c, *x)[::-1], carry, xs)
        return jnp.moveaxis(o, 0, 1), carry

    def step(c, x):
        x_t, s_t = x
        c = jax.tree.map(
            lambda leaf: jnp.where(s_t.reshape(s_t.shape + (1,) * (leaf.ndim - 1)), 0.0, leaf), c
        )
        return update(c, *x_t)[::-1]

    carry, o = lax.scan(step, carry, (xs, jnp.moveaxis(start, 1, 0)))
    return jnp.moveaxis(o, 0, 1), carry


def gla_recurrent(q, k, v, g, *, scale, initial_state=None, start=None):
    B, T, H, K = q.shape
    S0 = (
        jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    return _scan_time(lambda S, *x: _gla_update(S, *x, scale), S0, q, k, v, g, start=start)


def delta_rule_recurrent(q, k, v, beta, g=None, *, scale, initial_state=None, start=None):
    B, T, H, K = q.shape
    S0 = (
        jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    if g is None:
        return _scan_time(
            lambda S, q_t, k_t, v_t, b_t: _delta_update(S, q_t, k_t, v_t, b_t, None, scale),
            S0,
            q,
            k,
            v,
            beta,
            start=start,
        )
    return _scan_time(
        lambda S, *x: _delta_update(S, *x, scale), S0, q, k, v, beta, g, start=start
    )


def linear_attention_recurrent(fq, fk, v, *, normalize, scale, state, start=None):
    """Causal linear attention on feature-mapped inputs as a scan of the step update."""
    return _scan_time(
        lambda st, *x: _linear_update(st, *x, normalize, scale), state, fq, fk, v, start=start
    )


def dplr_recurrent(q, k, v, a, b, g=None, *, scale, initial_state=None, start=None):
    """:func:`dplr_delta_rule_step`'s update scanned over time."""
    B, T, H, K = q.shape
    S0 = (
        jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    if g is None:
        return _scan_time(
            lambda S, q_t, k_t, v_t, a_t, b_t: _dplr_update(S, q_t, k_t, v_t, a_t, b_t, None,
                                                            scale),
            S0, q, k, v, a, b, start=start,
        )
    return _scan_time(
        lambda S, *x: _dplr_update(S, *x, scale), S0, q, k, v, a, b, g, start=start
    )
