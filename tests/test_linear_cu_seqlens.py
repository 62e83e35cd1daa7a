"""``cu_seqlens`` (flash-linear-attention's packed documents, ``B = 1``) on ``gla``,
``delta_rule``, ``dplr_delta_rule`` and ``linear_attention``: equal to running each document
separately from its own initial state, including the per-document final states and the
gradients of every input and of the initial states; no recompilation when the offsets move;
errors that name ``cu_seqlens``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
from jattn.testing import assert_close

T, H, K, V = 40, 2, 8, 6
LENGTHS = [7, 0, 12, 21]  # an empty document too (its final state is its initial state)
CU = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
N = len(LENGTHS)


def inputs(seed, gate):
    rng = np.random.default_rng(seed)
    q, k, kh = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((3, 1, T, H, K)))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    kh = kh / jnp.linalg.norm(kh, axis=-1, keepdims=True)
    icl = jnp.asarray(rng.uniform(0.1, 0.9, (1, T, H, 1)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, T, H, V)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.05, 0.95, (1, T, H)), jnp.float32)
    g = None
    if gate is not None:
        shape = (1, T, H, K) if gate == "channel" else (1, T, H)
        g = jnp.asarray(np.log(rng.uniform(0.5, 0.999, shape)), jnp.float32)
    S0 = jnp.asarray(rng.standard_normal((N, H, K, V)), jnp.float32)
    return dict(q=q, k=k, v=v, a=-icl * kh, b=kh, beta=beta, g=g), S0


def _gla(x, S0, cu, impl):
    return L.gla(x["q"], x["k"], x["v"], x["g"], initial_state=S0, output_final_state=True,
                 cu_seqlens=cu, implementation=impl, chunk_size=16)


def _delta(x, S0, cu, impl):
    return L.delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], initial_state=S0,
                        output_final_state=True, cu_seqlens=cu, implementation=impl,
                        use_qk_l2norm=True, chunk_size=16)


def _dplr(x, S0, cu, impl):
    return L.dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], g=x["g"], initial_state=S0,
                             output_final_state=True, cu_seqlens=cu, implementation=impl,
                             chunk_size=16)


def _linear(x, S0, cu, impl):
    state = L.LinearAttentionState(S0, jnp.abs(S0[..., 0]) + 1.0)
    o, st = L.linear_attention(x["q"], x["k"], x["v"], feature_map="elu1", initial_state=state,
                               output_final_state=True, cu_seqlens=cu, implementation=impl,
                               chunk_size=16)
    return o, jnp.concatenate([st.kv, st.z[..., None]], axis=-1)


CASES = {  # name -> (function, gate kind, differentiable inputs)
    "gla_channel": (_gla, "channel", "q k v g"),
    "delta_scalar": (_delta, "scalar", "q k v beta g"),
    "dplr_channel": (_dplr, "channel", "q k v a b g"),
    "linear_elu": (_linear, None, "q k v"),
}


def run_separately(fn, x, S0, lengths):
    """Each document alone (B = 1, its own initial state): concatenated o, stacked states."""
    outs, states, start = [], [], 0
    for n, length in enumerate(lengths):
        piece = {name: None if val is None else val[:, start:start + length]
                 for name, val in x.items()}
        if fn is _linear:
            state = L.LinearAttentionState(S0[n:n + 1], jnp.abs(S0[n:n + 1, ..., 0]) + 1.0)
            o, st = L.linear_attention(piece["q"], piece["k"], piece["v"], feature_map="elu1",
                                       initial_state=state, output_final_state=True,
                                       implementation="reference")
            S = jnp.concatenate([st.kv, st.z[..., None]], axis=-1)
        else:
            o, S = fn(piece, S0[n:n + 1], None, "reference")
        outs.append(o)
        states.append(S[0])
        start += length
    return jnp.concatenate(outs, axis=1), jnp.stack(states)


def _loss(o, S):
    return jnp.sum(o * jnp.sin(o)) + 0.3 * jnp.sum(S * jnp.cos(S))


@pytest.mark.parametrize("impl", ["chunk", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cu_seqlens_equals_separate_documents(case, impl):
    fn, gate, names = CASES[case]
    names = names.split()
    x, S0 = inputs(0, gate)
    cu = jnp.asarray(CU)

    def grads(vals, S0):
        def loss(vals, S0, packed):
            xs = {**x, **dict(zip(names, vals, strict=True))}
            res = fn(xs, S0, cu, impl) if packed else run_separately(fn, xs, S0, LENGTHS)
            return _loss(*res), res

        return [jax.grad(loss, argnums=(0, 1), has_aux=True)(vals, S0, p) for p in (True, False)]

    ((dx, dS0), (o, S)), ((dx_w, dS0_w), (o_w, S_w)) = jax.jit(grads)([x[n] for n in names], S0)
    assert S.shape == (N, H, K, S.shape[-1])
    assert_close(o, o_w, name="o")
    assert_close(S, S_w, name="final states")
    for name, a, b in zip(names, dx, dx_w, strict=True):
        assert_close(a, b, rtol=1e-4, name=f"d{name}")
    assert_close(dS0, dS0_w, rtol=1e-4, name="d initial_state")


@pytest.mark.parametrize("case", ["gla_channel", "dplr_channel"])
def test_cu_seqlens_through_the_pallas_kernels(case):
    fn, gate, _ = CASES[case]
    x, S0 = inputs(1, gate)
    # a silent fallback to the chunked XLA form would equal the separate runs too
    jaxpr = jax.make_jaxpr(lambda x, S0, cu: fn(x, S0, cu, "pallas"))(x, S0, jnp.asarray(CU))
    assert "pallas_call" in str(jaxpr), "fell back to the XLA form"
    compiled = jax.jit(lambda x, S0, cu: (fn(x, S0, cu, "pallas"),
                                          run_separately(fn, x, S0, LENGTHS)))
    compiled = compiled.lower(x, S0, jnp.asarray(CU)).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    (o, S), (o_w, S_w) = compiled(x, S0, jnp.asarray(CU))
    assert_close(o, o_w, name="o")
    assert_close(S, S_w, name="final states")


@pytest.mark.parametrize("states", [False, True])
def test_moving_offsets_do_not_recompile(states):
    x, S0 = inputs(2, "scalar")
    S0 = S0 if states else jnp.zeros_like(S0)

    @jax.jit
    def f(x, S0, cu):
        return L.gla(x["q"], x["k"], x["v"], x["g"], cu_seqlens=cu, chunk_size=16,
                     initial_state=S0 if states else None, output_final_state=states)

    o1, _ = f(x, S0, jnp.asarray(CU))
    other = [10, 10, 0, 20]
    o2, S2 = f(x, S0, jnp.asarray(np.concatenate([[0], np.cumsum(other)]).astype(np.int32)))
    assert f._cache_size() == 1
    want, S_want = run_separately(_gla, x, S0, other)
    assert_close(o2, want, name="o after the move")
    if states:
        assert_close(S2, S_want, name="final states after the move")
    assert not np.allclose(o1, o2)


def test_bf16_inputs_keep_fp32_document_states():
    """Requested states are carried in fp32 (the call upcasts): only o is bf16."""
    x, S0 = inputs(4, "channel")
    xb = {n: None if a is None else a.astype(jnp.bfloat16) for n, a in x.items()}
    xb["g"] = x["g"]
    o, S = jax.jit(_gla, static_argnums=3)(xb, S0, jnp.asarray(CU), "chunk")
    o_w, S_w = run_separately(_gla, {**xb, "g": x["g"]}, S0, LENGTHS)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(S, S_w, name="final states")  # fp32 tolerance: no bf16 rounding of states
    assert_close(o, o_w, dtype=jnp.bfloat16, name="o")


def test_bad_cu_seqlens_raise():
    x, S0 = inputs(3, "scalar")
    q, k, v, g = x["q"], x["k"], x["v"], x["g"]
    cases = [
        (jnp.asarray([1, 20, 40]), ValueError, "cu_seqlens must start at 0"),
        (jnp.asarray([0, 30, 20, 40]), ValueError, "cu_seqlens must be nondecreasing"),
        (jnp.asarray([0, 20, 39]), ValueError, r"cu_seqlens must end at T = 40"),
        (jnp.asarray([0.0, 40.0]), TypeError, "cu_seqlens must be an integer array"),
        (jnp.asarray([[0, 40]]), ValueError, r"cu_seqlens must have shape \[N \+ 1\]"),
    ]
    for cu, err, msg in cases:
        with pytest.raises(err, match=msg):
            L.gla(q, k, v, g, cu_seqlens=cu)
    cu = jnp.asarray(CU)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\]"):
        L.delta_rule(q, k, v, x["beta"], cu_seqlens=cu, initial_state=S0[:1])
    with pytest.raises(ValueError, match=r"B = 1"):
        L.dplr_delta_rule(*(jnp.concatenate([t, t]) for t in (q, k, v, x["a"], x["b"])),
                          cu_seqlens=cu)
    with pytest.raises(ValueError, match="not both"):
        L.linear_attention(q, k, v, cu_seqlens=cu, segment_ids=jnp.zeros((1, T), jnp.int32))
