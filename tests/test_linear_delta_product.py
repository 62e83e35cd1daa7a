"""jattn.linear.delta_product (DeltaProduct, Siems et al. 2025) against a float64 numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
from jattn.testing import assert_close


def np_delta_product(q, k, v, beta, g, n_h, scale, S0):
    """Float64 loop: per token, decay once, then n_h Householder steps; o after the last."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    g = np.zeros((B, T, H)) if g is None else np.asarray(g, np.float64)
    S = np.array(S0, np.float64)
    o = np.zeros((B, T, H, v.shape[-1]))
    for t in range(T):
        for i in range(B):
            for h in range(H):
                S[i, h] = (np.exp(g[i, t, h]) * np.ones(K))[:, None] * S[i, h]
                for j in range(n_h):
                    kj, vj, bj = k[i, t * n_h + j, h], v[i, t * n_h + j, h], beta[i, t * n_h + j, h]
                    S[i, h] = S[i, h] - bj * np.outer(kj, kj @ S[i, h]) + bj * np.outer(kj, vj)
                o[i, t, h] = scale * q[i, t, h] @ S[i, h]
    return o, S


def make(seed, n_h, gate, B=2, T=21, H=2, K=8, V=6):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T * n_h, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T * n_h, H, V))
    beta = rng.uniform(0.05, 1.95, (B, T * n_h, H))  # negative eigenvalues too (beta > 1)
    g = None
    if gate is not None:
        g = np.log(rng.uniform(0.6, 0.999, (B, T, H, K) if gate == "channel" else (B, T, H)))
    S0 = rng.standard_normal((B, H, K, V))
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
    return tuple(f32(x) for x in (q, k, v, beta, g, S0))


@pytest.mark.parametrize("n_h,gate", [(1, None), (2, None), (3, "scalar"), (2, "channel")])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_matches_numpy_loop(n_h, gate, impl):
    q, k, v, beta, g, S0 = make(0, n_h, gate)
    o, S = L.delta_product(q, k, v, beta, num_householder=n_h, g=g, initial_state=S0,
                           output_final_state=True, chunk_size=16, implementation=impl)
    o_np, S_np = np_delta_product(q, k, v, beta, g, n_h, 8**-0.5, S0)
    assert o.shape == q.shape[:3] + (v.shape[-1],)
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")


def test_gradients_chunk_match_reference():
    q, k, v, beta, g, S0 = make(1, 2, "scalar", B=1)

    def grads(impl):
        def f(q, k, v, beta, g, S0):
            o, S = L.delta_product(q, k, v, beta, num_householder=2, g=g, initial_state=S0,
                                   output_final_state=True, chunk_size=16, implementation=impl)
            return jnp.sum(o * o) + jnp.sum(S)

        return jax.jit(jax.grad(f, argnums=tuple(range(6))))(q, k, v, beta, g, S0)

    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "dS0"), grads("chunk"),
                          grads("reference"), strict=True):
        assert_close(a, b, rtol=1e-4, name=name)


def test_segments_restart_per_token():
    q, k, v, beta, g, S0 = make(2, 2, "scalar", B=1, T=12)
    seg = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
    o, _ = L.delta_product(q, k, v, beta, num_householder=2, g=g, initial_state=S0,
                           segment_ids=seg, chunk_size=8)
    o_a, _ = L.delta_product(q[:, :5], k[:, :10], v[:, :10], beta[:, :10], num_householder=2,
                             g=g[:, :5], initial_state=S0)
    o_b, _ = L.delta_product(q[:, 5:], k[:, 10:], v[:, 10:], beta[:, 10:], num_householder=2,
                             g=g[:, 5:])
    assert_close(o, jnp.concatenate([o_a, o_b], axis=1))


def test_bad_shapes_raise():
    q, k, v, beta, g, S0 = make(3, 2, None, T=4)
    with pytest.raises(ValueError, match="T \\* num_householder"):
        L.delta_product(q, k[:, :4], v, beta, num_householder=2)
    with pytest.raises(ValueError, match="num_householder must be a positive int"):
        L.delta_product(q, k, v, beta, num_householder=0)
