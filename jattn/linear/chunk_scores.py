"""Intra-chunk score matrices with a per-key-channel decay, and their gradients, in blocks.

``A_ij = sum_k x_ik y_jk exp(G_ik - G_jk)`` for ``j <= i`` inside one chunk of ``C`` steps
(``G`` the cumulative log-decay, non-increasing along the chunk) is the costly part of every
per-channel-gated chunk form (GLA, KDA, RWKV-7's DPLR). It cannot be factored as
``(x exp(G)) (y exp(-G))^T``: ``exp(-G)`` overflows fp32 once ``|G| > 88``. As in
flash-linear-attention's ``chunk_gla`` / ``chunk_dplr`` kernels, the chunk is cut into ``n``
sub-chunks of ``c`` steps:

* a pair of sub-chunks ``(a, b)``, ``b < a``, factors through ``R_a``, the cumulative gate at the
  end of sub-chunk ``a - 1``: ``exp(G_i - G_j) = exp(G_i - R_a) exp(R_a - G_j)``, both factors
  ``<= 1`` (no overflow whatever the gates), one ``[c, K] x [K, c]`` matmul per pair
  (``n (n - 1) / 2`` pairs, no masked-out work);
* pairs inside one sub-chunk use the per-entry decay (a ``[c, c, K]`` tensor per sub-chunk).

The gradient is written out (``jax.custom_vjp``) with the same factors rather than left to
autodiff, whose backward of the masked broadcasts was ~9x the forward on CPU:

    dx_ik = sum_j dA_ij y_jk exp(G_ik - G_jk),   dy_jk = sum_i dA_ij x_ik exp(G_ik - G_jk),
    dG = x * dx - y * dy.

Rows and columns come in stacks (``x [R, ..., C, K]``, ``y [S, ..., C, K]`` -> ``[R, S, ...,
C, C]``) so that the several score matrices of one chunk (four for DPLR) share the decay
factors. Exponents are masked to ``-inf`` before ``exp`` (no inf or NaN in values or
gradients).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def sub_chunk_size(chunk_size: int) -> int:
    """Largest divisor of ``chunk_size`` not above ``sqrt(chunk_size)`` (at least 1): the
    per-entry work (``C c K``) and the pair work (``C^2 K / c`` elementwise) balance there."""
    limit = max(1, math.isqrt(chunk_size))
    return max(d for d in range(1, limit + 1) if chunk_size % d == 0)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-chunk pairs ``(a, b)`` with ``b < a``: row and column sub-chunk indices."""
    return np.tril_indices(n, -1)


def _factors(G: jax.Array, c: int):
    """Per-channel decay factors of a chunk: ``G [L, C, K]`` ->
    ``rel [L, n, c, c, K]`` (``exp(G_i - G_j)``, ``j <= i`` in one sub-chunk, else 0),
    ``row [L, n, c, K]`` (``exp(G_i - R_a)``) and ``col [L, P, c, K]``
    (``exp(R_a - G_j)`` for pair ``p = (a, b)``, ``j`` in sub-chunk ``b``)."""
    L, C, K = G.shape
    n = C // c
    Gs = G.reshape(L, n, c, K)
    sub = jnp.arange(c)
    causal = (sub[:, None] >= sub[None, :])[:, :, None]
    rel = jnp.exp(jnp.where(causal, Gs[:, :, :, None, :] - Gs[:, :, None, :, :], -jnp.inf))
    R = jnp.concatenate([jnp.zeros_like(Gs[:, :1, :1]), Gs[:, :-1, -1:]], axis=1)  # [L, n, 1, K]
    row = jnp.exp(Gs - R)
    a, b = _pairs(n)
    col = jnp.exp(R[:, a] - Gs[:, b])
    return rel, row, col


def _blocks_to_matrix(diag: jax.Array, off: jax.Array, n: int) -> jax.Array:
    """``diag [..., n, c, c]`` and ``off [..., P, c, c]`` (pairs) -> ``[..., C, C]``."""
    a, b = _pairs(n)
    index = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(a, b, strict=True))}
    zero = jnp.zeros_like(diag[..., 0, :, :])
    rows = []
    for r in range(n):
        blocks = [off[..., index[r, j], :, :] if j < r else diag[..., r, :, :] if j == r else zero
                  for j in range(n)]
        rows.append(jnp.concatenate(blocks, axis=-1))
    return jnp.concatenate(rows, axis=-2)


