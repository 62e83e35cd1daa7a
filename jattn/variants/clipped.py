"""Clipped softmax attention (Bondarenko et al., "Quantizable Transformers: Removing Outliers
by Helping Attention Heads Do Nothing", NeurIPS 2023), with a two-pass blocked form.

``p_ij = clip((zeta - gamma) softmax_j(s_i)_j + gamma, 0, 1)`` over visible keys (0 elsewhere),
``s = scale q k^T (+ bias)``, ``o_i = sum_j p_ij v_j``. With ``gamma < 0`` a weight reaches
exactly 0 at finite logits (a head can "do nothing" without pushing logits to outliers); with
``zeta > 1`` exactly 1. The paper uses ``gamma = -alpha / T`` (``alpha`` a hyperparameter, ``T``
the sequence length); pass that as ``gamma``.

The clip is not a row normalization, so it cannot be folded into an online softmax: the blocked
``"xla"`` form takes two passes over the key tiles, O(T * block) memory each,

1. the row log-sum-exp ``lse_i`` (online max and sum),
2. per tile ``p = clip((zeta - gamma) e^{s - lse} + gamma, 0, 1)`` and ``acc += p @ v``,

differentiated by autodiff through rematerialized loops (:mod:`jattn.variants._tiles`):
gradients reach q, k, v, and the bias through both passes (``lse`` included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.masks import Mask
from jattn.variants import _tiles
from jattn.variants._api import prepare

__all__ = ["clipped_softmax_attention"]


def _clip(p, vis, gamma: float, zeta: float):
    return jnp.where(vis, jnp.clip((zeta - gamma) * p + gamma, 0.0, 1.0), 0.0)


def clipped_softmax_attention(q, k, v, *, gamma: float = -0.03, zeta: float = 1.0,
                              mask: Mask | jax.Array | None = None, bias=None,
                              scale: float | None = None, logits_soft_cap: float | None = None,
                              implementation: str | None = None, block_q: int | None = None,
                              block_kv: int | None = None) -> jax.Array:
    """Clipped softmax attention (module docstring), ``[B, Tq, Hq, Dv]`` in q's dtype.

    Args:
      q, k, v: ``[B, Tq, Hq, Dk]``, ``[B, Tk, Hkv, Dk]``, ``[B, Tk, Hkv, Dv]`` (GQA by
        ``Hq % Hkv``).
      gamma, zeta: the stretch ``[gamma, zeta]`` with ``gamma <= 0 <= 1 <= zeta`` (static).
      mask, bias, scale, logits_soft_cap: as in :func:`jattn.attention`.
      implementation: ``"reference"`` (materialized weights), ``"xla"`` (two blocked passes)
        or None (xla).
      block_q, block_kv: tile sizes of the xla form (default: the blocked path's).
    """
    gamma, zeta = float(gamma), float(zeta)
    if not gamma <= 0.0 or not zeta >= 1.0:
        raise ValueError(f"clipped softmax needs gamma <= 0 and zeta >= 1, got gamma={gamma}, "
                         f"zeta={zeta}")
    call = prepare("clipped_softmax_attention", q, k, v, mask=mask, bias=bias, scale=scale,
                   logits_soft_cap=logits_soft_cap, implementation=implementation)
    spec = call.spec
    if call.implementation == "reference":
        s, vis = _tiles.dense_scores(spec, q, k, call.bias, call.dense_mask)
        p = _clip(_tiles.dense_softmax(s, vis), vis, gamma, zeta)
        return _tiles.weighted_values(p, v).astype(q.dtype)
    bq, bk = _tiles.block_sizes(spec, block_q, block_kv)
    dv = v.shape[-1]
    loop = dict(block_q=bq, block_kv=bk)

    def lse_step(carry, tile, _):  # pass 1: online max and sum, no values
        return _tiles.softmax_step(carry, _tiles.tile_scores(spec, tile), tile.vis, None)

    lse = _tiles.tile_loop(spec, q, k, v, call.bias, call.dense_mask, **loop,
                           init=lambda row: _tiles.softmax_init(row, 0), step=lse_step,
                           finish=lambda c, _: _tiles.softmax_finish(c)[1])

    def clip_step(acc, tile, lse_blk):  # pass 2: the clipped weights of this tile, times v
        s = _tiles.tile_scores(spec, tile)
        finite = jnp.isfinite(lse_blk)[..., None]
        e = jnp.exp(jnp.where(tile.vis & finite, s - jnp.where(finite, lse_blk[..., None], 0.0),
                              -jnp.inf))
        p = _clip(e, tile.vis & finite, gamma, zeta)
        return acc + jnp.einsum("bhgqk,bkhd->bhgqd", p, tile.v)

    out = _tiles.tile_loop(spec, q, k, v, call.bias, call.dense_mask, **loop,
                           init=lambda row: jnp.zeros(row + (dv,), jnp.float32), step=clip_step,
                           finish=lambda acc, _: acc, rows=lse)
    return _tiles.to_output(out).astype(q.dtype)
