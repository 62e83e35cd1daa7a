"""How attention scores become weights: a small registry of normalizers.

Two families cover the research this library serves:

* ``softmax``: ``p_ij = exp(s_ij) / (exp(sink) + sum_{j visible} exp(s_ij))``. Streamed with a
  running max (online softmax) by the blocked implementations.
* elementwise: ``p_ij = f(s_ij) / c_i`` on visible keys, with ``c_i = 1`` or ``c_i`` = the number of
  keys query ``i`` sees. ``sigmoid`` (Gu et al., "When Attention Sink Emerges in Language
  Models", 2024: no sink emerges without normalization) and ``relu`` (Guo et al.,
  "Active-Dormant Attention Heads", 2024: ``relu(s) / i`` under a causal mask removes the sink in
  Bigram-Backcopy) are registered. Any elementwise map registers with one call::

      jattn.normalizers.register("softplus", jax.nn.softplus)

The blocked XLA path differentiates elementwise maps with ``jax.jvp``, so a registered ``f``
only needs to be differentiable.

Two row-wise normalizers that are neither family have their own streaming forms
(``Normalizer.rowwise``), in the reference and the blocked XLA paths:

* ``softpick`` (Zuhri et al., "Softpick: No Attention Sink, No Massive Activations with Rectified
  Softmax", 2025): ``p_ij = relu(e^{s_ij} - 1) / (sum_{j visible} |e^{s_ij} - 1| + eps)``,
  ``eps = 1e-6``. Computed stably with a running max ``m >= 0``:
  ``e^s - 1 = e^m (e^{s - m} - e^{-m})``, and ``eps`` becomes ``eps e^{-m}``. Rows may sum to
  less than one (negative scores take weight from the denominator only); a row with no visible
  key gets 0.
* ``stick_breaking`` (Tan et al., "Scaling Stick-Breaking Attention", 2024): with
  ``beta_ij = sigmoid(s_ij)``, ``p_ij = beta_ij prod_{k > j visible} (1 - beta_ik)``, i.e. under
  a causal mask ``prod_{j < k <= i}``: the nearest key takes its share of the stick first.
  Computed in log space; the blocked path visits key blocks right to left carrying
  ``sum log(1 - beta)``. Rows sum to at most one (the remainder is "attend to nothing").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["Normalizer", "register", "get", "names"]


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """A way of turning scores into weights.

    Attributes:
      name: registry key.
      softmax: True for the softmax family (online-softmax streaming, log-sum-exp, sinks).
      fn: elementwise ``f(s)`` for the non-softmax family (None for softmax).
      divide_by_count: divide each row by its number of visible keys.
      rowwise: the name of a row-wise normalizer with its own implementation (``"softpick"``,
        ``"stick_breaking"``); None for the two families.
    """

    name: str
    softmax: bool = False
    fn: Callable[[jax.Array], jax.Array] | None = None
    divide_by_count: bool = False
    rowwise: str | None = None

    def grad(self, s: jax.Array) -> jax.Array:
        """Elementwise derivative ``f'(s)`` (elementwise family only)."""
        return jax.jvp(self.fn, (s,), (jnp.ones_like(s),))[1]


_REGISTRY: dict[str, Normalizer] = {}


def register(name: str, fn: Callable | None = None, *, divide_by_count: bool = False,
             softmax: bool = False) -> Normalizer:
    """Register an elementwise normalizer ``p = fn(s) [/ n_visible]`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not softmax and not callable(fn):
        raise TypeError(f"fn must be callable for an elementwise normalizer, got {fn!r}")
    norm = Normalizer(name, softmax=softmax, fn=fn, divide_by_count=divide_by_count)
    _REGISTRY[name] = norm
    return norm


def get(name: str | Normalizer) -> Normalizer:
    """Look up a normalizer by name (a ``Normalizer`` passes through)."""
    if isinstance(name, Normalizer):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"normalizer must be one of {sorted(_REGISTRY)}, got {name!r}"
        ) from None


def names() -> list[str]:
    return sorted(_REGISTRY)


SOFTPICK_EPS = 1e-6

register("softmax", softmax=True)
register("sigmoid", jax.nn.sigmoid)
register("relu", jax.nn.relu, divide_by_count=True)
_REGISTRY["softpick"] = Normalizer("softpick", rowwise="softpick")
_REGISTRY["stick_breaking"] = Normalizer("stick_breaking", rowwise="stick_breaking")