def _matrix_to_blocks(M: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`_blocks_to_matrix` (the upper blocks are dropped)."""
    C = M.shape[-1]
    c = C // n
    Mb = M.reshape(M.shape[:-2] + (n, c, n, c))
    diag = jnp.stack([Mb[..., r, :, r, :] for r in range(n)], axis=-3)
    a, b = _pairs(n)
    off = jnp.stack([Mb[..., i, :, j, :] for i, j in zip(a, b, strict=True)], axis=-3)
    return diag, off


def _sub_chunk_operands(x, y, G, c):
    """What the forward and the backward both read: the ``n`` sub-chunks, their pairs
    ``(a, b)``, the gate factors, ``xs [R, L, n, c, K]``, ``ys [S, L, n, c, K]`` and the
    pairs' scaled rows ``x_row [R, L, P, c, K]`` and columns ``y_col [S, L, P, c, K]``."""
    R, S = x.shape[0], y.shape[0]
    L, C, K = G.shape
    n = C // c
    a, b = _pairs(n)
    rel, row, col = _factors(G, c)
    xs, ys = x.reshape(R, L, n, c, K), y.reshape(S, L, n, c, K)
    x_row = (xs * row)[:, :, a]
    y_col = ys[:, :, b] * col
    return n, a, b, rel, row, col, xs, ys, x_row, y_col


def _scores(x, y, G, c):
    R, S = x.shape[0], y.shape[0]
    n, a, b, rel, row, col, xs, ys, x_row, y_col = _sub_chunk_operands(x, y, G, c)
    # One (row, column) stack pair at a time: batch axes (L, blocks) lead every product.
    diag, off = [], []
    for r in range(R):
        x_rel = xs[r][:, :, :, None, :] * rel  # [L, n, c, c, K]
        for s in range(S):
            diag.append(jnp.sum(x_rel * ys[s][:, :, None], axis=-1))
            off.append(jnp.einsum("lpik,lpjk->lpij", x_row[r], y_col[s]))
    shape = (R, S) + diag[0].shape
    return _blocks_to_matrix(jnp.stack(diag).reshape(shape),
                             jnp.stack(off).reshape((R, S) + off[0].shape), n)


def _sum_pairs(x: jax.Array, index: np.ndarray, n: int) -> jax.Array:
    """``[L, P, ...]`` -> ``[L, n, ...]``: pairs summed by their sub-chunk ``index[p]``."""
    zero = jnp.zeros_like(x[:, 0])
    parts = [sum((x[:, p] for p in np.flatnonzero(index == i)), zero) for i in range(n)]
    return jnp.stack(parts, axis=1)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gated_scores(x, y, G, c):
    return _scores(x, y, G, c)


def _gated_scores_fwd(x, y, G, c):
    return _scores(x, y, G, c), (x, y, G)


def _gated_scores_bwd(c, res, dA):
    x, y, G = res
    R, S = x.shape[0], y.shape[0]
    n, a, b, rel, row, col, xs, ys, x_row, y_col = _sub_chunk_operands(x, y, G, c)
    d_diag, d_off = _matrix_to_blocks(dA, n)  # [R, S, L, n, c, c], [R, S, L, P, c, c]
    # Within sub-chunks: dx_i = sum_j dA_ij (y_j * rel_ij), dy_j = sum_i dA_ij (x_i * rel_ij).
    # Across sub-chunks (pair p = (a, b)): dx_a += row_a * dA_p y_col_p,
    # dy_b += col_p * dA_p^T x_row_p; pairs sharing a row (column) sub-chunk are summed.
    dx, dy = [], []
    for r in range(R):
        t = sum(d_diag[r, s][..., None] * ys[s][:, :, None] for s in range(S))
        pair = sum(jnp.einsum("lpij,lpjk->lpik", d_off[r, s], y_col[s]) for s in range(S))
        dx.append(jnp.sum(t * rel, axis=-2) + row * _sum_pairs(pair, a, n))
    for s in range(S):
        t = sum(d_diag[r, s][..., None] * xs[r][:, :, :, None] for r in range(R))
        pair = sum(jnp.einsum("lpij,lpik->lpjk", d_off[r, s], x_row[r]) for r in range(R))
        dy.append(jnp.sum(t * rel, axis=-3) + _sum_pairs(pair * col, b, n))
    dx, dy = jnp.stack(dx), jnp.stack(dy)
    dx, dy = dx.reshape(x.shape), dy.reshape(y.shape)
    dG = jnp.sum(x * dx, axis=0) - jnp.sum(y * dy, axis=0)
    return dx, dy, dG


_gated_scores.defvjp(_gated_scores_fwd, _gated_scores_bwd)


def gated_scores(x: jax.Array, y: jax.Array, G: jax.Array) -> jax.Array:
    """``A[r, s, ..., i, j] = sum_k x[r, ..., i, k] y[s, ..., j, k] exp(G_ik - G_jk)`` for
    ``j <= i``, else 0.

    Args:
      x: ``[R, ..., C, K]`` rows; y: ``[S, ..., C, K]`` columns; G: ``[..., C, K]`` cumulative
        log-decay (non-increasing along ``C``; finite).
    Returns:
      ``[R, S, ..., C, C]`` (fp32), differentiable in ``x, y, G`` (hand-written gradient).
    """
    lead = G.shape[:-2]
    C, K = G.shape[-2:]
    L = int(np.prod(lead, dtype=np.int64))
    c = sub_chunk_size(C)
    A = _gated_scores(x.reshape((x.shape[0], L, C, K)), y.reshape((y.shape[0], L, C, K)),
                      G.reshape(L, C, K), c)
    return A.reshape((x.shape[0], y.shape[0]) + lead + (C, C))
