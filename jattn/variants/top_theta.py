"""Top-theta attention (Berestizshevsky et al., "Top-Theta Attention: Sparsifying Transformers
by Compensated Thresholding", 2025): a calibrated per-head threshold instead of a top-k sort.

``keep_ij = visible_ij and (s_ij >= theta_h or j = diag(i))``, ``p_i = softmax over kept keys``,
``o_i = sum_j p_ij v_j``, with ``s = scale q k^T (+ bias)`` and ``diag(i) = i + Tk - Tq`` (the
query's own position, end-aligned as :func:`jattn.masks.causal`; a KV-cache decoder passes
``diagonal_offset`` = the first new token's slot instead). The diagonal is always kept
(when the mask shows it) so that a row never loses every key to the threshold: what we chose
for the paper's guarantee that each row keeps at least one element. A row whose mask hides the
diagonal and whose scores all fall below ``theta_h`` returns 0, as an empty row does everywhere
in jattn. The paper's compensations (softmax-denominator and V-mean) are not applied: rows are
renormalized over the kept keys.

``theta_h`` is a constant per query head, calibrated offline from sample data for a target
number of kept keys (:func:`calibrate_top_theta`); ``-inf`` keeps everything (plain softmax).
It receives no gradient (a threshold has none); q, k, v and the bias do.

The ``"xla"`` form is one online-softmax pass whose per-tile visibility also tests the
threshold, so thresholding costs nothing extra and memory stays O(T * block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.masks import Mask
from jattn.variants import _tiles
from jattn.variants._api import prepare

__all__ = ["top_theta_attention", "calibrate_top_theta"]


def _kept(spec, s, vis, theta, q_idx, k_idx, offset):
    """``vis & (s >= theta_h | k = q + offset)``; ``theta [Hq]`` -> ``[1, Hkv, G, 1, 1]``."""
    th = theta.reshape(1, spec.num_kv_heads, spec.group, 1, 1)
    diag = k_idx[None, :] == q_idx[:, None] + offset
    return vis & ((s >= th) | diag)


def _check_theta(theta, hq: int):
    theta = jnp.asarray(theta)
    if theta.shape != (hq,) or not jnp.issubdtype(theta.dtype, jnp.floating):
        raise ValueError(f"theta must be a float array of shape [Hq={hq}], got "
                         f"{theta.dtype}{list(theta.shape)}")
    return jax.lax.stop_gradient(theta.astype(jnp.float32))


def top_theta_attention(q, k, v, theta, *, mask: Mask | jax.Array | None = None, bias=None,
                        scale: float | None = None, logits_soft_cap: float | None = None,
                        implementation: str | None = None, block_q: int | None = None,
                        block_kv: int | None = None, diagonal_offset=None) -> jax.Array:
    """Top-theta attention (module docstring), ``[B, Tq, Hq, Dv]`` in q's dtype.

    Args:
      q, k, v: ``[B, Tq, Hq, Dk]``, ``[B, Tk, Hkv, Dk]``, ``[B, Tk, Hkv, Dv]``.
      theta: float ``[Hq]`` per-head thresholds on the (scaled, biased, capped) scores.
      mask, bias, scale, logits_soft_cap, implementation, block_q, block_kv: as in
        :func:`jattn.variants.clipped_softmax_attention`.
      diagonal_offset: query ``i``'s own key is ``i + diagonal_offset`` (int or int scalar
        array, may be traced); default ``Tk - Tq``.
    """
    call = prepare("top_theta_attention", q, k, v, mask=mask, bias=bias, scale=scale,
                   logits_soft_cap=logits_soft_cap, implementation=implementation)
    spec = call.spec
    theta = _check_theta(theta, q.shape[2])
    offset = (spec.kv_len - spec.q_len if diagonal_offset is None
              else jnp.asarray(diagonal_offset, jnp.int32))
    if call.implementation == "reference":
        s, vis = _tiles.dense_scores(spec, q, k, call.bias, call.dense_mask)
        keep = _kept(spec, s, vis, theta, jnp.arange(spec.q_len), jnp.arange(spec.kv_len),
                     offset)
        return _tiles.weighted_values(_tiles.dense_softmax(s, keep), v).astype(q.dtype)
    bq, bk = _tiles.block_sizes(spec, block_q, block_kv)

    def step(carry, tile, _):
        s = _tiles.tile_scores(spec, tile)
        keep = _kept(spec, s, tile.vis, theta, tile.q_idx, tile.k_idx, offset)
        return _tiles.softmax_step(carry, s, keep, tile.v)

    out = _tiles.tile_loop(spec, q, k, v, call.bias, call.dense_mask, block_q=bq, block_kv=bk,
                           init=lambda row: _tiles.softmax_init(row, v.shape[-1]), step=step,
                           finish=lambda c, _: _tiles.softmax_finish(c)[0])
    return _tiles.to_output(out).astype(q.dtype)


def calibrate_top_theta(q, k, *, keep: int, mask: Mask | jax.Array | None = None, bias=None,
                        scale: float | None = None,
                        logits_soft_cap: float | None = None) -> jax.Array:
    """Per-head thresholds ``theta [Hq]`` that keep about ``keep`` keys per row.

    From sample queries and keys (the calibration set; ``[B, T, H, D]`` as for attention),
    ``theta_h`` is the mean, over the sample rows of head ``h`` with at least ``keep`` visible
    keys, of the row's ``keep``-th largest visible score (rows with fewer keep everything and
    are left out); a head with no such row gets ``-inf`` (keep all). This is the paper's
    per-head calibration with one threshold for all rows (it also calibrates per row position;
    not done here). Materializes the sample's scores (it runs offline, on a sample).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int (keys kept per row), got {keep!r}")
    call = prepare("calibrate_top_theta", q, k, k, mask=mask, bias=bias, scale=scale,
                   logits_soft_cap=logits_soft_cap, implementation="reference")
    spec = call.spec
    s, vis = _tiles.dense_scores(spec, q, k, call.bias, call.dense_mask)
    if keep > spec.kv_len:
        return jnp.full((q.shape[2],), -jnp.inf, jnp.float32)
    kth = jax.lax.top_k(jnp.where(vis, s, -jnp.inf), keep)[0][..., -1]  # [B, Hkv, G, Tq]
    ok = jnp.isfinite(kth)
    total = jnp.sum(jnp.where(ok, kth, 0.0), axis=(0, 3)).reshape(-1)
    count = jnp.sum(ok, axis=(0, 3)).reshape(-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), -jnp.inf)
