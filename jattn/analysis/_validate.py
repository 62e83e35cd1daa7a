"""Input checks shared by the analysis metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weights(weights, name: str = "weights", allow_stack: bool = True) -> jax.Array:
    w = jnp.asarray(weights)
    ranks = (4, 5) if allow_stack else (4,)
    if w.ndim not in ranks:
        shapes = " or [L, B, H, Tq, Tk]" if allow_stack else ""
        raise ValueError(f"{name} must have shape [B, H, Tq, Tk]{shapes}, got {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {w.dtype}")
    return w.astype(jnp.float32)
