"""The "deltaproduct" and "rwkv7" mechanisms (models.cores.recurrent) in a decoder: cached
decoding (prefill, then one token at a time, with RWKV-7's token-shift cache) equals the
forward, and their own parameters get gradients."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jattn.testing import assert_close
from models import Decoder, DecoderConfig
from tests.testing import forward_and_decoded

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32)


def _decoder(num_householder=2, mechanism="deltaproduct"):
    opts = ((("num_householder", num_householder), ("allow_neg_eigval", True))
            if mechanism == "deltaproduct" else (("rwkv7_lora_rank", 4),))
    cfg = DecoderConfig(**TINY, num_layers=2, layer_pattern="P", positions="none",
                        layer_mechanisms=(("P", mechanism),), attention_options=opts)
    return Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mechanism,num_householder",
                         [("deltaproduct", 1), ("deltaproduct", 3), ("rwkv7", None)])
def test_cached_decoding_matches_the_forward(mechanism, num_householder):
    model = _decoder(num_householder, mechanism)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
    full, decoded = forward_and_decoded(model, tokens, prompt_len=4)
    assert_close(decoded, full, rtol=1e-4, name="decoded logits")


def test_householder_steps_change_the_model_and_get_gradients():
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 32)
    model = _decoder(2)
    graphdef, state = nnx.split(model)

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)

    grads = jax.jit(jax.grad(loss))(state)
    extra = grads["layers"][0]["attn"]["core"]["kv_extra"]["kernel"][...]
    assert float(jnp.sum(extra**2)) > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_rwkv7_parameters_get_gradients():
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 32)
    model = _decoder(mechanism="rwkv7")
    graphdef, state = nnx.split(model)

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)

    grads = jax.jit(jax.grad(loss))(state)
    core = grads["layers"][0]["attn"]["core"]
    for name in ("mix", "k_k", "k_a", "r_k"):
        assert float(jnp.sum(core[name][...] ** 2)) > 0, name
    assert float(jnp.sum(core["decay"]["up"]["bias"][...] ** 2)) > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
