"""Random inputs for the linear-attention tests, from numpy's RNG (jax.random would compile a
sampler per shape): q/k/v and log-decay gates, drawn in a fixed order so seeds stay stable."""

from __future__ import annotations

import numpy as np


def random_qkv(rng: np.random.Generator, B: int, T: int, H: int, K: int, V: int):
    """Float64 ``q, k [B, T, H, K]`` and ``v [B, T, H, V]``, standard normal."""
    q, k = rng.standard_normal((2, B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    return q, k, v


def random_log_decay(rng: np.random.Generator, shape: tuple[int, ...], strength) -> np.ndarray:
    """Log-decays ``g`` of ``shape``: all ``-30`` for ``strength == "const30"``, else spread over
    ``[-strength, 0]`` (weak and strong channels side by side)."""
    if strength == "const30":
        return np.full(shape, -30.0)
    return -strength * rng.uniform(size=shape)


def gate_shape(gate: str, B: int, T: int, H: int, K: int) -> tuple[int, ...]:
    """``[B, T, H, K]`` for a per-channel gate, ``[B, T, H]`` for a scalar (per-head) one."""
    return (B, T, H, K) if gate == "channel" else (B, T, H)


def np_start(q, v, g, S0):
    """A float64 loop oracle's start: ``g [B, T, H]`` zeros when None, the ``[B, H, K, V]``
    state (zeros when ``S0`` is None) and an empty ``o [B, T, H, V]``."""
    (B, T, H, K), V = q.shape, v.shape[-1]
    g = np.zeros((B, T, H)) if g is None else np.asarray(g, np.float64)
    S = np.zeros((B, H, K, V)) if S0 is None else np.array(S0, np.float64)
    return g, S, np.zeros((B, T, H, V))
