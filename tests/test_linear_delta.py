"""jattn.linear.delta_rule (DeltaNet / Gated DeltaNet / KDA) against an explicit numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
from jattn.testing import assert_close
from tests.linear_inputs import gate_shape, np_start, random_log_decay, random_qkv


def np_l2norm(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def np_delta(q, k, v, beta, g, scale, S0=None, l2norm=False):
    """Float64 loop: S' = exp(g) S; S = S' + beta k^T (v - k S'); o = scale q S."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    if l2norm:
        q, k = np_l2norm(q), np_l2norm(k)
    B, T, H, K = q.shape
    g, S, o = np_start(q, v, g, S0)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                decay = np.exp(g[b, t, h])
                Sp = (decay[:, None] if decay.ndim else decay) * S[b, h]
                kt = k[b, t, h]
                S[b, h] = Sp + beta[b, t, h] * np.outer(kt, v[b, t, h] - kt @ Sp)
                o[b, t, h] = scale * q[b, t, h] @ S[b, h]
    return o, S


def delta_rule_with_state(q, k, v, beta, g, S0, **kw):
    """``L.delta_rule`` with gate ``g``, initial state ``S0``, the final state returned and
    l2-normalized q/k: the call most tests here make."""
    return L.delta_rule(
        q, k, v, beta, g=g, initial_state=S0, output_final_state=True, use_qk_l2norm=True, **kw
    )


def make(seed, B, T, H, K, V, gate, strength, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, B, T, H, K, V)
    beta = rng.uniform(0.05, 0.95, (B, T, H))
    if gate is None:
        g = None
    else:
        g = jnp.asarray(random_log_decay(rng, gate_shape(gate, B, T, H, K), strength), dtype)
    S0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v, beta)), g, S0)


@pytest.mark.parametrize("gate", [None, "scalar", "channel"])
def test_reference_matches_numpy_loop(gate):
    q, k, v, beta, g, S0 = make(0, 2, 37, 2, 8, 12, gate, 1.0)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)  # beta |k|^2 < 2 (stable), no l2norm
    o, S = L.delta_rule(
        q, k, v, beta, g=g, initial_state=S0, output_final_state=True, implementation="reference"
    )
    o_np, S_np = np_delta(q, k, v, beta, g, 8**-0.5, S0)
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")


CASES = [  # (T, chunk_size, gate, strength)
    (63, 16, None, None),
    (257, 64, "scalar", 30.0),
    (100, 16, "channel", "const30"),
    (100, 32, "channel", 3.0),
]


@pytest.mark.parametrize("T,chunk,gate,strength", CASES)
def test_chunk_matches_loop(T, chunk, gate, strength):
    q, k, v, beta, g, S0 = make(1, 1, T, 2, 16, 8, gate, strength)
    o, S = delta_rule_with_state(q, k, v, beta, g, S0, chunk_size=chunk, implementation="chunk")
    o_np, S_np = np_delta(q, k, v, beta, g, 0.25, S0, l2norm=True)
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")


def test_recurrent_matches_reference():
    q, k, v, beta, g, S0 = make(2, 2, 63, 2, 8, 16, "channel", 1.0)
    kw = dict(g=g, initial_state=S0, output_final_state=True, use_qk_l2norm=True)
    ref_o, ref_S = L.delta_rule(q, k, v, beta, implementation="reference", **kw)
    o, S = L.delta_rule(q, k, v, beta, implementation="recurrent", **kw)
    assert_close(o, ref_o, name="o")
    assert_close(S, ref_S, name="S")


def test_gradients_match_reference():
    q, k, v, beta, g, S0 = make(3, 1, 45, 2, 8, 8, "scalar", 2.0)  # channel grads: test_gla
    rng = np.random.default_rng(4)
    w_o, w_S = rng.standard_normal((1, 45, 2, 8)), rng.standard_normal((1, 2, 8, 8))

    def grads(impl):
        def f(q, k, v, beta, g, S0):
            o, S = delta_rule_with_state(q, k, v, beta, g, S0, chunk_size=16, implementation=impl)
            return jnp.sum(o * w_o) + jnp.sum(S * w_S)

        return jax.jit(jax.grad(f, argnums=tuple(range(6))))(q, k, v, beta, g, S0)

    names = ("dq", "dk", "dv", "dbeta", "dg", "dS0")
    for name, a, b in zip(names, grads("chunk"), grads("reference"), strict=True):
        assert_close(a, b, rtol=1e-4, name=name)


