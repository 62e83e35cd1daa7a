"""jattn.linear.dplr_delta_rule (the diagonal-plus-low-rank transition, RWKV-7) against a float64
numpy loop, against the delta rule it generalises, and its chunk / recurrent forms and
gradients against the reference scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
from jattn.testing import assert_close
from tests.linear_inputs import np_start


def np_dplr(q, k, v, a, b, g, scale, S0=None):
    """Float64 loop: S = (diag(exp g) + a^T b) S + k^T v; o = scale q S (row vectors)."""
    q, k, v, a, b = (np.asarray(x, np.float64) for x in (q, k, v, a, b))
    B, T, H, K = q.shape
    g, S, o = np_start(q, v, g, S0)
    for t in range(T):
        for i in range(B):
            for h in range(H):
                decay = np.exp(g[i, t, h]) * np.ones(K)
                M = np.diag(decay) + np.outer(a[i, t, h], b[i, t, h])
                S[i, h] = M @ S[i, h] + np.outer(k[i, t, h], v[i, t, h])
                o[i, t, h] = scale * q[i, t, h] @ S[i, h]
    return o, S


def np_gated_delta(q, k, v, beta, g, scale, S0):
    """Float64 Gated DeltaNet / KDA loop: S' = exp(g) S; S = S' + beta k^T (v - k S')."""
    q, k, v, beta, g = (np.asarray(x, np.float64) for x in (q, k, v, beta, g))
    B, T, H, K = q.shape
    S = np.array(S0, np.float64)
    o = np.zeros(v.shape)
    for t in range(T):
        for i in range(B):
            for h in range(H):
                Sp = (np.exp(g[i, t, h]) * np.ones(K))[:, None] * S[i, h]
                kt = k[i, t, h]
                S[i, h] = Sp + beta[i, t, h] * np.outer(kt, v[i, t, h] - kt @ Sp)
                o[i, t, h] = scale * q[i, t, h] @ S[i, h]
    return o, S


def make(seed, B=2, T=37, H=2, K=8, V=6, gate="channel", dtype=jnp.float32):
    """Random inputs with a contracting transition (unit keys, small low-rank terms)."""
    rng = np.random.default_rng(seed)
    q, k, a, b = rng.standard_normal((4, B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    a, b = 0.3 * a / np.sqrt(K), 0.3 * b / np.sqrt(K)
    g = None
    if gate is not None:
        shape = (B, T, H, K) if gate == "channel" else (B, T, H)
        g = jnp.asarray(np.log(rng.uniform(0.6, 0.999, shape)), dtype)
    S0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v, a, b)), g, S0)


GATES = [None, "scalar", "channel"]


@pytest.mark.parametrize("gate", GATES)
def test_reference_matches_numpy_loop(gate):
    q, k, v, a, b, g, S0 = make(0, gate=gate)
    o, S = L.dplr_delta_rule(
        q, k, v, a, b, g=g, initial_state=S0, output_final_state=True, implementation="reference"
    )
    o_np, S_np = np_dplr(q, k, v, a, b, g, 8**-0.5, S0)
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")


def gated_delta_as_dplr(k, beta, g):
    """Gated DeltaNet / KDA in DPLR form (row vectors, S [K, V]):
    exp(g) S - beta k^T k (exp(g) * S) + beta k^T v, i.e. a = -beta k (the write direction,
    a column), b = exp(g) * k (the read direction: b S = k (exp(g) * S)), k_write = beta k."""
    decay = jnp.exp(g if g.ndim == 4 else g[..., None])
    return -beta[..., None] * k, decay * k, beta[..., None] * k


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("impl", ["reference", "recurrent", "chunk"])
def test_gated_deltanet_is_dplr(gate, impl):
    """API.md's mapping, both ways: vs delta_rule and vs an independent float64 loop."""
    q, k, v, _, _, g, S0 = make(1, T=45, gate=gate)
    beta = jnp.asarray(np.random.default_rng(1).uniform(0.05, 0.95, k.shape[:3]), jnp.float32)
    a, b, k_write = gated_delta_as_dplr(k, beta, g)
    o, S = L.dplr_delta_rule(q, k_write, v, a, b, g=g, initial_state=S0, output_final_state=True,
                             implementation=impl, chunk_size=16)
    o_d, S_d = L.delta_rule(q, k, v, beta, g=g, initial_state=S0, output_final_state=True,
                            implementation="reference")
    assert_close(o, o_d, name="o vs delta_rule")
    assert_close(S, S_d, name="S vs delta_rule")
    o_np, S_np = np_gated_delta(q, k, v, beta, g, 8**-0.5, S0)
    assert_close(o, o_np, name="o vs numpy")
    assert_close(S, S_np, name="S vs numpy")


