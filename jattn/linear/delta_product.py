"""DeltaProduct: several delta-rule (Householder) steps per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.linear import _checks
from jattn.linear.delta import delta_rule


def _interleave_first(x: jax.Array, n: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, T * n, ...]`` with ``x_t`` at step ``t n`` and 0 elsewhere."""
    B, T = x.shape[:2]
    pad = jnp.zeros((B, T, n - 1) + x.shape[2:], x.dtype)
    return jnp.concatenate([x[:, :, None], pad], axis=2).reshape((B, T * n) + x.shape[2:])


def _interleave_last(x: jax.Array, n: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, T * n, ...]`` with ``x_t`` at step ``t n + n - 1``, 0 elsewhere."""
    B, T = x.shape[:2]
    pad = jnp.zeros((B, T, n - 1) + x.shape[2:], x.dtype)
    return jnp.concatenate([pad, x[:, :, None]], axis=2).reshape((B, T * n) + x.shape[2:])


def delta_product(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    num_householder: int,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """DeltaProduct (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs
    via Householder Products"): ``n_h = num_householder`` delta-rule steps per token.

    For token ``t`` with keys / values / rates ``k_{t,j}, v_{t,j}, beta_{t,j}``, ``j < n_h``:

        S <- exp(g_t) S_{t-1};   for j in 0..n_h-1:  S <- (I - beta_{t,j} k_{t,j}^T k_{t,j}) S
                                                          + beta_{t,j} k_{t,j}^T v_{t,j}
        S_t = S;   o_t = scale * q_t S_t

    so the token's transition is a product of ``n_h`` generalized Householder matrices (rank
    ``n_h``) instead of DeltaNet's one. This is exactly :func:`jattn.linear.delta_rule` on the
    interleaved sequence of ``T n_h`` steps with the decay on each token's first step and the
    query on its last (zero queries elsewhere); the outputs are read after each token's last
    step. Every implementation of ``delta_rule`` serves it (the chunk form and the Pallas delta
    kernel on the interleaved sequence; Gated DeltaProduct with ``g``).

    Layout (as flash-linear-attention's ``delta_product``): ``k, v, beta`` are interleaved along
    time, ``k[:, t * n_h + j]`` is token ``t``'s ``j``-th key.

    Args:
      q: ``[B, T, H, K]``; k: ``[B, T * n_h, H, K]``; v: ``[B, T * n_h, H, V]``;
        beta: ``[B, T * n_h, H]`` (keep ``beta |k|^2`` in ``[0, 2]``; see ``delta_rule``).
      num_householder: ``n_h >= 1`` (1 is DeltaNet).
      g: None, ``[B, T, H]`` or ``[B, T, H, K]``: one log-decay per token.
      scale: default ``1 / sqrt(K)``. initial_state: ``[B, H, K, V]`` or None.
      use_qk_l2norm: L2-normalize ``q`` and every ``k_{t,j}``.
      segment_ids: None or int ``[B, T]`` (per token): packed sequences, as in ``delta_rule``.
      output_final_state, chunk_size, implementation: as in ``delta_rule`` (``chunk_size``
        counts interleaved steps).

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] fp32 or None)``.
    """
    n = num_householder
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_householder must be a positive int, got {n!r}")
    _checks.check_float("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got shape {q.shape}")
    B, T, H, K = q.shape
    if k.shape != (B, T * n, H, K):
        raise ValueError(
            f"k must have shape [B, T * num_householder, H, K] = {(B, T * n, H, K)}, got {k.shape}"
        )
    if getattr(v, "ndim", 0) != 4 or v.shape[:3] != (B, T * n, H):
        raise ValueError(
            f"v must have shape [B, T * num_householder, H, V] = {(B, T * n, H, 'V')}, "
            f"got {getattr(v, 'shape', None)}"
        )
    if g is not None:
        _checks.check_gate("g", g, B, T, H, K)
    _checks.check_segment_ids(segment_ids, B, T)
    scale = float(_checks.default_scale(scale, K))
    q_steps = _interleave_last(q, n)
    g_steps = None if g is None else _interleave_first(g, n)
    seg_steps = None if segment_ids is None else jnp.repeat(segment_ids, n, axis=1)
    o, S = delta_rule(
        q_steps, k, v, beta, g=g_steps, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
        chunk_size=chunk_size, implementation=implementation, segment_ids=seg_steps)
    return o[:, n - 1 :: n], S
