"""The "loglinear_gla" and "loglinear_mamba2" mechanisms (models.cores.loglinear) in a decoder:
cached decoding on the Fenwick stack equals the forward, and
the level-weight projection gets gradients."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jattn.testing import assert_close
from models import Decoder, DecoderConfig
from tests.testing import forward_and_decoded

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32)


def _decoder(mechanism, **kw):
    cfg = DecoderConfig(**TINY, num_layers=1, layer_pattern="P", positions="none",
                        layer_mechanisms=(("P", mechanism),),
                        attention_options=(("max_levels", 6), ("chunk_size", 4)), **kw)
    return Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mechanism", ["loglinear_gla", "loglinear_mamba2"])
def test_cached_decoding_matches_the_forward(mechanism):
    model = _decoder(mechanism)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 32)
    full, decoded = forward_and_decoded(model, tokens, prompt_len=5)
    assert_close(decoded, full, rtol=1e-4, name="decoded logits")


def test_level_weights_get_gradients_and_long_inputs_are_refused():
    model = _decoder("loglinear_mamba2")
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
    graphdef, state = nnx.split(model)
    grads = jax.jit(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)))(state)
    levels = grads["layers"][0]["attn"]["core"]["level_proj"]["kernel"][...]
    assert float(jnp.sum(levels**2)) > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="max_levels=6 handles sequences up to 32"):
        model(jnp.zeros((1, 33), jnp.int32))
