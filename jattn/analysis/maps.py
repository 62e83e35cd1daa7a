"""Attention-map statistics: per-query entropy and mean distance (ViT, Dosovitskiy et al.
2021) and attention rollout (Abnar & Zuidema 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jattn.analysis._validate import _weights


def attention_entropy(weights) -> jax.Array:
    r"""Entropy of each query's attention distribution (nats).

    ``H_i = - sum_j p_ij log p_ij`` with ``0 log 0 = 0``. Uniform causal attention over
    ``i + 1`` visible keys gives ``log(i + 1)``; a one-hot row gives 0.

    Args:
      weights: ``[..., Tq, Tk]`` (any leading axes, e.g. ``[B, H, Tq, Tk]``).

    Returns:
      ``[..., Tq]``; average it over the axes you need.
    """
    p = jnp.asarray(weights, jnp.float32)
    if p.ndim < 2:
        raise ValueError(f"weights must have shape [..., Tq, Tk], got {p.shape}")
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return -jnp.sum(plogp, axis=-1)


def mean_attention_distance(
    weights, grid_shape: Sequence[int] | None = None, num_prefix_tokens: int = 0
) -> jax.Array:
    r"""Mean attention distance per query: ``D_i = sum_j p_ij dist(i, j)``.

    ViT (Dosovitskiy et al. 2021, App. D.7): the attention-weighted average distance
    between the query and the keys it attends to.

    - ``grid_shape=None``: 1-D token index distance ``|i' - j|`` with the query at the
      end-aligned position ``i' = i + Tk - Tq`` (so ``Tq = Tk`` means ``i' = i``).
    - ``grid_shape=(h, w)`` (or any rank): tokens after ``num_prefix_tokens`` (e.g. a CLS
      token) are a row-major grid; ``dist`` is the Euclidean distance between grid
      coordinates, in patch units (multiply by the patch size for pixels). Prefix queries
      and keys are dropped and each grid query row is renormalized over grid keys (so
      attention to CLS does not count as distance 0).

    Args:
      weights: ``[..., Tq, Tk]``.

    Returns:
      ``[..., Tq]`` (1-D) or ``[..., prod(grid_shape)]`` (grid).
    """
    p = jnp.asarray(weights, jnp.float32)
    if p.ndim < 2:
        raise ValueError(f"weights must have shape [..., Tq, Tk], got {p.shape}")
    tq, tk = p.shape[-2:]
    if grid_shape is None:
        if num_prefix_tokens:
            raise ValueError("num_prefix_tokens applies only with grid_shape")
        qi = jnp.arange(tq) + (tk - tq)
        dist = jnp.abs(qi[:, None] - jnp.arange(tk)[None, :]).astype(jnp.float32)
        return jnp.sum(p * dist, axis=-1)
    n = math.prod(grid_shape)
    pre = int(num_prefix_tokens)
    if tq != tk or tk != pre + n:
        raise ValueError(
            f"weights must have shape [..., T, T] with T = num_prefix_tokens + prod(grid_shape)"
            f" = {pre + n}, got {p.shape}"
        )
    p = p[..., pre:, pre:]
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    coords = jnp.stack(jnp.unravel_index(jnp.arange(n), tuple(grid_shape)), axis=-1)
    diff = (coords[:, None, :] - coords[None, :, :]).astype(jnp.float32)
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    return jnp.sum(p * dist, axis=-1)


def attention_rollout(weights_per_layer, residual: bool = True) -> jax.Array:
    r"""Attention rollout (Abnar & Zuidema 2020).

    Per layer ``l``: ``A_l = mean_h W_l`` (heads averaged); with ``residual``,
    ``A_l <- (A_l + I) / 2`` (the residual connection), rows renormalized to sum to one.
    Rollout ``R = A_L A_{L-1} ... A_1``: ``R[i, j]`` is how much output token ``i`` of the
    last layer draws from input token ``j``.

    Args:
      weights_per_layer: ``[L, B, H, T, T]`` or a sequence of ``L`` arrays ``[B, H, T, T]``
        (first layer first).
      residual: add the identity (default, as in the paper).

    Returns:
      ``[B, T, T]``. Identity attention (or any input with ``residual`` and identity
      weights) rolls out to the identity.
    """
    if isinstance(weights_per_layer, list | tuple):
        weights_per_layer = jnp.stack([jnp.asarray(w) for w in weights_per_layer])
    w = _weights(weights_per_layer, "weights_per_layer")
    if w.ndim == 4:
        w = w[None]
    t = w.shape[-1]
    if w.shape[-2] != t:
        raise ValueError(f"weights_per_layer must be square [.., T, T], got {w.shape}")
    a = jnp.mean(w, axis=2)  # [L, B, T, T]
    if residual:
        a = 0.5 * (a + jnp.eye(t, dtype=a.dtype))
    a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-30)

    def step(r, a_l):
        return a_l @ r, None

    init = jnp.broadcast_to(jnp.eye(t, dtype=a.dtype), a.shape[1:])
    r, _ = jax.lax.scan(step, init, a)
    return r
