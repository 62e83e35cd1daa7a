"""KQ/OV patterns of multi-head softmax attention trained on in-context linear regression
(He, Pan, Chen, Yang 2025, "In-Context Linear Regression Demystified").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _square_with_diagonal(kq) -> tuple[jax.Array, jax.Array]:
    """``kq [..., d, d]`` as float32 and its diagonal ``[..., d]``; rejects non-square input."""
    m = jnp.asarray(kq, jnp.float32)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"kq must have shape [..., d, d], got {m.shape}")
    return m, jnp.diagonal(m, axis1=-2, axis2=-1)


def kq_diagonal_ratio(kq) -> jax.Array:
    r"""``||diag(KQ)||_2 / ||KQ||_F`` per head (1 iff KQ is diagonal).

    He et al. 2025: trained multi-head softmax attention on in-context linear regression
    has ``KQ_h = W_K^T W_Q`` (restricted to the x-block, ``d x d``) close to
    ``omega_h I``; this ratio is ~0.999 for H = 2, 4.

    Args:
      kq: ``[..., d, d]`` (pass the x-block: rows = key x features, columns = query x
        features).

    Returns:
      ``[...]``.
    """
    m, diag = _square_with_diagonal(kq)
    return jnp.linalg.norm(diag, axis=-1) / jnp.maximum(jnp.linalg.norm(m, axis=(-2, -1)), 1e-30)


def kq_homogeneity(kq) -> jax.Array:
    r"""How equal the diagonal entries of KQ are: ``|mean(diag)| sqrt(d) / ||diag||_2``.

    The cosine between ``diag(KQ)`` and the all-ones vector, in ``[0, 1]``; 1 iff all
    diagonal entries are equal (``KQ ∝ I`` together with a diagonal ratio of 1). It
    equals ``1 / sqrt(1 + (std/mean)^2)`` with the population std of the diagonal, so
    ``std/|mean| = 0.1`` gives 0.995. Invariant to the scale and sign of KQ.

    Args:
      kq: ``[..., d, d]`` (the x-block).

    Returns:
      ``[...]``.
    """
    _, diag = _square_with_diagonal(kq)
    d = diag.shape[-1]
    return (
        jnp.abs(jnp.sum(diag, axis=-1))
        / math.sqrt(d)
        / jnp.maximum(jnp.linalg.norm(diag, axis=-1), 1e-30)
    )


def ov_last_entry_ratio(ov) -> jax.Array:
    r"""``|OV[-1, -1]| / ||OV||_F`` per head (1 iff only the y -> output entry is non-zero).

    He et al. 2025: ``OV_h`` (maps a token ``z = (x, y)`` to the head's output) has only
    the entry from the input's ``y`` coordinate to the output (last) coordinate non-zero
    (ratio ~0.9999). The entry is ``mu_h`` (:func:`head_mu`).

    Args:
      ov: ``[..., m, d+1]`` with rows = output coordinates and columns = input
        coordinates (``m = d + 1`` for the full matrix, or ``m = 1`` for its read-out row
        when only the last output coordinate is used).

    Returns:
      ``[...]``.
    """
    m = jnp.asarray(ov, jnp.float32)
    if m.ndim < 2:
        raise ValueError(f"ov must have shape [..., m, d+1], got {m.shape}")
    return jnp.abs(m[..., -1, -1]) / jnp.maximum(jnp.linalg.norm(m, axis=(-2, -1)), 1e-30)


def ov_zero_sum_ratio(mu) -> jax.Array:
    r"""``|sum_h mu_h| / sum_h |mu_h|`` (0 = zero-sum heads, 1 = all heads one sign).

    He et al. 2025: with ``H >= 2`` the trained heads' OV entries cancel
    (``sum_h mu_h ~ 0``), which removes the softmax's bias term and turns the layer
    into a debiased GD step.

    Args:
      mu: ``[..., H]``.
    """
    m = jnp.asarray(mu, jnp.float32)
    return jnp.abs(jnp.sum(m, axis=-1)) / jnp.maximum(jnp.sum(jnp.abs(m), axis=-1), 1e-30)


def head_omega(kq, scale: float = 1.0) -> jax.Array:
    r"""``omega_h = scale * mean(diag(KQ_h))``: the KQ x-block read as ``omega_h I``.

    With ``scale`` the logit scale (``1/sqrt(d+1)`` for the He et al. model), ``omega_h`` is
    the effective coefficient in ``softmax_i(omega_h x_i^T x_q)``.

    Args:
      kq: ``[..., d, d]``. Returns ``[...]``.
    """
    m = jnp.asarray(kq, jnp.float32)
    return scale * jnp.mean(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)


def head_mu(ov) -> jax.Array:
    r"""``mu_h = OV_h[-1, -1]``: the y -> output entry. ``ov [..., m, d+1]`` -> ``[...]``."""
    return jnp.asarray(ov, jnp.float32)[..., -1, -1]


def icl_patterns(kq, ov, scale: float = 1.0) -> dict[str, jax.Array]:
    r"""All He et al. pattern metrics from per-head matrices.

    Args:
      kq: ``[H, d, d]``: each head's KQ x-block (rows key x, columns query x).
      ov: ``[H, m, d+1]``: each head's OV (rows output, columns input), or its read-out
        row (``m = 1``).
      scale: logit scale folded into ``omega``.

    Returns:
      dict: ``kq_diagonal_ratio``, ``kq_homogeneity``, ``ov_last_entry_ratio`` (``[H]``),
      ``ov_zero_sum_ratio`` (scalar), ``omega``, ``mu`` (``[H]``).
    """
    mu = head_mu(ov)
    return {
        "kq_diagonal_ratio": kq_diagonal_ratio(kq),
        "kq_homogeneity": kq_homogeneity(kq),
        "ov_last_entry_ratio": ov_last_entry_ratio(ov),
        "ov_zero_sum_ratio": ov_zero_sum_ratio(mu),
        "omega": head_omega(kq, scale),
        "mu": mu,
    }
