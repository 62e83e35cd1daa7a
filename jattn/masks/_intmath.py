"""Integer division for mask predicates that must lower for TPU (Mosaic) from a CPU host."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _floordiv(a, b: int):
    """Floor division by a positive constant from ``lax.div``/``lax.rem`` (truncating) with a
    sign fix-up: ``jnp.floor_divide`` lowers through ``sign``, which Mosaic cannot lower for a
    TPU target from a CPU host."""
    if b == 1:
        return a
    a = jnp.asarray(a)
    b_arr = jnp.asarray(b, a.dtype)
    quot = jax.lax.div(a, b_arr)
    return jnp.where((jax.lax.rem(a, b_arr) != 0) & (a < 0), quot - 1, quot)


def _mod(a, b: int):
    """``a mod b`` (non-negative for positive ``b``), consistent with :func:`_floordiv`."""
    return a - _floordiv(a, b) * b
