"""jattn.linear.gla: reference vs a numpy loop, recurrent/chunk vs reference, grads, steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
from jattn.testing import assert_close
from tests.linear_inputs import gate_shape, random_log_decay, random_qkv


def np_gla(q, k, v, g, scale, S0=None):
    """Explicit float64 loop: S_t = exp(g_t)[:, None] S_{t-1} + k_t^T v_t, o_t = scale q_t S_t."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = np.zeros((B, H, K, V)) if S0 is None else np.array(S0, np.float64)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        gt = g[:, t] if g.ndim == 4 else g[:, t, :, None]
        for b in range(B):
            for h in range(H):
                S[b, h] = np.exp(gt[b, h])[:, None] * S[b, h] + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * q[b, t, h] @ S[b, h]
    return o, S


def make(seed, B, T, H, K, V, gate, strength, dtype=jnp.float32):
    """Inputs from numpy's RNG (jax.random would compile a sampler per shape)."""
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, B, T, H, K, V)
    g = random_log_decay(rng, gate_shape(gate, B, T, H, K), strength)
    S0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v, g)), S0)


@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_reference_matches_numpy_loop(gate):
    q, k, v, g, S0 = make(0, 2, 37, 2, 8, 12, gate, 2.0)
    o, S = L.gla(q, k, v, g, initial_state=S0, output_final_state=True, implementation="reference")
    o_np, S_np = np_gla(q, k, v, g, 8**-0.5, S0)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")


CASES = [  # (T, chunk_size, gate, strength): odd lengths, weak to very strong decay
    (63, 16, "channel", 0.05),
    (257, 64, "channel", 30.0),
    (100, 16, "channel", "const30"),
    (257, 64, "scalar", 30.0),
    (63, 16, "scalar", 0.05),
]


@pytest.mark.parametrize("T,chunk,gate,strength", CASES)
def test_chunk_matches_loop(T, chunk, gate, strength):
    q, k, v, g, S0 = make(1, 1, T, 2, 16, 8, gate, strength)
    o, S = L.gla(
        q,
        k,
        v,
        g,
        initial_state=S0,
        output_final_state=True,
        chunk_size=chunk,
        implementation="chunk",
    )
    assert o.shape == (1, T, 2, 8)
    o_np, S_np = np_gla(q, k, v, g, 0.25, S0)
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")


@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_recurrent_matches_reference(gate):
    q, k, v, g, S0 = make(11, 2, 63, 2, 8, 16, gate, 3.0)
    ref_o, ref_S = L.gla(
        q, k, v, g, initial_state=S0, output_final_state=True, implementation="reference"
    )
    o, S = L.gla(q, k, v, g, initial_state=S0, output_final_state=True, implementation="recurrent")
    assert_close(o, ref_o, name="o")
    assert_close(S, ref_S, name="S")


def test_strong_decay_forgets_everything_but_the_current_token():
    # g = -30 per step: S_t = k_t^T v_t up to e^-30, so o_t = scale (q_t . k_t) v_t.
    q, k, v, g, S0 = make(2, 1, 100, 2, 16, 8, "channel", "const30")  # shapes of CASES[2]
    o, S = L.gla(
        q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=16, implementation="chunk"
    )
    expected = 0.25 * jnp.sum(q * k, -1, keepdims=True) * v
    assert_close(o, expected, name="o")
    assert_close(S, k[:, -1, :, :, None] * v[:, -1, :, None, :], name="S")


@pytest.mark.parametrize(
    "gate,strength",
    [("channel", 1.0), pytest.param("scalar", 30.0, marks=pytest.mark.slow)],  # scalar: via delta
)
def test_gradients_match_reference(gate, strength):
    q, k, v, g, S0 = make(3, 1, 45, 2, 8, 8, gate, strength)
    rng = np.random.default_rng(9)
    w_o, w_S = rng.standard_normal((1, 45, 2, 8)), rng.standard_normal((1, 2, 8, 8))

    def loss(impl):
        def f(q, k, v, g, S0):
            o, S = L.gla(
                q,
                k,
                v,
                g,
                initial_state=S0,
                output_final_state=True,
                chunk_size=16,
                implementation=impl,
            )
            return jnp.sum(o * w_o) + jnp.sum(S * w_S)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, S0)

    names = ("dq", "dk", "dv", "dg", "dS0")
    for name, a, b in zip(names, loss("chunk"), loss("reference"), strict=True):
        assert_close(a, b, rtol=1e-4, name=name)


def test_bf16_inputs_fp32_state():
    q, k, v, g, S0 = make(4, 2, 100, 2, 16, 16, "channel", 1.0, dtype=jnp.bfloat16)
    o, S = L.gla(
        q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=32, implementation="chunk"
    )
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    ref_o, ref_S = L.gla(
        *f32, initial_state=S0, output_final_state=True, implementation="reference"
    )
    assert_close(o, ref_o, dtype=jnp.bfloat16, name="o")
    assert_close(S, ref_S, rtol=1e-5, name="S")  # state is fp32 from bf16-exact inputs


def test_step_reproduces_sequence_token_by_token():
    q, k, v, g, S0 = make(5, 2, 20, 2, 8, 12, "channel", 1.0)
    o_seq, S_seq = L.gla(q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=8)
    S, outs = S0, []
    step = jax.jit(L.gla_step)
    for t in range(20):
        o_t, S = step(q[:, t], k[:, t], v[:, t], g[:, t], S)
        outs.append(o_t)
    assert_close(jnp.stack(outs, 1), o_seq, name="o")
    assert_close(S, S_seq, name="S")
    o0, S1 = L.gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0, :, 0])  # state=None, scalar gate
    assert_close(S1, k[:, 0, :, :, None] * v[:, 0, :, None, :], name="first state")
    assert_close(o0, 8**-0.5 * jnp.sum(q[:, 0] * k[:, 0], -1, keepdims=True) * v[:, 0], name="o0")


