"""Input checks shared by the model configs, the forward and decoding.

Two kinds of check:

* configuration (static Python values): :func:`require_int`, called from the configs'
  ``__post_init__`` so a bad ``--config.model.d_model=-8`` fails at construction with a
  ``ValueError`` that names the field and the value;
* data (token ids, decode indices): checked only when the values are *concrete* (eager calls,
  or the Python wrappers around jitted functions). Inside ``jax.jit`` the values are traced and
  no Python error is possible; there the models return NaN at the offending positions
  (:func:`take_or_nan`, the KV cache's overflow guard), which a loss or a sampler surfaces,
  instead of a silently wrong finite number.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_concrete", "require_int", "check_ids", "take_or_nan"]


def is_concrete(x: Any) -> bool:
    """True unless ``x`` is a tracer (inside ``jit``/``grad``/``vmap``)."""
    return not isinstance(x, jax.core.Tracer)


def require_int(owner: str, name: str, value: Any, *, minimum: int = 1,
                optional: bool = False) -> None:
    """Raise ``ValueError("owner.name must be an int >= minimum, got value")`` unless ``value``
    is an int (not a bool) ``>= minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{owner}.{name} must be {what}{' or None' if optional else ''}, "
                         f"got {value!r}")


def check_ids(ids: Any, size: int, what: str, limit_name: str) -> None:
    """For concrete integer ``ids``: raise unless every id is in ``[0, size)``.

    ``what`` names the ids (``"token ids"``), ``limit_name`` the bound (``"vocab_size"``).
    Traced ids are not checked (see :func:`take_or_nan`).
    """
    if not is_concrete(ids):
        return
    a = np.asarray(ids)
    if a.size == 0:
        return
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} must be in [0, {limit_name}={size}), got {bad} "
                         f"(range of the input: [{lo}, {hi}])")


def take_or_nan(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` (rows of ``table [N, ...]``), NaN rows for ids outside ``[0, N)``.

    ``jnp.take`` wraps negative ids around (``-1`` reads the last row, a silently wrong finite
    value) and fills ids ``>= N``; mapping every invalid id past the end gives NaN for both, so
    a traced out-of-range id shows up in the outputs.
    """
    n = table.shape[0]
    valid = (ids >= 0) & (ids < n)
    return jnp.take(table, jnp.where(valid, ids, n), axis=0, mode="fill", fill_value=jnp.nan)
