"""Reference implementations: the recurrences written literally as a ``lax.scan`` over time.

Slow (one step per token) and obviously right; fp32 throughout. The oracle for the chunk,
recurrent and Pallas paths. Inputs have already been validated by the public functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _time_major(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """``[B, T, H, ...]`` fp32 -> ``[T, B, H, ...]``."""
    return tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in xs)


def _reset(S: jax.Array, start_t: jax.Array | None) -> jax.Array:
    """Zero the state of the batch rows where a new segment starts (``start_t [B]`` bool)."""
    if start_t is None:
        return S
    return jnp.where(start_t.reshape(start_t.shape + (1,) * (S.ndim - 1)), 0.0, S)


def _starts(start: jax.Array | None, T: int) -> jax.Array:
    """``[T, B]`` per-step restart flags (all False when there are no segments)."""
    return jnp.zeros((T, 1), bool) if start is None else jnp.moveaxis(start, 1, 0)


def _initial_state(q: jax.Array, v: jax.Array, initial_state: jax.Array | None) -> jax.Array:
    """The float32 ``[B, H, K, V]`` state to start from (zeros when none is given)."""
    (B, _, H, K), V = q.shape, v.shape[-1]
    if initial_state is None:
        return jnp.zeros((B, H, K, V), jnp.float32)
    return initial_state.astype(jnp.float32)


def _decay(g_t: jax.Array, K: int) -> jax.Array:
    """``exp(g_t)`` as ``[B, H, K, 1]`` from a scalar ``[B, H]`` or channel ``[B, H, K]`` gate."""
    if g_t.ndim == 2:
        g_t = jnp.broadcast_to(g_t[..., None], g_t.shape + (K,))
    return jnp.exp(g_t)[..., None]


def gla_reference(q, k, v, g, *, scale, initial_state=None, start=None):
    """``S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` (scan).

    ``start [B, T]`` bool (optional, every function here): ``S_{t-1}`` is replaced by 0 where
    a new segment starts."""
    T, K = q.shape[1], q.shape[-1]
    S0 = _initial_state(q, v, initial_state)

    def step(S, xs):
        (q_t, k_t, v_t, g_t), s_t = xs
        S = _decay(g_t, K) * _reset(S, s_t) + k_t[..., :, None] * v_t[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    S, o = lax.scan(step, S0, (_time_major(q, k, v, g), _starts(start, T)))
    return jnp.moveaxis(o, 0, 1), S


def delta_rule_reference(q, k, v, beta, g=None, *, scale, initial_state=None, start=None):
    """``S'_t = exp(g_t) S_{t-1}``; ``S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t)``;
    ``o_t = scale q_t S_t`` (scan)."""
    T, K = q.shape[1], q.shape[-1]
    S0 = _initial_state(q, v, initial_state)
    g = jnp.zeros(q.shape[:3], jnp.float32) if g is None else g

    def step(S, xs):
        (q_t, k_t, v_t, b_t, g_t), s_t = xs
        S_prime = _decay(g_t, K) * _reset(S, s_t)
        v_old = jnp.einsum("bhk,bhkv->bhv", k_t, S_prime)
        S = S_prime + b_t[..., None, None] * k_t[..., :, None] * (v_t - v_old)[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    S, o = lax.scan(step, S0, (_time_major(q, k, v, beta, g), _starts(start, T)))
    return jnp.moveaxis(o, 0, 1), S


def linear_attention_reference(
    fq, fk, v, *, causal, normalize, scale, kv0=None, z0=None, start=None
):
    """Kernelized attention on feature-mapped ``fq, fk [B, T, H, F]``.

    Causal: a scan carrying ``S = sum_j fk_j^T v_j`` and ``z = sum_j fk_j``. Non-causal: the
    materialized ``[T, T]`` kernel matrix ``fq fk^T`` (plus the initial state's contribution).
    ``o_i = fq_i S_i / (fq_i . z_i)`` if normalize else ``scale * fq_i S_i``; a zero
    denominator gives 0. Returns ``(o fp32, (S, z) final)``.
    """
    fq, fk, v = (x.astype(jnp.float32) for x in (fq, fk, v))
    B, T, H, F = fq.shape
    V = v.shape[-1]
    kv0 = jnp.zeros((B, H, F, V), jnp.float32) if kv0 is None else kv0.astype(jnp.float32)
    z0 = jnp.zeros((B, H, F), jnp.float32) if z0 is None else z0.astype(jnp.float32)
    if causal:

        def step(carry, xs):
            (q_t, k_t, v_t), s_t = xs
            S, z = _reset(carry[0], s_t), _reset(carry[1], s_t)
            S = S + k_t[..., :, None] * v_t[..., None, :]
            z = z + k_t
            return (S, z), (jnp.einsum("bhf,bhfv->bhv", q_t, S), jnp.einsum("bhf,bhf->bh", q_t, z))

        (S, z), (num, den) = lax.scan(
            step, (kv0, z0), (_time_major(fq, fk, v), _starts(start, T))
        )
        num, den = jnp.moveaxis(num, 0, 1), jnp.moveaxis(den, 0, 1)
    else:
        if start is not None:
            raise NotImplementedError("segments need causal=True")
        kernel = jnp.einsum("bihf,bjhf->bhij", fq, fk)
        num = jnp.einsum("bhij,bjhv->bihv", kernel, v) + jnp.einsum("bihf,bhfv->bihv", fq, kv0)
        den = kernel.sum(-1).transpose(0, 2, 1) + jnp.einsum("bihf,bhf->bih", fq, z0)
        S = kv0 + jnp.einsum("bjhf,bjhv->bhfv", fk, v)
        z = z0 + fk.sum(1).astype(jnp.float32)
    if normalize:
        o = num / jnp.where(den == 0, 1.0, den)[..., None]
    else:
        o = scale * num
    return o, (S, z)


def dplr_reference(q, k, v, a, b, g=None, *, scale, initial_state=None, start=None):
    """``S_t = (diag(exp g_t) + a_t^T b_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` (scan).

    ``a_t^T b_t`` is the ``[K, K]`` outer product: ``a_t^T (b_t S_{t-1})`` reads the state along
    ``b_t`` and writes the read-out row along ``a_t``. ``g`` None means ``diag(exp g) = I``.
    """
    T, K = q.shape[1], q.shape[-1]
    S0 = _initial_state(q, v, initial_state)
    g = jnp.zeros(q.shape[:3], jnp.float32) if g is None else g

    def step(S, xs):
        (q_t, k_t, v_t, a_t, b_t, g_t), s_t = xs
        S = _reset(S, s_t)
        read = jnp.einsum("bhk,bhkv->bhv", b_t, S)
        S = _decay(g_t, K) * S + a_t[..., :, None] * read[..., None, :]
        S = S + k_t[..., :, None] * v_t[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S)

    S, o = lax.scan(step, S0, (_time_major(q, k, v, a, b, g), _starts(start, T)))
    return jnp.moveaxis(o, 0, 1), S
