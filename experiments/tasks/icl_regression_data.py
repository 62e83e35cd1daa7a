"""In-context linear regression data and its closed-form baselines (He, Pan, Chen, Yang 2025):
the seeded example stream, the one-step GD / debiased-GD risks and steps, and the ridge, GD,
debiased-GD and kernel predictors (the task is :mod:`experiments.tasks.icl_regression`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- data
def make_examples(
    key: jax.Array, index: jax.Array, length: int, dim: int, noise_var: float
) -> dict[str, jax.Array]:
    """Examples ``index [N]`` of the stream ``key``: each a function of ``(key, i)`` only.

    Returns ``x [N, L, d]``, ``y [N, L]``, ``xq [N, d]``, ``yq [N]``, ``beta [N, d]`` (fp32) with
    ``beta ~ N(0, I/d)``, ``x ~ N(0, I)``, ``y = beta^T x + N(0, noise_var)``.
    """

    def one(i):
        kx, kb, ke, kq, keq = jax.random.split(jax.random.fold_in(key, i), 5)
        x = jax.random.normal(kx, (length, dim))
        beta = jax.random.normal(kb, (dim,)) / math.sqrt(dim)
        sd = math.sqrt(noise_var)
        y = x @ beta + sd * jax.random.normal(ke, (length,))
        xq = jax.random.normal(kq, (dim,))
        yq = xq @ beta + sd * jax.random.normal(keq, ())
        return {"x": x, "y": y, "xq": xq, "yq": yq, "beta": beta}

    return jax.vmap(one)(jnp.asarray(index, jnp.uint32))


def stream_key(seed: int, stream: int) -> jax.Array:
    """The PRNG key of a data stream (train = 0, eval = 1) of run seed ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), stream)


# ----------------------------------------------------------------------------- baselines
def gd_step(length: int, dim: int, noise_var: float) -> float:
    """Optimal one-step GD step at length ``L``: ``L / (L + 1 + d(1 + sigma^2))``."""
    return length / (length + 1 + dim * (1 + noise_var))


def gd_risk(n: int, eta: float, dim: int, noise_var: float) -> float:
    """Closed-form risk of ``eta/n sum_i y_i x_i^T x_q`` at length ``n`` (E||beta||^2 = 1)."""
    return 1 + noise_var - 2 * eta + eta**2 * (1 + (1 + dim * (1 + noise_var)) / n)


def debiased_gd_step(length: int, dim: int, noise_var: float) -> float:
    """Optimal debiased-GD step at length ``L``: ``L / (L + d(1 + sigma^2))``."""
    return length / (length + dim * (1 + noise_var))


def debiased_gd_risk(n: int, eta: float, dim: int, noise_var: float) -> float:
    """Closed-form risk of ``eta/n sum_i y_i (x_i - xbar)^T x_q`` at length ``n``."""
    a = dim * (1 + noise_var)
    return 1 + noise_var - 2 * eta * (n - 1) / n + eta**2 * (n - 1) * (n + a) / n**2


def baseline_predictions(
    ex: dict[str, jax.Array], *, train_length: int, dim: int, noise_var: float
) -> dict[str, jax.Array]:
    """Predictions ``[N]`` of every baseline on examples ``ex`` (any length)."""
    x, y, xq = ex["x"], ex["y"], ex["xq"]
    n = x.shape[1]
    gram = jnp.einsum("nli,nlj->nij", x, x) + noise_var * dim * jnp.eye(dim)
    beta = jnp.linalg.solve(gram, jnp.einsum("nli,nl->ni", x, y)[..., None])[..., 0]
    xy = jnp.einsum("nl,nli->ni", y, x) / n
    xy_centred = xy - jnp.mean(y, axis=1, keepdims=True) * jnp.mean(x, axis=1)
    omega = 1 / math.sqrt(dim)
    mu = math.sqrt(dim) / (1 + (1 + noise_var) * math.e * dim / train_length)
    p = jax.nn.softmax(omega * jnp.einsum("nli,ni->nl", x, xq), axis=-1)
    return {
        "ridge": jnp.einsum("ni,ni->n", beta, xq),
        "gd": gd_step(train_length, dim, noise_var) * jnp.einsum("ni,ni->n", xy, xq),
        "debiased_gd": debiased_gd_step(train_length, dim, noise_var)
        * jnp.einsum("ni,ni->n", xy_centred, xq),
        "kernel": mu * jnp.sum(p * y, axis=-1),
    }
