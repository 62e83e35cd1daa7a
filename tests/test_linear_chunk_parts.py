"""The chunk backbone's building blocks against plain formulas: the sub-chunked per-channel
score matrices (``jattn.linear.chunk_scores.gated_scores``, hand-written gradient) against the
per-entry masked ``exp(G_i - G_j)`` product (values in float64, gradients by autodiff of the
per-entry form), including strong gates where any ``exp(-G)`` factoring overflows; the
blockwise triangular solve (``jattn.linear.solve_tril``) against numpy; gradients of the
per-channel chunk forms under strong gates; log-linear attention over many chunk levels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.linear.chunk_scores import gated_scores
from jattn.testing import assert_close

jax.config.update("jax_enable_x64", False)


def _np_scores(x, y, G):
    """Float64 ``A[r, s, l, i, j] = sum_k x_ik y_jk exp(G_ik - G_jk)``, ``j <= i``."""
    x, y, G = (np.asarray(a, np.float64) for a in (x, y, G))
    C = G.shape[-2]
    d = G[:, :, None, :] - G[:, None, :, :]
    causal = np.tril(np.ones((C, C), bool))[None, :, :, None]
    e = np.where(causal, np.exp(np.where(causal, d, 0.0)), 0.0)
    return np.einsum("rlik,sljk,lijk->rslij", x, y, e)


def _jnp_scores(x, y, G):
    """The same formula in jnp (fp32), exponents masked before ``exp``."""
    C = G.shape[-2]
    causal = jnp.tril(jnp.ones((C, C), bool))[None, :, :, None]
    e = jnp.exp(jnp.where(causal, G[:, :, None, :] - G[:, None, :, :], -jnp.inf))
    return jnp.einsum("rlik,sljk,lijk->rslij", x, y, e)


def _inputs(C, g_low, seed=0, L=3, K=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, L, C, K)).astype(np.float32)
    y = rng.standard_normal((2, L, C, K)).astype(np.float32)
    g = -rng.uniform(0.0, g_low, (L, C, K))
    return x, y, np.cumsum(np.maximum(g, -110.0), axis=1).astype(np.float32)


@pytest.mark.parametrize("C, g_low", [(64, 0.2), (12, 3.0), (16, 60.0), (7, 1.0)])
def test_gated_scores_match_the_per_entry_product(C, g_low):
    """Chunk sizes with 8 / 3 / 4 / 1 (prime: a single sub-chunk) steps per sub-chunk; strong
    gates (up to -60 per step: ``exp(-G)`` would overflow fp32 after two steps)."""
    x, y, G = _inputs(C, g_low)
    W = np.random.default_rng(1).standard_normal((2, 2, 3, C, C)).astype(np.float32)
    f = jax.jit(gated_scores)
    assert_close(f(x, y, G), _np_scores(x, y, G), rtol=1e-5, name="scores")

    # Gradients against autodiff of the per-entry formula (no factoring, no custom rule).
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(gated_scores(*a) * W), argnums=(0, 1, 2)))
    want = jax.jit(jax.grad(lambda *a: jnp.sum(_jnp_scores(*a) * W), argnums=(0, 1, 2)))
    for name, got, exp in zip(("dx", "dy", "dG"), grads(x, y, G), want(x, y, G), strict=True):
        assert np.all(np.isfinite(np.asarray(got))), name
        assert_close(got, exp, rtol=1e-5, name=name)


@pytest.mark.parametrize("C, D, scale", [(64, 5, 0.3), (48, 3, 1.0), (7, 2, 0.5)])
def test_unit_lower_solve_matches_numpy(C, D, scale):
    """Blockwise solve (16 x 16 diagonal blocks, then matmuls; 7: one 7 x 7 block) against
    numpy's dense solves in float64, values and both gradients; upper entries are ignored."""
    from jattn.linear.solve_tril import unit_lower_solve

    rng = np.random.default_rng(C)
    N = (scale * rng.standard_normal((2, C, C))).astype(np.float32)
    R = rng.standard_normal((2, C, D)).astype(np.float32)
    L = np.eye(C) + np.tril(np.asarray(N, np.float64), -1)
    assert_close(jax.jit(unit_lower_solve)(N, R), np.linalg.solve(L, R), rtol=1e-5)

    W = rng.standard_normal((2, C, D)).astype(np.float32)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(unit_lower_solve(*a) * W), argnums=(0, 1)))(N, R)
    # float64: X = L^{-1} R, so dR = L^{-T} W and dN = -(dR X^T) below the diagonal.
    X = np.linalg.solve(L, R)
    dR = np.linalg.solve(L.transpose(0, 2, 1), W)
    dN = -np.tril(dR @ X.transpose(0, 2, 1), -1)
    for name, g, w in zip(("dN", "dR"), got, (dN, dR), strict=True):
        assert_close(g, w, rtol=1e-4, name=name)


