"""Signed softmax weights: Cog attention (Lv et al., "More Expressive Attention with Negative
Weights", 2024), in the form MECHANISMS.md infers.

``p_ij = sign(s_ij) softmax_j(|s_i|)_j`` over visible keys, ``s = scale q k^T (+ bias)``,
``o_i = sum_j p_ij v_j``. The magnitudes are a softmax of ``|s|``, so ``sum_j |p_ij| = 1``; the
sign of the score survives, so a head can give a key a large negative weight (delete / copy
with a minus sign). A soft-cap ``c tanh(s / c)``, if set, applies before the sign and magnitude
are taken (tanh is odd: the same as capping ``|s|``). ``sign(0) = 0``.

Streaming form (``"xla"``): an online softmax over ``|s|`` (running max and sum of
``e^{|s| - m}``) whose value product uses ``sign(s) e^{|s| - m}``: one pass, O(T * block)
memory, gradients by autodiff through the rematerialized tile loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.masks import Mask
from jattn.variants import _tiles
from jattn.variants._api import prepare

__all__ = ["signed_attention"]


def signed_attention(q, k, v, *, mask: Mask | jax.Array | None = None, bias=None,
                     scale: float | None = None, logits_soft_cap: float | None = None,
                     implementation: str | None = None, block_q: int | None = None,
                     block_kv: int | None = None) -> jax.Array:
    """Cog attention's signed softmax (module docstring), ``[B, Tq, Hq, Dv]`` in q's dtype.

    Arguments as :func:`jattn.variants.clipped_softmax_attention` (without gamma/zeta).
    """
    call = prepare("signed_attention", q, k, v, mask=mask, bias=bias, scale=scale,
                   logits_soft_cap=logits_soft_cap, implementation=implementation)
    spec = call.spec
    if call.implementation == "reference":
        s, vis = _tiles.dense_scores(spec, q, k, call.bias, call.dense_mask)
        p = jnp.sign(s) * _tiles.dense_softmax(jnp.abs(s), vis)
        return _tiles.weighted_values(p, v).astype(q.dtype)
    bq, bk = _tiles.block_sizes(spec, block_q, block_kv)

    def step(carry, tile, _):
        s = _tiles.tile_scores(spec, tile)
        return _tiles.softmax_step(carry, jnp.abs(s), tile.vis, tile.v, sign=jnp.sign(s))

    out = _tiles.tile_loop(spec, q, k, v, call.bias, call.dense_mask, block_q=bq, block_kv=bk,
                           init=lambda row: _tiles.softmax_init(row, v.shape[-1]), step=step,
                           finish=lambda c, _: _tiles.softmax_finish(c)[0])
    return _tiles.to_output(out).astype(q.dtype)
