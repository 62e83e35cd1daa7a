"""The "mamba2" mechanism (models.cores.mamba2): cached decoding (SSM state + convolution
window) equals the forward, chunk equals reference, and the layer's own parameters (conv,
dt, A_log, D, gate, norm) get gradients."""

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.testing import assert_close
from models import Decoder, DecoderConfig
from tests.testing import forward_and_decoded

TINY = dict(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=32)


def _decoder(**kw):
    cfg = DecoderConfig(**TINY, num_layers=1, layer_pattern="P", positions="none",
                        layer_mechanisms=(("P", "mamba2"),),
                        attention_options=(("chunk_size", 4),), **kw)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def test_cached_decoding_matches_forward_and_reference():
    model = _decoder()
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 32)
    full, decoded = forward_and_decoded(model, tokens, prompt_len=4)
    ref_def, ref_state = nnx.split(_decoder(linear_implementation="reference"))
    ref = jax.jit(lambda s, x: nnx.merge(ref_def, s)(x))(ref_state, tokens)
    assert_close(ref, full, rtol=1e-4, name="reference vs chunk logits")
    assert_close(decoded, full, rtol=1e-4, name="decoded logits")


def test_layer_parameters_get_gradients():
    model = _decoder()
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
    graphdef, state = nnx.split(model)
    grads = jax.jit(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)))(state)
    core = grads["layers"][0]["attn"]["core"]
    leaves = {"conv.kernel": core["conv"]["kernel"], "conv.bias": core["conv"]["bias"],
              **{name: core[name] for name in ("dt_bias", "a_log", "d_skip", "norm")}}
    for name, g in leaves.items():
        assert float(jnp.sum(g[...] ** 2)) > 0, name
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
