"""The "deltaproduct" mechanism (models.cores.recurrent.DeltaProduct) in a decoder."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jattn.testing import assert_close
from models import Decoder, DecoderConfig

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32)


def _decoder(num_householder, **kw):
    cfg = DecoderConfig(**TINY, num_layers=1, layer_pattern="P", positions="none",
                        layer_mechanisms=(("P", "deltaproduct"),),
                        attention_options=(("num_householder", num_householder),
                                           ("allow_neg_eigval", True)), **kw)
    return Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("num_householder", [1, 3])
def test_cached_decoding_matches_the_forward(num_householder):
    model = _decoder(num_householder)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)
    step = jax.jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i))
    cache = model.init_cache(2, 9)
    logits, cache = step(state, tokens[:, :4], cache, jnp.int32(0))
    out = [logits]
    for i in range(4, 9):
        logits, cache = step(state, tokens[:, i : i + 1], cache, jnp.int32(i))
        out.append(logits)
    assert_close(jnp.concatenate(out, axis=1), full, rtol=1e-4, name="decoded logits")


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
