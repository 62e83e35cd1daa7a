"""Model cores on jattn.variants: top_theta, dual_triangle, mta (decoder) and gpsa (ViT). Each
core against a dense NumPy formula, xla equal to reference, a tiny model trains (finite loss,
gradients reach the mechanism's own parameters), MTA's cached decoding equals its forward, and
top-theta calibration keeps about the target number of keys."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jattn.testing import assert_close
from models import (
    AttentionConfig,
    CachePolicy,
    Decoder,
    DecoderConfig,
    ViT,
    build_core,
    vit_config,
)
from models.cores.base import CoreInputs
from models.cores.variants import calibrate_top_theta
from tests.test_variants_mta_gpsa import np_mta
from tests.test_variants_threshold_triangle import np_dual_triangle, np_top_theta
from tests.variants_oracle import HKV, HQ, B, D, T, qkv

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
CAUSAL = np.tril(np.ones((T, T), bool))[None, None]


def _core(mech, implementation="reference", **opts):
    cfg = AttentionConfig(d_model=16, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          mechanism=mech, implementation=implementation, **opts)
    return build_core(cfg, rngs=nnx.Rngs(0))


def _inputs(seed=0):
    q, k, v = qkv(seed)
    return CoreInputs(jnp.zeros((B, T, 16)), q, k, v, jnp.arange(T))


def test_cores_match_the_dense_formulas_and_xla_equals_reference():
    inp = _inputs()
    theta = np.array([-0.5, 0.0, 0.3, -np.inf], np.float32)
    cores = {}
    for impl in ("reference", "xla"):
        cores[impl] = {"top_theta": _core("top_theta", impl),
                       "dual_triangle": _core("dual_triangle", impl),
                       "mta": _core("mta", impl, mta_query_kernel=3, mta_key_kernel=4)}
        cores[impl]["top_theta"].theta.set_value(jnp.asarray(theta))
        mta = cores[impl]["mta"]  # away from the identity init, so the convs matter
        mta.kq_kernel.set_value(0.5 * jax.random.normal(jax.random.key(1), (HQ, 3, 4)))
        mta.head_kernel.set_value(jnp.eye(2) + 0.3 * jax.random.normal(jax.random.key(2),
                                                                          (HQ // 2, 2, 2)))
    want = {
        "top_theta": np_top_theta(*inp[1:4], CAUSAL, theta),
        "dual_triangle": np_dual_triangle(*inp[1:4], CAUSAL),
        "mta": np_mta(*inp[1:4], cores["reference"]["mta"].kq_kernel[...],
                      cores["reference"]["mta"].head_kernel[...], CAUSAL),
    }
    for impl in ("reference", "xla"):
        for mech, core in cores[impl].items():
            got = jit(lambda i, c=core: c(i))(inp)
            assert_close(got, want[mech], rtol=2e-5, atol=2e-5, name=f"{mech} {impl}")


def test_top_theta_calibration_sets_thresholds_that_keep_about_k():
    core = _core("top_theta", top_theta_keep=5)
    inp = _inputs(3)
    dense = core(inp)  # theta = -inf: plain softmax
    calibrate_top_theta(core, lambda: core(inp))
    theta = np.asarray(core.theta[...])
    assert np.all(np.isfinite(theta)) and not core.calibrating
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(inp.q), np.repeat(np.asarray(inp.k), 2, 2))
    s = np.where(CAUSAL, s / np.sqrt(D), -np.inf)
    rows = CAUSAL.sum(-1)[0, 0] >= 5  # rows with at least k keys
    kept = (s >= theta[None, :, None, None]).sum(-1)[:, :, rows].mean()
    assert abs(kept - 5) < 2, kept
    assert np.abs(np.asarray(core(inp)) - np.asarray(dense)).max() > 1e-3
    with pytest.raises(ValueError, match="no 'top_theta'"):
        calibrate_top_theta(_core("softmax"), lambda: None)


def _lm_step(model, tokens):
    graphdef, state = nnx.split(model)

    def loss(s):
        logits = nnx.merge(graphdef, s)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jit(jax.value_and_grad(loss))(state)


def test_tiny_decoder_trains_with_each_new_mechanism():
    mechs = ["top_theta", "mta", "dual_triangle", "gpsa"]
    letters = "abcd"
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp="none",
                        num_layers=4, layer_pattern=letters, positions="none",
                        implementation="xla",
                        layer_mechanisms=tuple(zip(letters, mechs, strict=True)),
                        attention_options=(("mta_query_kernel", 2), ("mta_key_kernel", 3)))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 32)
    loss, grads = _lm_step(model, tokens)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    layers = grads["layers"]
    assert float(jnp.abs(layers[1]["attn"]["core"]["kq_kernel"][...]).sum()) > 0
    assert float(jnp.abs(layers[1]["attn"]["core"]["head_kernel"][...]).sum()) > 0
    assert float(jnp.abs(layers[3]["attn"]["core"]["pos_weights"][...]).sum()) > 0
    assert float(jnp.abs(layers[3]["attn"]["core"]["gate_logits"][...]).sum()) > 0


def _decoded_and_forward(model, tokens, prompt_len=4):
    graphdef, state = nnx.split(model)
    full = jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    policy = CachePolicy()
    step = jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i, policy))
    cache = model.init_cache(tokens.shape[0], tokens.shape[1], policy)
    logits, cache = step(state, tokens[:, :prompt_len], cache, jnp.int32(0))
    out = [logits]
    for i in range(prompt_len, tokens.shape[1]):
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i))
        out.append(logits)
    return jnp.concatenate(out, axis=1), full


def test_mta_cached_decoding_matches_the_forward():
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp="none",
                        num_layers=1, layer_pattern="A", mechanism="mta", positions="rope",
                        attention_options=(("mta_query_kernel", 3), ("mta_key_kernel", 4)))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    core = model.layers[0].attn.core
    core.kq_kernel.set_value(0.5 * jax.random.normal(jax.random.key(3), core.kq_kernel.shape))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 32)
    got, full = _decoded_and_forward(model, tokens)
    assert_close(got, full, rtol=1e-4, atol=1e-5, name="mta decode")
    with pytest.raises(NotImplementedError, match="full KV cache"):
        core.init_cache(1, 8, CachePolicy("streaming", 1, 4))


def test_calibrated_top_theta_decoding_matches_the_forward():
    # After calibration some rows keep only their own key: decoding must find it at the
    # query's slot (index + t), not at the end of the partly filled cache.
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp="none",
                        num_layers=1, layer_pattern="A", mechanism="top_theta",
                        positions="rope", attention_options=(("top_theta_keep", 2),))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 32)
    calibrate_top_theta(model, lambda: model(tokens))
    theta = model.layers[0].attn.core.theta[...]
    assert np.all(np.isfinite(np.asarray(theta)))
    got, full = _decoded_and_forward(model, tokens)
    assert_close(got, full, rtol=1e-4, atol=1e-5, name="top_theta decode")


def test_tiny_vit_with_gpsa_trains():
    # pool="gap": with one layer and a class token, the logits would read only the class
    # token, whose row has no positional part (so v_h would get no gradient, rightly)
    cfg = vit_config("test/4", image_size=12, num_classes=3, depth=1, mechanism="gpsa",
                     mlp="none", implementation="xla", num_heads=4, pool="gap")
    model = ViT(cfg, rngs=nnx.Rngs(0))
    model.head.kernel.set_value(jax.random.normal(jax.random.key(2), model.head.kernel.shape))
    images = jax.random.normal(jax.random.key(3), (2, 12, 12, 3))
    graphdef, state = nnx.split(model)

    def loss(s):
        logits = nnx.merge(graphdef, s)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).mean()

    value, grads = jit(jax.value_and_grad(loss))(state)
    assert np.isfinite(float(value))
    core_grads = grads["layers"][0]["attn"]["core"]
    assert float(jnp.abs(core_grads["pos_weights"][...]).sum()) > 0
    _, inter = model(images, return_intermediates=True)
    w = np.asarray(inter["layers"][0]["attention_weights"])  # [B, H, 9, 9]
    assert w.shape == (2, 4, 9, 9)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
