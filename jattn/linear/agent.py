"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024).

``n`` agent tokens ``A [n, K]`` per batch and head (by default the queries average-pooled over
time, as the paper pools the query map) mediate between queries and keys with two softmax
attentions:

    V_A = softmax(scale A K^T + B_1) V        agent aggregation   (weights [n, Tk])
    O   = softmax(scale Q A^T + B_2) V_A      agent broadcast     (weights [Tq, n])

so ``O = P V`` with the rank-``n`` attention matrix ``P = softmax(Q A^T) softmax(A K^T)``: each
row of ``P`` is a distribution over keys, at cost ``O((Tq + Tk) n)`` instead of ``O(Tq Tk)``.
``B_1 [n, Tk]`` and ``B_2 [Tq, n]`` are the paper's agent biases (position biases, learned by
the model). The paper adds a depthwise convolution of ``V`` to ``O`` (its "DWC" term); that has
parameters and lives in the model core (:mod:`models.cores.agent_flow`).

Non-causal only: the paper defines no causal form (each agent pools queries from the whole
sequence, so every output depends on every token).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.linear import _checks

__all__ = ["agent_attention", "pool_agents"]


def _pool_matrix(t: int, n: int) -> np.ndarray:
    """``[n, t]`` row-stochastic averaging matrix of adaptive average pooling (bin ``i`` covers
    tokens ``floor(i t / n) .. ceil((i + 1) t / n) - 1``, as ``torch.nn.AdaptiveAvgPool1d``)."""
    m = np.zeros((n, t), np.float32)
    for i in range(n):
        lo, hi = (i * t) // n, -((-(i + 1) * t) // n)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def pool_agents(q: jax.Array, num_agents: int) -> jax.Array:
    """Agent tokens ``[B, n, H, K]``: ``q [B, T, H, K]`` average-pooled over time into
    ``n = num_agents <= T`` contiguous bins (adaptive average pooling), in fp32."""
    t = q.shape[1]
    if not isinstance(num_agents, int) or isinstance(num_agents, bool) or not 1 <= num_agents <= t:
        raise ValueError(f"num_agents must be an int in [1, T={t}], got {num_agents!r}")
    pool = jnp.asarray(_pool_matrix(t, num_agents))
    return jnp.einsum("nt,bthk->bnhk", pool, q.astype(jnp.float32))


def _check(q, k, v, agents):
    _checks.check_cross_qkv(q, k, v)
    b, _, hq, d = q.shape
    if agents is not None:
        _checks.check_float("agents", agents)
        if agents.ndim != 4 or agents.shape[0] != b or agents.shape[2:] != (hq, d):
            raise ValueError(f"agents must have shape [B, n, Hq, K] with B, Hq, K = "
                             f"{(b, hq, d)}, got {agents.shape}")


def _bias(bias: Any, name: str, shape: tuple[int, ...]) -> jax.Array | float:
    if bias is None:
        return 0.0
    bias = jnp.asarray(bias, jnp.float32)
    try:
        grown = jnp.broadcast_shapes(bias.shape, shape) != shape
    except ValueError:
        grown = True
    if grown:
        raise ValueError(f"{name} must broadcast to [B, H, ., .] = {shape}, got {bias.shape}")
    return bias


def agent_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_agents: int | None = None,
    agents: jax.Array | None = None,
    scale: float | None = None,
    agent_bias: tuple[Any, Any] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Agent attention, non-causal (see the module docstring for the math and the paper).

    Args:
      q: ``[B, Tq, Hq, K]``; k: ``[B, Tk, Hkv, K]``; v: ``[B, Tk, Hkv, V]`` (``Hq % Hkv == 0``).
      num_agents: ``n``; the agents are then :func:`pool_agents` ``(q, n)``.
      agents: ``[B, n, Hq, K]`` explicit agent tokens instead (exactly one of the two).
      scale: default ``1/sqrt(K)``, used in both softmaxes.
      agent_bias: ``(B_1, B_2)`` added to the logits, broadcastable to ``[B, Hq, n, Tk]`` and
        ``[B, Hq, Tq, n]``; either may be None.
      implementation: ``None`` / ``"xla"`` (the factored form, ``O((Tq + Tk) n)``) or
        ``"reference"`` (materializes ``P = P_2 P_1 [B, H, Tq, Tk]``).

    Returns:
      ``o [B, Tq, Hq, V]`` in the inputs' dtype (computed in fp32).
    """
    _check(q, k, v, agents)
    if (num_agents is None) == (agents is None):
        raise ValueError("pass exactly one of num_agents (pool the queries) and agents")
    if implementation not in (None, "xla", "reference"):
        raise ValueError(f"implementation must be None, 'xla' or 'reference', "
                         f"got {implementation!r}")
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    dtype = _checks.out_dtype(q, k, v)
    a = pool_agents(q, num_agents) if agents is None else agents.astype(jnp.float32)
    n = a.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    b1, b2 = (None, None) if agent_bias is None else agent_bias
    b1 = _bias(b1, "agent_bias[0]", (b, hq, n, tk))
    b2 = _bias(b2, "agent_bias[1]", (b, hq, tq, n))
    g = hq // k.shape[2]
    k32 = jnp.repeat(k.astype(jnp.float32), g, axis=2) if g > 1 else k.astype(jnp.float32)
    v32 = jnp.repeat(v.astype(jnp.float32), g, axis=2) if g > 1 else v.astype(jnp.float32)
    p1 = jax.nn.softmax(scale * jnp.einsum("bnhd,bkhd->bhnk", a, k32) + b1, axis=-1)
    p2 = jax.nn.softmax(scale * jnp.einsum("bqhd,bnhd->bhqn", q.astype(jnp.float32), a) + b2,
                        axis=-1)
    if implementation == "reference":
        p = jnp.einsum("bhqn,bhnk->bhqk", p2, p1)
        return jnp.einsum("bhqk,bkhv->bqhv", p, v32).astype(dtype)
    v_agents = jnp.einsum("bhnk,bkhv->bhnv", p1, v32)
    return jnp.einsum("bhqn,bhnv->bqhv", p2, v_agents).astype(dtype)
