"""Shared oracle for the jattn.variants tests: inputs, dense NumPy float64 pieces, and a check
of forward and gradients (a directional derivative by central differences in float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import masks as M
from jattn.testing import assert_close

B, T, HQ, HKV, D = 2, 21, 4, 2, 8
# tiny programs: XLA's backend optimizations cost more compile time than they save
FAST_COMPILE = {"xla_backend_optimization_level": 0}
BLOCKS = {"block_q": 8, "block_kv": 4}  # T = 21: padding rows/columns and several tiles


def qkv(seed=0, scale=1.5):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (scale * jax.random.normal(ks[0], (B, T, HQ, D)),
            jax.random.normal(ks[1], (B, T, HKV, D)), jax.random.normal(ks[2], (B, T, HKV, D)))


def dense_visible(mask) -> np.ndarray:
    """``[1|B, 1|H, T, T]`` bool of a Mask or bool array."""
    if isinstance(mask, M.Mask):
        return np.asarray(mask.dense(T, T))[None, None]
    return np.asarray(mask)


def np_scores(q, k):
    k = np.repeat(np.asarray(k, np.float64), HQ // HKV, axis=2)
    return np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k) / np.sqrt(D)


def np_softmax(x, vis):
    x = np.where(vis, x, -np.inf)
    m = np.max(x, -1, keepdims=True)
    e = np.where(vis, np.exp(x - np.where(np.isfinite(m), m, 0)), 0.0)
    z = e.sum(-1, keepdims=True)
    return e / np.where(z > 0, z, 1)


def np_out(p, v):
    return np.einsum("bhqk,bkhd->bqhd", p, np.repeat(np.asarray(v, np.float64), HQ // HKV, 2))


def check_against_formula(fn, formula, mask, impl, seed=0, args=None, extra=None, blocks=None):
    """Forward vs ``formula`` (float64) and the gradient's directional derivative (w.r.t. every
    array in ``args``, default ``qkv(seed)``) vs central differences of ``formula``; returns
    the gradients for cross-implementation checks. ``fn(*args, mask=, implementation=,
    **blocks, **extra)``; ``formula(*args_float64, vis)``."""
    args = tuple(qkv(seed) if args is None else args)
    extra = extra or {}
    vis = dense_visible(mask)
    out_shape = jax.eval_shape(lambda *a: fn(*a, mask=mask, implementation="reference",
                                             **extra), *args).shape
    w = np.asarray(jax.random.normal(jax.random.key(seed + 7), out_shape), np.float64)
    blocks = (blocks or BLOCKS) if impl == "xla" else {}

    def run(*a):
        return fn(*a, mask=mask, implementation=impl, **blocks, **extra)

    def loss(*a):
        out = run(*a)
        return jnp.sum(jnp.asarray(w, jnp.float32) * out), out

    # one compile: the forward comes back as the auxiliary output of the gradient
    grads, out = jax.jit(jax.grad(loss, tuple(range(len(args))), has_aux=True),
                         compiler_options=FAST_COMPILE)(*args)
    assert_close(out, formula(*args, vis), rtol=1e-5, name=f"{impl} forward")
    dirs = [np.asarray(jax.random.normal(jax.random.key(seed + n), np.shape(x)), np.float64)
            for n, x in enumerate(args)]
    x64 = [np.asarray(x, np.float64) for x in args]
    eps = 1e-6
    plus = [x + eps * d for x, d in zip(x64, dirs, strict=True)]
    minus = [x - eps * d for x, d in zip(x64, dirs, strict=True)]
    numeric = (np.sum(w * formula(*plus, vis)) - np.sum(w * formula(*minus, vis))) / (2 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d))
                   for g, d in zip(grads, dirs, strict=True))
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (analytic, numeric)
    return grads


MASKS = {
    "causal": M.causal(),
    "window5": M.sliding_window(5),
    "dense": np.asarray(jax.random.bernoulli(jax.random.key(3), 0.6, (B, 1, T, T))),
}

# the window mask repeats what causal and dense cover: on demand (pytest -m slow)
MASK_PARAMS = ["causal", pytest.param("window5", marks=pytest.mark.slow), "dense"]