def test_split_sequence_continues_from_state():
    q, k, v, g, S0 = make(6, 1, 90, 2, 8, 8, "channel", 0.5)
    o, S = np_gla(q, k, v, g, 8**-0.5, S0)
    o1, S1 = L.gla(
        q[:, :45], k[:, :45], v[:, :45], g[:, :45], initial_state=S0, output_final_state=True
    )
    o2, S2 = L.gla(
        q[:, 45:], k[:, 45:], v[:, 45:], g[:, 45:], initial_state=S1, output_final_state=True
    )
    assert_close(jnp.concatenate([o1, o2], 1), o, name="o")
    assert_close(S2, S, name="S")
    assert L.gla(q[:, :45], k[:, :45], v[:, :45], g[:, :45])[1] is None


def test_retnet_decay_matches_parallel_retention():
    # RetNet's parallel form: o = (Q K^T * D) V with D_nm = gamma^(n-m) for n >= m.
    B, T, H, K = 1, 50, 4, 8
    q, k, v, _, _ = make(7, B, T, H, K, K, "scalar", 1.0)
    decay = L.retnet_decay(H)
    gammas = 1 - 2.0 ** (-5 - np.arange(H))
    np.testing.assert_allclose(np.exp(np.asarray(decay)), gammas, rtol=1e-6)
    o, _ = L.gla(q, k, v, jnp.broadcast_to(decay, (B, T, H)), chunk_size=16)
    n = np.arange(T)
    D = np.where(
        n[:, None] >= n[None, :], gammas[:, None, None] ** (n[:, None] - n[None, :]), 0.0
    )  # [H, T, T]
    qk = np.einsum("bihk,bjhk->bhij", np.asarray(q, np.float64), np.asarray(k, np.float64))
    expected = np.einsum("bhij,bjhv->bihv", qk * D * K**-0.5, np.asarray(v, np.float64))
    assert_close(o, expected, name="o")


def test_lightning_decay_is_alibi_slopes():
    np.testing.assert_allclose(
        np.asarray(L.lightning_decay(8)), -(2.0 ** -np.arange(1, 9)), rtol=1e-6
    )
    last = L.lightning_decay(8, layer_idx=3, num_layers=4)
    assert np.all(np.asarray(last) > -1e-4) and np.all(np.asarray(last) < 0)
    assert L.lightning_decay(6).shape == (6,)


def test_default_implementation_and_pallas_dispatch(monkeypatch):
    import pallas_kernels
    from jattn.linear import _checks

    q, k, v, g, S0 = make(8, 1, 33, 2, 8, 8, "channel", 1.0)
    o_np, _ = np_gla(q, k, v, g, 8**-0.5)
    assert_close(L.gla(q, k, v, g)[0], o_np, name="default (chunk on CPU)")
    assert_close(L.gla(q, k, v, g, implementation="xla")[0], o_np, name="xla alias")

    calls = []

    def fake_kernel(*args, **kwargs):
        calls.append(kwargs)
        if kwargs["chunk_size"] == 7:
            raise NotImplementedError("chunk_size 7")
        return jnp.zeros_like(args[2]), jnp.ones_like(kwargs["initial_state"])

    monkeypatch.setattr(pallas_kernels, "chunk_gla", fake_kernel, raising=False)
    o, S = L.gla(q, k, v, g, initial_state=S0, output_final_state=True, implementation="pallas")
    assert calls[-1]["scale"] == pytest.approx(8**-0.5) and calls[-1]["initial_state"] is S0
    assert float(jnp.abs(o).max()) == 0.0 and float(S.min()) == 1.0
    with pytest.raises(NotImplementedError, match="chunk_size 7"):
        L.gla(q, k, v, g, chunk_size=7, implementation="pallas")
    assert L.gla(q, k, v, g)[0] is not None and len(calls) == 2  # CPU default: no kernel
    monkeypatch.setattr(_checks, "on_accelerator", lambda: True)
    assert_close(L.gla(q, k, v, g, chunk_size=7)[0], o_np, name="fallback to chunk")
    assert len(calls) == 3
    monkeypatch.delattr(pallas_kernels, "chunk_gla")
    with pytest.raises(NotImplementedError, match="chunk_gla"):
        L.gla(q, k, v, g, implementation="pallas")
    assert_close(L.gla(q, k, v, g, chunk_size=7)[0], o_np, name="missing kernel fallback")


@pytest.mark.slow
def test_pallas_interpret_matches_reference():
    import pallas_kernels

    if not hasattr(pallas_kernels, "chunk_gla"):
        pytest.skip("pallas_kernels.chunk_gla not available")
    for gate in ("channel", "scalar"):
        q, k, v, g, S0 = make(8, 1, 40, 2, 16, 8, gate, 3.0)
        o, S = L.gla(
            q,
            k,
            v,
            g,
            initial_state=S0,
            output_final_state=True,
            chunk_size=16,
            implementation="pallas",
        )
        o_np, S_np = np_gla(q, k, v, g, 0.25, S0)
        assert_close(o, o_np, rtol=1e-4, name="pallas o")
        assert_close(S, S_np, rtol=1e-4, name="pallas S")


def test_jit_and_short_sequences():
    q, k, v, g, S0 = make(9, 2, 5, 2, 8, 4, "scalar", 1.0)
    f = jax.jit(lambda *a: L.gla(*a, output_final_state=True, chunk_size=64))
    o, S = f(q, k, v, g)
    o_np, S_np = np_gla(q, k, v, g, 8**-0.5)
    assert_close(o, o_np, name="o")
    assert_close(S, S_np, name="S")
