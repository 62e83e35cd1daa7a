"""Gated positional self-attention, GPSA (d'Ascoli et al., "ConViT: Improving Vision
Transformers with Soft Convolutional Inductive Biases", ICML 2021).

Per head ``h``, over a ``gh x gw`` token grid (row-major, after ``P`` prefix tokens such as a
class token):

``A_h = (1 - sigma(lambda_h)) softmax_j(s_ij) + sigma(lambda_h) softmax_j(v_h . r_ij)``,
``A_h <- A_h / sum_j A_h`` (the paper's renormalization), ``o_i = sum_j A_ij v_j``,

with content scores ``s = scale q k^T (+ bias)``, the relative offset of key ``j`` from query
``i`` on the grid ``delta = (dx, dy) = (x_j - x_i, y_j - y_i)``, ``r_ij = (dx, dy, dx^2 + dy^2)``
and a learnable ``v_h [3]`` per head (positional scores are not scaled). The paper's locality
initialization (:func:`gpsa_locality_init`), ``v_h = alpha (2 Delta_h, -1)``, makes
``v_h . r = -alpha ||delta - Delta_h||^2 + const``: head ``h`` starts as a soft convolution
centred on offset ``Delta_h`` (the heads' centres tile a ``sqrt(H) x sqrt(H)`` grid), and the
gate ``lambda_h`` (init 1) lets it learn to leave locality.

Prefix tokens have no grid position: they take no part in the positional softmax (as queries
or keys), so a prefix query's row is its content softmax after the renormalization, and grid
queries reach a prefix key only through content. Masks apply to both maps.

The ``"xla"`` form streams both softmaxes over the same tiles (two running max/sum/accumulator
triples, positional scores computed from the tile's indices), O(T * block) memory; gradients
reach q, k, v, ``v_h`` and ``lambda_h``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.masks import Mask
from jattn.variants import _tiles
from jattn.variants._api import prepare

__all__ = ["gpsa_attention", "gpsa_locality_init", "relative_offsets"]


def gpsa_locality_init(num_heads: int, strength: float = 1.0) -> np.ndarray:
    """ConViT's locality init of ``v_h [H, 3]``: ``alpha (2 Delta_x, 2 Delta_y, -1)``, centres
    ``Delta_h`` on a ``k x k`` grid of offsets around 0 (``k = ceil(sqrt(H))``; ConViT uses
    square head counts), ``alpha = strength``."""
    k = math.ceil(math.sqrt(num_heads))
    center = (k - 1) / 2
    w = np.zeros((num_heads, 3), np.float32)
    for h in range(num_heads):
        h1, h2 = h % k, h // k
        w[h] = (2 * (h1 - center), 2 * (h2 - center), -1.0)
    return strength * w


def relative_offsets(q_idx, k_idx, grid: tuple[int, int], num_prefix_tokens: int):
    """``r [tq, tk, 3] = (dx, dy, dx^2 + dy^2)`` of keys relative to queries on the grid, and
    bool ``on_grid [tq, tk]`` (both tokens are grid tokens)."""
    gw = grid[1]
    qg, kg = q_idx - num_prefix_tokens, k_idx - num_prefix_tokens
    qy, qx = qg // gw, qg % gw
    ky, kx = kg // gw, kg % gw
    dx = (kx[None, :] - qx[:, None]).astype(jnp.float32)
    dy = (ky[None, :] - qy[:, None]).astype(jnp.float32)
    on_grid = (qg >= 0)[:, None] & (kg >= 0)[None, :]
    return jnp.stack([dx, dy, dx * dx + dy * dy], axis=-1), on_grid


def _positional(spec, pos_weights, q_idx, k_idx, grid, prefix):
    """Positional scores ``[1, Hkv, G, tq, tk]`` and their grid visibility ``[tq, tk]``."""
    r, on_grid = relative_offsets(q_idx, k_idx, grid, prefix)
    s = jnp.einsum("qkc,hc->hqk", r, pos_weights.astype(jnp.float32))
    return s.reshape((1, spec.num_kv_heads, spec.group) + s.shape[1:]), on_grid


def _check(q, k, pos_weights, gate_logits, grid, prefix):
    hq, t = q.shape[2], q.shape[1]
    if (not isinstance(grid, tuple | list) or len(grid) != 2
            or not all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (gh, gw), got {grid!r}")
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {prefix!r}")
    if t != k.shape[1] or t != prefix + grid[0] * grid[1]:
        raise ValueError(f"GPSA is self-attention over the grid: q and k need T = "
                         f"num_prefix_tokens + gh * gw = {prefix + grid[0] * grid[1]}, got "
                         f"Tq={t}, Tk={k.shape[1]}")
    if jnp.shape(pos_weights) != (hq, 3):
        raise ValueError(f"pos_weights must have shape [Hq={hq}, 3], got "
                         f"{jnp.shape(pos_weights)}")
    if jnp.shape(gate_logits) != (hq,):
        raise ValueError(f"gate_logits must have shape [Hq={hq}], got {jnp.shape(gate_logits)}")


def gpsa_attention(q, k, v, pos_weights, gate_logits, *, grid: tuple[int, int],
                   num_prefix_tokens: int = 0, mask: Mask | jax.Array | None = None, bias=None,
                   scale: float | None = None, implementation: str | None = None,
                   block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Gated positional self-attention (module docstring), ``[B, T, Hq, Dv]`` in q's dtype.

    Args:
      q, k, v: ``[B, T, Hq, Dk]``, ``[B, T, Hkv, Dk]``, ``[B, T, Hkv, Dv]``,
        ``T = num_prefix_tokens + gh * gw``.
      pos_weights: ``v_h [Hq, 3]`` (on ``(dx, dy, dx^2 + dy^2)``). gate_logits: ``lambda_h
        [Hq]``; the positional share is ``sigmoid(lambda_h)``.
      grid: ``(gh, gw)``. num_prefix_tokens: tokens before the grid (class token).
      mask, bias, scale, implementation, block_q, block_kv: as in
        :func:`jattn.variants.clipped_softmax_attention`.
    """
    _check(q, k, pos_weights, gate_logits, grid, num_prefix_tokens)
    call = prepare("gpsa_attention", q, k, v, mask=mask, bias=bias, scale=scale,
                   implementation=implementation)
    spec, prefix = call.spec, num_prefix_tokens
    g = jax.nn.sigmoid(jnp.asarray(gate_logits, jnp.float32))
    g = g.reshape(1, spec.num_kv_heads, spec.group, 1)

    def mix(o_c, o_p, seen_c, seen_p):  # (1 - g) o_c + g o_p over the row's total weight
        w_c, w_p = (1.0 - g) * seen_c, g * seen_p
        den = w_c + w_p
        out = w_c[..., None] * o_c + w_p[..., None] * o_p
        return out / jnp.where(den > 0, den, 1.0)[..., None]

    if call.implementation == "reference":
        s, vis = _tiles.dense_scores(spec, q, k, call.bias, call.dense_mask)
        idx = jnp.arange(spec.q_len, dtype=jnp.int32)
        s_pos, on_grid = _positional(spec, pos_weights, idx, idx, grid, prefix)
        p_c = _tiles.dense_softmax(s, vis)
        p_p = _tiles.dense_softmax(jnp.broadcast_to(s_pos, s.shape), vis & on_grid)
        o_c = jnp.einsum("bhgqk,bkhd->bhgqd", p_c, v.astype(jnp.float32))
        o_p = jnp.einsum("bhgqk,bkhd->bhgqd", p_p, v.astype(jnp.float32))
        out = mix(o_c, o_p, p_c.sum(-1) > 0, p_p.sum(-1) > 0)
        return _tiles.to_output(out).astype(q.dtype)
    bq, bk = _tiles.block_sizes(spec, block_q, block_kv)
    dv = v.shape[-1]

    def step(carry, tile, _):
        content, positional = carry
        s_pos, on_grid = _positional(spec, pos_weights, tile.q_idx, tile.k_idx, grid, prefix)
        content = _tiles.softmax_step(content, _tiles.tile_scores(spec, tile), tile.vis, tile.v)
        positional = _tiles.softmax_step(positional, s_pos, tile.vis & on_grid, tile.v)
        return content, positional

    def finish(carry, _):
        (o_c, _), (o_p, _) = (_tiles.softmax_finish(c) for c in carry)
        return mix(o_c, o_p, carry[0][1] > 0, carry[1][1] > 0)

    out = _tiles.tile_loop(spec, q, k, v, call.bias, call.dense_mask, block_q=bq, block_kv=bk,
                           init=lambda row: (_tiles.softmax_init(row, dv),
                                             _tiles.softmax_init(row, dv)),
                           step=step, finish=finish)
    return _tiles.to_output(out).astype(q.dtype)
