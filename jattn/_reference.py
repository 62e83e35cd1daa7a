"""The oracle: materialized fp32 scores, every feature spelled out. Slow and obviously right."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn._common import Spec, merge_heads, score_mod_fn, scores, split_heads, visible
from jattn.normalizers import SOFTPICK_EPS


def weights(spec: Spec, q, k, bias, sinks, dense_mask, seg_q, seg_k):
    """Weights ``p [B, Hkv, G, Tq, Tk]`` and the row statistic (lse / count / zeros).

    ``spec.score_mod`` is the user's function, applied to the whole score matrix: plain autodiff
    differentiates the arrays it closes over.
    """
    norm = spec.normalizer
    q32 = q.astype(jnp.float32).reshape(q.shape[:2] + (spec.num_kv_heads, spec.group,
                                                       q.shape[-1]))
    q_idx = jnp.arange(spec.q_len, dtype=jnp.int32)
    k_idx = jnp.arange(spec.kv_len, dtype=jnp.int32)
    mod = score_mod_fn(spec, q.shape[0], q_idx, k_idx)
    _, s = scores(spec, q32, k.astype(jnp.float32), bias,
                  None if mod is None else (lambda s0: mod(s0, ())))
    vis = jnp.broadcast_to(visible(spec, q_idx, k_idx, dense_mask, seg_q, seg_k), s.shape)
    if norm.softmax:
        masked = jnp.where(vis, s, -jnp.inf)
        m = jnp.max(masked, axis=-1, initial=-jnp.inf)  # Tk = 0: no key, m = -inf
        if sinks is not None:
            sink = split_heads(sinks.astype(jnp.float32)[None, :, None], spec.num_kv_heads,
                               spec.group)[..., 0][..., None]  # [1, Hkv, G, 1]
            m = jnp.maximum(m, sink)
        m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
        # exp of a masked entry is never formed, so its gradient cannot be inf * 0.
        e = jnp.where(vis, jnp.exp(jnp.where(vis, s, m[..., None]) - m[..., None]), 0.0)
        z = jnp.sum(e, axis=-1)
        if sinks is not None:
            z = z + jnp.exp(sink - m)
        p = e / jnp.where(z > 0, z, 1.0)[..., None]
        lse = jnp.where(z > 0, m + jnp.log(jnp.where(z > 0, z, 1.0)), -jnp.inf)
        return p, lse
    if norm.rowwise == "softpick":
        return _softpick(s, vis), jnp.zeros(s.shape[:-1], jnp.float32)
    if norm.rowwise == "stick_breaking":
        return _stick_breaking(s, vis), jnp.zeros(s.shape[:-1], jnp.float32)
    p = jnp.where(vis, norm.fn(jnp.where(vis, s, 0.0)), 0.0)
    if norm.divide_by_count:
        count = jnp.sum(vis, axis=-1).astype(jnp.float32)
        p = p / jnp.maximum(count, 1.0)[..., None]
        return p, count
    return p, jnp.zeros(p.shape[:-1], jnp.float32)


def _softpick(s, vis):
    """``relu(e^s - 1) / (sum_visible |e^s - 1| + eps)``, scaled by ``e^{-m}``, ``m >= 0``."""
    m = jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1, initial=-jnp.inf)
    m = jax.lax.stop_gradient(jnp.maximum(m, 0.0))
    m = m[..., None]
    diff = jnp.where(vis, jnp.exp(jnp.where(vis, s, m) - m) - jnp.exp(-m), 0.0)
    z = jnp.sum(jnp.abs(diff), axis=-1, keepdims=True) + SOFTPICK_EPS * jnp.exp(-m)
    return jax.nn.relu(diff) / z


def _stick_breaking(s, vis):
    """``p_ij = sigmoid(s_ij) prod_{k > j visible} (1 - sigmoid(s_ik))``, in log space."""
    s = jnp.where(vis, s, 0.0)
    log_keep = jnp.where(vis, jax.nn.log_sigmoid(-s), 0.0)
    after = jnp.sum(log_keep, axis=-1, keepdims=True) - jnp.cumsum(log_keep, axis=-1)
    return jnp.where(vis, jnp.exp(jax.nn.log_sigmoid(s) + after), 0.0)


def attention(spec: Spec, q, k, v, bias, sinks, dense_mask, seg_q, seg_k):
    """Output ``[B, Tq, Hq, Dv]`` (fp32) and row statistic ``[B, Hq, Tq]``."""
    p, stat = weights(spec, q, k, bias, sinks, dense_mask, seg_q, seg_k)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    out = out.reshape(out.shape[:2] + (spec.num_kv_heads * spec.group, out.shape[-1]))
    return out, merge_heads(stat)
