"""models.cores.variants: fox, softpick, stick_breaking, diff, cog against independent dense
NumPy formulas (float64, causal, GQA), reference vs xla, gradients to FoX's forget gate, and
KV-cache decoding equal to the forward."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.testing import assert_close
from models import AttentionConfig, CachePolicy, Decoder, DecoderConfig, build_core
from models.cores.base import CoreInputs
from models.cores.variants import diff_lambda_init

B, T, D, HQ, HKV, DH = 2, 7, 16, 4, 2, 8
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (B, T, D))
    q = jax.random.normal(ks[1], (B, T, HQ, DH))
    k = jax.random.normal(ks[2], (B, T, HKV, DH))
    v = jax.random.normal(ks[3], (B, T, HKV, DH))
    return CoreInputs(x, q, k, v, jnp.arange(T))


def _core(mech, implementation="reference", **opts):
    cfg = AttentionConfig(d_model=D, num_heads=HQ, num_kv_heads=HKV, head_dim=DH, mechanism=mech,
                          implementation=implementation, **opts)
    return build_core(cfg, rngs=nnx.Rngs(0))


# --- independent dense formulas (NumPy, float64) -------------------------------------------------
def _np(inp):
    x, q, k, v = (np.asarray(a, np.float64) for a in inp[:4])
    g = HQ // HKV
    return x, q, np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)


def _scores(q, k):
    """``[B, H, T, T]`` scaled scores and the causal mask."""
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return s, np.tril(np.ones((T, T), bool))


def _softmax(s, vis):
    s = np.where(vis, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _out(p, v):
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def dense_fox(core, inp):
    x, q, k, v = _np(inp)
    w, b = (np.asarray(a[...], np.float64) for a in (core.forget.kernel, core.forget.bias))
    c = np.cumsum(_log_sigmoid(x @ w + b), axis=1)  # [B, T, H]
    s, vis = _scores(q, k)
    s = s + np.moveaxis(c, 2, 1)[:, :, :, None] - np.moveaxis(c, 2, 1)[:, :, None, :]
    return _out(_softmax(s, vis), v)


def dense_softpick(core, inp):
    _, q, k, v = _np(inp)
    s, vis = _scores(q, k)
    e = np.where(vis, np.expm1(s), 0.0)
    return _out(np.maximum(e, 0) / (np.abs(e).sum(-1, keepdims=True) + 1e-6), v)


def dense_stick_breaking(core, inp):
    _, q, k, v = _np(inp)
    s, vis = _scores(q, k)
    beta = 1 / (1 + np.exp(-s))
    p = np.zeros_like(s)
    for i in range(T):
        for j in range(i + 1):
            p[:, :, i, j] = beta[:, :, i, j] * np.prod(1 - beta[:, :, i, j + 1:i + 1], axis=-1)
    return _out(p, v)


def dense_diff(core, inp):
    _, q, k, v = _np(inp)
    h = DH // 2
    p1 = _softmax(*_scores(q[..., :h], k[..., :h]))
    p2 = _softmax(*_scores(q[..., h:], k[..., h:]))
    lq1, lk1, lq2, lk2 = (np.asarray(a[...], np.float64)
                          for a in (core.lq1, core.lk1, core.lq2, core.lk2))
    lam_init = diff_lambda_init(1)
    lam = np.exp(lq1 @ lk1) - np.exp(lq2 @ lk2) + lam_init
    a = _out(p1, v) - lam * _out(p2, v)
    a = a / np.sqrt(np.mean(a**2, -1, keepdims=True) + 1e-5)
    return a * np.asarray(core.norm_scale[...]) * (1 - lam_init)


def dense_cog(core, inp):
    _, q, k, v = _np(inp)
    s, vis = _scores(q, k)
    return _out(np.where(vis, np.sign(s) * _softmax(np.abs(s), vis), 0.0), v)


DENSE = {"fox": dense_fox, "softpick": dense_softpick, "stick_breaking": dense_stick_breaking,
         "diff": dense_diff, "cog": dense_cog}


@pytest.mark.parametrize("mech", list(DENSE))
def test_core_matches_the_dense_formula(mech):
    core, inp = _core(mech), _inputs()
    if mech == "fox":  # a gate far from 1, so the decay matters
        core.forget.bias.set_value(jnp.full((HQ,), -0.5))
    got = jit(lambda i: core(i))(inp)
    assert_close(got, DENSE[mech](core, inp), rtol=2e-5, atol=2e-5, name=f"{mech} vs dense")


def test_xla_equals_reference_and_fox_gate_gets_gradients():
    # FoX's forget gate reaches the scores only through the score_mod's captured cumsums: the
    # blocked path must return their gradients (equal to the reference's, and not zero).
    inp = _inputs(1)

    for mech in ("fox", "softpick", "stick_breaking", "diff"):
        ref, xla = _core(mech, "reference"), _core(mech, "xla")
        assert_close(jit(lambda i, c=xla: c(i))(inp), jit(lambda i, c=ref: c(i))(inp),
                     rtol=1e-5, atol=1e-5, name=f"{mech}: xla vs reference")
    grads = {}
    for impl in ("reference", "xla"):
        graphdef, params, rest = nnx.split(_core("fox", impl), nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(inp)))

        grads[impl] = jit(jax.grad(loss))(params)
    g_ref, g_xla = grads["reference"]["forget"], grads["xla"]["forget"]
    assert float(jnp.abs(g_ref["kernel"][...]).sum()) > 0
    for name in ("kernel", "bias"):
        assert_close(g_xla[name][...], g_ref[name][...], rtol=1e-4, atol=1e-6,
                     name=f"fox forget-gate {name} gradient xla vs reference")


def test_diff_lambda_init_schedule():
    assert diff_lambda_init(1) == pytest.approx(0.2)
    assert diff_lambda_init(4) == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    assert _core("diff", diff_layer=3).lambda_init == pytest.approx(diff_lambda_init(3))
    assert _core("diff", diff_lambda_init=0.5).lambda_init == 0.5
    with pytest.raises(ValueError, match="diff_layer"):
        diff_lambda_init(0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        build_core(AttentionConfig(d_model=6, num_heads=2, mechanism="diff"), rngs=nnx.Rngs(0))


def test_cached_decoding_matches_the_forward():
    # one model, one layer per new mechanism (one compile); FoX with its "Pro" output gate
    mechs = list(DENSE)
    letters = "abcde"
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp="none",
                        num_layers=len(mechs), layer_pattern=letters, positions="rope",
                        layer_mechanisms=tuple(zip(letters, mechs, strict=True)),
                        attention_options=(("fox_output_gate", True),))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    full = jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    policy = CachePolicy()
    step = jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i, policy))
    cache = model.init_cache(2, 9, policy)
    logits, cache = step(state, tokens[:, :4], cache, jnp.int32(0))
    out = [logits]
    for i in range(4, 9):
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i))
        out.append(logits)
    assert_close(jnp.concatenate(out, axis=1), full, rtol=1e-4, atol=1e-5,
                 name="decoded logits (fox, softpick, stick_breaking, diff, cog)")


def test_fox_refuses_the_streaming_cache():
    with pytest.raises(NotImplementedError, match="full KV cache"):
        _core("fox").init_cache(1, 8, CachePolicy("streaming", 1, 4))