def test_decay_belongs_on_the_read_side():
    """With per-channel gates, b = exp(g) k (decay on the read side) is KDA; putting it on the
    write side (a = -beta exp(g) k, b = k) is a different recurrence."""
    q, k, v, _, _, g, S0 = make(2, gate="channel")
    beta = jnp.full(k.shape[:3], 0.9, jnp.float32)
    decay = jnp.exp(g)
    o, _ = L.dplr_delta_rule(q, beta[..., None] * k, v, -beta[..., None] * decay * k, k, g=g,
                             initial_state=S0, implementation="reference")
    o_d, _ = L.delta_rule(q, k, v, beta, g=g, initial_state=S0, implementation="reference")
    assert float(jnp.max(jnp.abs(o - o_d))) > 1e-2


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_forms_match_reference(gate, impl):
    q, k, v, a, b, g, S0 = make(3, T=45, gate=gate)  # T = 45: not a multiple of the chunk
    kw = dict(g=g, initial_state=S0, output_final_state=True, chunk_size=16)
    o, S = L.dplr_delta_rule(q, k, v, a, b, implementation=impl, **kw)
    o_r, S_r = L.dplr_delta_rule(q, k, v, a, b, implementation="reference", **kw)
    assert_close(o, o_r, name="o")
    assert_close(S, S_r, name="S")


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_gradients_of_every_input_match_reference(gate):
    q, k, v, a, b, g, S0 = make(4, B=1, T=45, gate=gate)
    do = jnp.asarray(np.random.default_rng(5).standard_normal(v.shape), jnp.float32)
    dS = jnp.asarray(np.random.default_rng(6).standard_normal(S0.shape), jnp.float32)

    def grads(impl):
        def f(q, k, v, a, b, g, S0):
            o, S = L.dplr_delta_rule(q, k, v, a, b, g=g, initial_state=S0,
                                     output_final_state=True, chunk_size=16, implementation=impl)
            return jnp.sum(o * do) + jnp.sum(S * dS)

        return jax.jit(jax.grad(f, argnums=tuple(range(7))))(q, k, v, a, b, g, S0)

    names = ("dq", "dk", "dv", "da", "db", "dg", "dS0")
    for name, x, y in zip(names, grads("chunk"), grads("reference"), strict=True):
        assert_close(x, y, name=name, rtol=1e-4)


def test_step_matches_sequence():
    q, k, v, a, b, g, S0 = make(7, T=5, gate="channel")
    S = S0
    for t in range(5):
        o_t, S = L.dplr_delta_rule_step(q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], S,
                                        g_t=g[:, t])
    o, S_seq = L.dplr_delta_rule(q, k, v, a, b, g=g, initial_state=S0, output_final_state=True,
                                 implementation="reference")
    assert_close(o_t, o[:, -1], name="o_T")
    assert_close(S, S_seq, name="S_T")


def test_bf16_inputs_match_fp32_reference():
    q, k, v, a, b, g, S0 = make(8, T=40, gate="scalar")
    o_ref, _ = L.dplr_delta_rule(q, k, v, a, b, g=g, implementation="reference")
    cast = [x.astype(jnp.bfloat16) for x in (q, k, v, a, b)]
    o, _ = L.dplr_delta_rule(*cast, g=g, implementation="chunk", chunk_size=16)
    assert o.dtype == jnp.bfloat16
    assert_close(o, o_ref, dtype=jnp.bfloat16)


def test_none_on_cpu_is_the_reference_result():
    q, k, v, a, b, g, _ = make(9, T=8, gate=None)
    o, _ = L.dplr_delta_rule(q, k, v, a, b)
    assert_close(o, L.dplr_delta_rule(q, k, v, a, b, implementation="reference")[0])


def test_bad_shapes_raise():
    q, k, v, a, b, g, _ = make(10, T=8, gate=None)
    with pytest.raises(ValueError, match=r"b must have shape \[B, T, H, K\]"):
        L.dplr_delta_rule(q, k, v, a, b[..., :4])
    with pytest.raises(ValueError, match="log-decay"):
        L.dplr_delta_rule(q, k, v, a, b, g=jnp.ones(q.shape[:3]))
