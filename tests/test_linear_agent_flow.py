"""Agent attention and Flowformer's flow attention (jattn.linear.agent / .flowformer): forward
and gradients against independent float64 numpy formulas (per-token loops over the paper's
equations), both implementations, GQA, agent bias; the model cores "agent" and "flowformer"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.linear import agent_attention, flow_attention, flow_attention_recurrent, pool_agents

RNG = np.random.default_rng(0)


def _inputs(b=2, tq=7, tk=7, hq=2, hkv=2, d=4, dv=3, seed=0):
    r = np.random.default_rng(seed)
    return (r.normal(size=(b, tq, hq, d)).astype(np.float32),
            r.normal(size=(b, tk, hkv, d)).astype(np.float32),
            r.normal(size=(b, tk, hkv, dv)).astype(np.float32))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- float64 oracles, one (batch, head) at a time -------------------------------------------
def agent_np(q, k, v, n, bias1=None, bias2=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, hq, d = q.shape
    g = hq // k.shape[2]
    o = np.zeros((b, tq, hq, v.shape[-1]))
    for bi in range(b):
        for h in range(hq):
            qh, kh, vh = q[bi, :, h], k[bi, :, h // g], v[bi, :, h // g]
            agents = np.stack([qh[(i * tq) // n: -((-(i + 1) * tq) // n)].mean(0)
                               for i in range(n)])
            s1 = agents @ kh.T / np.sqrt(d) + (0 if bias1 is None else bias1[h])
            s2 = qh @ agents.T / np.sqrt(d) + (0 if bias2 is None else bias2[h])
            o[bi, :, h] = _softmax(s2) @ (_softmax(s1) @ vh)
    return o


def flow_np(q, k, v, causal, eps=1e-6, clamp=1.0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, hq, _ = q.shape
    tk, g = k.shape[1], hq // k.shape[2]
    o = np.zeros((b, tq, hq, v.shape[-1]))
    for bi in range(b):
        for h in range(hq):
            Q, K, V = _sigmoid(q[bi, :, h]), _sigmoid(k[bi, :, h // g]), v[bi, :, h // g]
            if not causal:
                inc = np.array([(Q[i] + eps) @ (K.sum(0) + eps) for i in range(tq)])
                out = np.array([(K[j] + eps) @ (Q.sum(0) + eps) for j in range(tk)])
                sink = np.array([(Q[i] + eps) @ ((K / out[:, None]).sum(0) + eps)
                                 for i in range(tq)])
                src = np.array([(K[j] + eps) @ ((Q / inc[:, None]).sum(0) + eps)
                                for j in range(tk)])
                alloc = _sigmoid(sink * tq / tk)
                comp = tk * _softmax(np.clip(src, -clamp, clamp))
                for i in range(tq):
                    kv = sum(np.outer(K[j], comp[j] * V[j]) for j in range(tk))
                    o[bi, i, h] = alloc[i] * (Q[i] / inc[i]) @ kv
                continue
            n = np.arange(1, tq + 1, dtype=np.float64)
            inc = np.array([(Q[i] + eps) @ (K[: i + 1].sum(0) + eps) for i in range(tq)])
            out = np.array([(K[j] + eps) @ (Q[: j + 1].sum(0) + eps) for j in range(tk)])
            sink = np.array([(Q[i] + eps) @ ((K[: i + 1] * (n[: i + 1] / out[: i + 1])[:, None])
                                             .sum(0) + eps) / n[i] for i in range(tq)])
            src = np.array([(K[j] + eps) @ ((Q[: j + 1] * (n[: j + 1] / inc[: j + 1])[:, None])
                                            .sum(0) + eps) / n[j] for j in range(tk)])
            e = np.exp(np.clip(src, -clamp, clamp))
            comp = n * e / np.cumsum(e)
            alloc = _sigmoid(sink)
            for i in range(tq):
                kv = sum(np.outer(K[j], comp[j] * V[j]) for j in range(i + 1))
                o[bi, i, h] = alloc[i] * (Q[i] / inc[i]) @ kv
    return o


def _check_forward_and_grads(fn, oracle, args, rtol=2e-5):
    """fn(*args) vs the float64 oracle; the gradient of <fn, w> along a random direction vs a
    central difference of the oracle (float64)."""
    got = jax.jit(fn)(*args)
    want = oracle(*args)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=1e-6)
    w = RNG.normal(size=want.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=tuple(range(len(args)))))(
        *args)
    dirs = [RNG.normal(size=np.shape(a)) for a in args]
    h = 1e-5

    def loss(t):
        return float(np.sum(oracle(*[np.asarray(a, np.float64) + t * u
                                     for a, u in zip(args, dirs, strict=True)]) * w))

    fd = (loss(h) - loss(-h)) / (2 * h)
    ad = sum(float(np.sum(np.asarray(gr, np.float64) * u)) for gr, u in zip(grads, dirs,
                                                                             strict=True))
    np.testing.assert_allclose(ad, fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", [None, "reference"])
@pytest.mark.parametrize("shape", [dict(), dict(tq=5, tk=9, hq=4, hkv=2)])
def test_agent_attention_matches_float64_formula(impl, shape):
    q, k, v = _inputs(**shape)
    n = 3
    _check_forward_and_grads(
        lambda q, k, v: agent_attention(q, k, v, num_agents=n, implementation=impl),
        lambda q, k, v: agent_np(q, k, v, n), (q, k, v))


def test_agent_bias_and_explicit_agents():
    q, k, v = _inputs(tq=6, tk=6)
    b1 = RNG.normal(size=(2, 2, 6)).astype(np.float32)  # [H, n, Tk]
    b2 = RNG.normal(size=(2, 6, 2)).astype(np.float32)  # [H, Tq, n]
    got = agent_attention(q, k, v, num_agents=2, agent_bias=(b1, b2))
    np.testing.assert_allclose(np.asarray(got), agent_np(q, k, v, 2, b1, b2), rtol=2e-5,
                               atol=1e-6)
    same = agent_attention(q, k, v, agents=pool_agents(jnp.asarray(q), 2), agent_bias=(b1, b2))
    np.testing.assert_allclose(np.asarray(same), np.asarray(got), rtol=1e-6)
    # one agent that is the mean query: every output row is one distribution over the keys
    assert pool_agents(jnp.asarray(q), 1).shape == (2, 1, 2, 4)
    with pytest.raises(ValueError, match="exactly one of num_agents"):
        agent_attention(q, k, v)
    with pytest.raises(ValueError, match=r"num_agents must be an int in \[1, T=6\]"):
        agent_attention(q, k, v, num_agents=7)
    with pytest.raises(ValueError, match="agent_bias"):
        agent_attention(q, k, v, num_agents=2, agent_bias=(np.zeros((3, 2, 6)), None))


@pytest.mark.parametrize("impl", [None, "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_flow_attention_matches_float64_formula(impl, causal):
    q, k, v = _inputs(tq=9, tk=9, hq=4, hkv=2)
    _check_forward_and_grads(
        lambda q, k, v: flow_attention(q, k, v, causal=causal, implementation=impl),
        lambda q, k, v: flow_np(q, k, v, causal), (q, k, v))


def test_flow_attention_cross_lengths_causality_and_errors():
    q, k, v = _inputs(tq=4, tk=10)
    got = flow_attention(q, k, v, clamp=5.0)
    np.testing.assert_allclose(np.asarray(got), flow_np(q, k, v, False, clamp=5.0), rtol=2e-5,
                               atol=1e-6)
    # causal: the outputs up to t do not depend on later tokens
    q, k, v = _inputs(tq=12, tk=12)
    full = flow_attention(q, k, v, causal=True)
    head = flow_attention(q[:, :5], k[:, :5], v[:, :5], causal=True)
    np.testing.assert_allclose(np.asarray(full[:, :5]), np.asarray(head), rtol=1e-5, atol=1e-6)
    # the recurrent form in pieces (prefill 5, then 1, then 6) is the causal call
    state, pieces = None, []
    for lo, hi in ((0, 5), (5, 6), (6, 12)):
        o, state = flow_attention_recurrent(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], state)
        pieces.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full),
                               rtol=1e-5, atol=1e-6)
    assert float(state.count) == 12
    with pytest.raises(ValueError, match="Tq == Tk"):
        flow_attention(q[:, :3], k, v, causal=True)
    with pytest.raises(ValueError, match="implementation"):
        flow_attention(q, k, v, implementation="pallas")


def test_agent_and_flowformer_cores_in_tiny_models():
    from flax import nnx

    from models import Decoder, DecoderConfig, ViT, vit_config
    from tests.testing import forward_and_decoded

    cfg = vit_config("test/4", image_size=8, num_classes=3, depth=2,
                     mechanism=("agent", "flowformer"),
                     attention_options=(("num_agents", 2), ("agent_bias_len", 5)))
    vit = ViT(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    out = vit(images)
    assert out.shape == (2, 3) and bool(jnp.all(jnp.isfinite(out)))
    lm = Decoder(DecoderConfig(vocab_size=16, d_model=16, num_heads=2, num_layers=1,
                               mechanism="flowformer"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 16)
    logits = lm(tokens)
    assert logits.shape == (2, 6, 16)
    # causal: prefill then token-by-token decoding gives the forward's logits
    full, decoded = forward_and_decoded(lm, tokens, prompt_len=3)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-4, atol=1e-5)
    state_floats = lm.layers[0].attn.core.state_size(100)
    assert state_floats == 4 * 2 * 8 + 2 + 2 * 8 * 8 + 1  # FlowState, whatever the length
    with pytest.raises(ValueError, match="'agent' has no causal form"):
        Decoder(DecoderConfig(vocab_size=16, d_model=16, num_heads=2, num_layers=1,
                              mechanism="agent"), rngs=nnx.Rngs(0))


def test_agent_core_adds_the_depthwise_conv_and_uses_its_biases():
    """The model core: ``agent_attention`` with the learned agent biases plus the DWC term
    ``sum_i w_i v_{t + i - 1}`` (width 3, zero padded), each KV head's conv repeated over its
    query group, against the float64 formulas (a core dropping the conv or the biases runs
    and has the right shape too)."""
    from flax import nnx

    from models import AttentionConfig, build_core
    from models.cores.base import CoreInputs

    t, hq, hkv, d = 5, 4, 2, 4
    cfg = AttentionConfig(d_model=8, num_heads=hq, num_kv_heads=hkv, head_dim=d, causal=False,
                          mechanism="agent", options=(("num_agents", 2), ("agent_bias_len", 6)))
    core = build_core(cfg, rngs=nnx.Rngs(0))
    r = np.random.default_rng(3)
    core.bias_agg[...] = jnp.asarray(r.normal(size=core.bias_agg.shape), jnp.float32)
    core.bias_bcast[...] = jnp.asarray(r.normal(size=core.bias_bcast.shape), jnp.float32)
    q, k, v = _inputs(tq=t, tk=t, hq=hq, hkv=hkv, d=d, dv=d, seed=4)
    got = core(CoreInputs(jnp.zeros((2, t, 8)), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          jnp.arange(t)))
    b1 = np.asarray(core.bias_agg[...])[:, :2, :t]
    b2 = np.asarray(core.bias_bcast[...])[:, :t, :2]
    want = agent_np(q, k, v, 2, b1, b2)
    w = np.asarray(core.dwc[...], np.float64)  # [3, Hkv, D]
    vp = np.pad(np.asarray(v, np.float64), ((0, 0), (1, 1), (0, 0), (0, 0)))
    conv = sum(vp[:, i:i + t] * w[i] for i in range(3))  # [B, T, Hkv, D]
    want = want + np.repeat(conv, hq // hkv, axis=2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-5)