def test_bf16_inputs_fp32_state():
    q, k, v, beta, g, S0 = make(5, 2, 100, 2, 16, 16, "scalar", 1.0, dtype=jnp.bfloat16)
    o, S = delta_rule_with_state(q, k, v, beta, g, S0, chunk_size=32)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    o_np, S_np = np_delta(q, k, v, beta, g, 0.25, S0, l2norm=True)
    assert_close(o, o_np, dtype=jnp.bfloat16, name="o")
    assert_close(S, S_np, rtol=1e-4, name="S")


def test_step_reproduces_sequence_token_by_token():
    q, k, v, beta, g, S0 = make(6, 2, 12, 2, 8, 8, "scalar", 0.5)
    o_seq, S_seq = delta_rule_with_state(q, k, v, beta, g, S0, chunk_size=16)
    step = jax.jit(
        lambda q, k, v, b, g, S: L.delta_rule_step(q, k, v, b, S, g_t=g, use_qk_l2norm=True)
    )
    S, outs = S0, []
    for t in range(12):
        o_t, S = step(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], S)
        outs.append(o_t)
    assert_close(jnp.stack(outs, 1), o_seq, name="o")
    assert_close(S, S_seq, name="S")


def test_delta_rule_overwrites_the_value_of_a_repeated_key():
    # Orthonormal keys, beta = 1: writing (e0, a), (e1, b), (e0, c) leaves S = e0^T c + e1^T b,
    # where plain linear attention would hold e0^T (a + c) + e1^T b.
    K = V = 4
    e = np.eye(K)
    k = jnp.asarray(np.stack([e[0], e[1], e[0]])[None, :, None, :], jnp.float32)
    vals = np.random.default_rng(7).standard_normal((3, V))
    v = jnp.asarray(vals[None, :, None, :], jnp.float32)
    beta = jnp.ones((1, 3, 1))
    o, S = L.delta_rule(k, k, v, beta, scale=1.0, output_final_state=True)
    expected = np.outer(e[0], vals[2]) + np.outer(e[1], vals[1])
    assert_close(S[0, 0], expected, name="S")
    assert_close(o[0, :, 0], vals, name="reads back the value just written")


def test_pallas_dispatch(monkeypatch):
    import pallas_kernels

    q, k, v, beta, g, S0 = make(9, 1, 20, 2, 8, 8, "scalar", 1.0)
    seen = {}

    def fake_kernel(q, k, v, beta, **kw):
        seen.update(kw, q=q, k=k)
        return jnp.zeros_like(v), None

    monkeypatch.setattr(pallas_kernels, "chunk_delta_rule", fake_kernel, raising=False)
    o, _ = L.delta_rule(q, k, v, beta, g=g, use_qk_l2norm=True, implementation="pallas")
    assert float(jnp.abs(o).max()) == 0.0 and seen["g"] is g
    assert_close(jnp.linalg.norm(seen["k"], axis=-1), jnp.ones((1, 20, 2)), name="|k|")
    monkeypatch.delattr(pallas_kernels, "chunk_delta_rule")
    with pytest.raises(NotImplementedError, match="chunk_delta_rule"):
        L.delta_rule(q, k, v, beta, use_qk_l2norm=True, implementation="pallas")


@pytest.mark.slow
def test_pallas_interpret_matches_loop():
    import pallas_kernels

    if not hasattr(pallas_kernels, "chunk_delta_rule"):
        pytest.skip("pallas_kernels.chunk_delta_rule not available")
    for gate in (None, "scalar", "channel"):
        q, k, v, beta, g, S0 = make(10, 1, 40, 2, 16, 8, gate, 3.0)
        o, S = delta_rule_with_state(q, k, v, beta, g, S0, chunk_size=16, implementation="pallas")
        o_np, S_np = np_delta(q, k, v, beta, g, 0.25, S0, l2norm=True)
        assert_close(o, o_np, rtol=1e-4, name="pallas o")
        assert_close(S, S_np, rtol=1e-4, name="pallas S")
