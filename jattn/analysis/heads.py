"""Per-head attributions: ablation / gradient importance (Michel et al. 2019) and
copy-paste retrieval score (Wu et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jattn.analysis._validate import _weights


def head_ablation_importance(
    loss_fn: Callable[[jax.Array], jax.Array],
    mask_shape: int | Sequence[int],
    method: str = "ablation",
) -> jax.Array:
    r"""Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

    ``loss_fn(mask)`` evaluates the model with each head's output multiplied by
    ``mask[..., h]`` (a float array of shape ``mask_shape``, ones = intact), on a fixed
    batch, and returns a scalar loss.

    - ``method="ablation"``: ``I_h = loss(mask with head h set to 0) - loss(ones)``, one
      call per head (a Python loop: ``loss_fn`` need not be vmappable).
    - ``method="gradient"``: Michel et al.'s proxy ``I_h = |d loss / d xi_h|`` at
      ``xi = 1`` (one ``jax.grad`` call; ``loss_fn`` must be differentiable).

    Args:
      mask_shape: ``H`` or ``(L, H)``.

    Returns:
      Float array of shape ``mask_shape``: positive = removing the head hurts.
    """
    shape = (mask_shape,) if isinstance(mask_shape, int) else tuple(mask_shape)
    ones = jnp.ones(shape, jnp.float32)
    if method == "gradient":
        return jnp.abs(jax.grad(lambda m: jnp.asarray(loss_fn(m), jnp.float32))(ones))
    if method != "ablation":
        raise ValueError(f"method must be 'ablation' or 'gradient', got {method!r}")
    base = jnp.asarray(loss_fn(ones), jnp.float32)
    flat = []
    for idx in range(math.prod(shape)):
        m = ones.reshape(-1).at[idx].set(0.0).reshape(shape)
        flat.append(jnp.asarray(loss_fn(m), jnp.float32) - base)
    return jnp.stack(flat).reshape(shape)


def retrieval_score(weights, generated, context, needle_mask) -> jax.Array:
    r"""Retrieval-head score (Wu et al. 2024): the fraction of needle tokens a head copies.

    At each generation step ``i`` a head *copy-pastes* when its most-attended key
    ``j* = argmax_j p_ij`` lies inside the needle and carries the token being generated,
    ``context[j*] == generated[i]``. With ``g_h`` the set of needle positions head ``h``
    copy-pasted from and ``k`` the needle positions, ``score_h = |g_h| / |k|``
    (Wu et al.: ``|g_h ∩ k| / |k|``).

    Args:
      weights: ``[B, H, Tq, Tk]``: the attention of the ``Tq`` generation steps (queries)
        over the ``Tk`` context tokens.
      generated: int ``[B, Tq]``: the token produced at each step.
      context: int ``[B, Tk]``: the context tokens.
      needle_mask: bool ``[B, Tk]`` (or ``[Tk]``): True at the needle's positions.

    Returns:
      ``[B, H]`` in ``[0, 1]``; average over the batch for a per-head score.
    """
    w = _weights(weights, allow_stack=False)
    b, _, tq, tk = w.shape
    generated = jnp.asarray(generated)
    context = jnp.asarray(context)
    needle = jnp.broadcast_to(jnp.asarray(needle_mask, bool), (b, tk))
    if generated.shape != (b, tq):
        raise ValueError(f"generated must have shape [B, Tq] = {(b, tq)}, got {generated.shape}")
    if context.shape != (b, tk):
        raise ValueError(f"context must have shape [B, Tk] = {(b, tk)}, got {context.shape}")
    top = jnp.argmax(w, axis=-1)  # [B, H, Tq]
    tok = jnp.take_along_axis(context[:, None, :], top.reshape(b, 1, -1), axis=-1)
    tok = tok.reshape(top.shape)
    in_needle = jnp.take_along_axis(needle[:, None, :], top.reshape(b, 1, -1), axis=-1)
    hit = in_needle.reshape(top.shape) & (tok == generated[:, None, :])  # [B, H, Tq]
    # positions hit (a set: each needle position counts once)
    onehot = jax.nn.one_hot(jnp.where(hit, top, tk), tk + 1)[..., :tk]  # [B, H, Tq, Tk]
    copied = jnp.any(onehot > 0, axis=-2) & needle[:, None, :]
    n_needle = jnp.maximum(jnp.sum(needle, axis=-1), 1)[:, None]
    return jnp.sum(copied, axis=-1) / n_needle