@pytest.mark.parametrize("form", ["gla", "kda", "dplr"])
def test_chunk_gradients_stay_finite_under_strong_gates(form):
    """Per-channel log-gates down to -1000 and full resets (-inf): every gradient of the chunk
    form is finite and matches the reference scan's (fla's tracker: NaN gradients there)."""
    import jattn.linear as jl

    rng = np.random.default_rng(7)
    B, T, H, K = 1, 40, 2, 4
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -rng.uniform(0, 1, (B, T, H, K)) * np.where(rng.uniform(size=(B, T, H, K)) < 0.5,
                                                     1e3, 1e-2)
    g = jnp.asarray(np.where(rng.uniform(size=g.shape) < 0.05, -np.inf, g), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 1.0, (B, T, H)), jnp.float32)

    def run(impl, q, k, v, g):
        if form == "gla":
            o, _ = jl.gla(q, k, v, g, chunk_size=16, implementation=impl)
        elif form == "kda":
            o, _ = jl.delta_rule(q, k, v, beta, g=g, chunk_size=16, implementation=impl)
        else:
            o, _ = jl.dplr_delta_rule(q, k, v, -0.5 * k, k, g=g, chunk_size=16,
                                      implementation=impl)
        return jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape))

    got = jax.jit(jax.grad(lambda *a: run("chunk", *a), argnums=(0, 1, 2, 3)))(q, k, v, g)
    want = jax.jit(jax.grad(lambda *a: run("reference", *a), argnums=(0, 1, 2, 3)))(q, k, v, g)
    for name, a, b in zip("qkvg", got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(a))), name
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=f"d{name}")


@pytest.mark.parametrize("per_channel", [True, False])
def test_loglinear_chunk_levels_match_the_reference(per_channel):
    """Seven chunk levels over 75 chunks (not a power of two), values and every gradient,
    against the quadratic masked reference."""
    import jattn.linear as jl

    rng = np.random.default_rng(5)
    B, T, H, K = 1, 300, 1, 3
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(3))
    gshape = (B, T, H, K) if per_channel else (B, T, H)
    g = jnp.asarray(np.log(rng.uniform(0.8, 1.0, gshape)), jnp.float32)
    lam = jnp.asarray(rng.uniform(0.5, 1.5, (B, T, H, jl.loglinear.num_levels(T))), jnp.float32)
    w = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)

    def loss(impl, *xs):
        return jnp.sum(jl.loglinear_gla(*xs, chunk_size=4, implementation=impl) * w)

    args = (q, k, v, g, lam)
    assert_close(jl.loglinear_gla(*args, chunk_size=4), jl.loglinear_gla(
        *args, implementation="reference"), rtol=1e-5)
    got = jax.jit(jax.grad(lambda *a: loss("chunk", *a), argnums=range(5)))(*args)
    want = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=range(5)))(*args)
    for name, a, b in zip(("q", "k", "v", "g", "lam"), got, want, strict=True):
        assert_close(a, b, rtol=1e-4, name=f"d{name}")
