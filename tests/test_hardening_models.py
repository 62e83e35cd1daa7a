"""Bad input to the models and decoding raises a named error instead of a silent wrong answer.

Issue 15, items 9-12: a decode step past the KV cache (``dynamic_update_slice`` clamps and
overwrites the last slot), learned positions past ``max_len`` (NaN logits, generate emits
zeros), empty prompts / negative temperatures / out-of-vocabulary ids, and invalid model
sizes, layer patterns or mechanism names. Where a value is traced (inside ``jax.jit``) no
Python error is possible; the contract there is NaN logits, which a test pins too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import CachePolicy, Decoder, DecoderConfig, decode_fns, generate, vit_config

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=1)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _model(**kw) -> Decoder:
    return Decoder(DecoderConfig(**{**TINY, **kw}), rngs=nnx.Rngs(0))


def _tokens(b: int, t: int, value: int = 1) -> jax.Array:
    return jnp.full((b, t), value, jnp.int32)


# --- item 9: a decode step past the cache -------------------------------------------------------
def test_decode_step_past_the_full_cache_raises():
    model = _model()
    state, prefill, step = decode_fns(model)
    cache = model.init_cache(1, 4)
    _, cache = prefill(state, _tokens(1, 3), cache)
    logits, cache = step(state, _tokens(1, 1), cache, 3)  # the last slot: fine
    assert np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match=r"index=4 .*cache of 4 slots"):
        step(state, _tokens(1, 1), cache, 4)
    with pytest.raises(ValueError, match="index=-1"):
        step(state, _tokens(1, 1), cache, jnp.int32(-1))
    with pytest.raises(ValueError, match=r"5 prompt tokens .*cache of 4 slots"):
        prefill(state, _tokens(1, 5), model.init_cache(1, 4))
    # eager Decoder.decode with a concrete index checks too
    with pytest.raises(ValueError, match=r"index=4 .*cache of 4 slots"):
        model.decode(_tokens(1, 1), model.init_cache(1, 4), 4)


def test_traced_decode_step_past_the_cache_gives_nan_logits():
    """Inside jit the index is traced: the step past the cache poisons its logits with NaN
    (and the steps inside the cache stay finite), instead of overwriting the last slot."""
    model = _model()
    graphdef, state = nnx.split(model)
    step = jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i))
    cache = model.init_cache(1, 2)
    inside, cache = step(state, _tokens(1, 1), cache, jnp.int32(1))
    past, after = step(state, _tokens(1, 1, value=7), cache, jnp.int32(2))
    assert np.all(np.isfinite(inside))
    assert np.all(np.isnan(past))
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # the last slot was not overwritten


def test_streaming_and_recurrent_caches_have_no_length_limit():
    recurrent = _model(layer_pattern="L", positions="none")
    state, _, step = decode_fns(recurrent)
    logits, _ = step(state, _tokens(1, 1), recurrent.init_cache(1, 2), 10)
    assert np.all(np.isfinite(logits))
    policy = CachePolicy("streaming", sink_tokens=1, window=2)
    state, _, step = decode_fns(_model(), policy)
    logits, _ = step(state, _tokens(1, 1), _model().init_cache(1, 2, policy), 10)
    assert np.all(np.isfinite(logits))


# --- item 10: learned positions past max_len ----------------------------------------------------
def test_learned_positions_past_max_len_raise():
    model = _model(positions="learned", max_len=8)
    assert model(_tokens(1, 8)).shape == (1, 8, 32)  # exactly max_len is fine
    with pytest.raises(ValueError, match=r"9 tokens .*max_len=8"):
        model(_tokens(1, 9))
    with pytest.raises(ValueError, match=r"positions must be in \[0, .*max_len=8\), got 8"):
        model(_tokens(1, 2), positions=jnp.array([0, 8]))
    with pytest.raises(ValueError, match=r"max_len=8"):
        model.generate(_tokens(1, 4), 5)
    with pytest.raises(ValueError, match=r"max_len=8"):
        model.decode(_tokens(1, 1), model.init_cache(1, 16), 8)
    # under jit the length is static: the check fires at trace time
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"9 tokens .*max_len=8"):
        jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, _tokens(1, 9))
    out = model.generate(_tokens(1, 4), 4)  # 4 + 4 = max_len: fine
    assert out.shape == (1, 8)


def test_traced_learned_position_outside_the_table_gives_nan_logits():
    """Traced positions cannot raise: one outside ``[0, max_len)`` makes the logits NaN (NaN
    then spreads through attention). A negative one used to wrap around silently."""
    model = _model(positions="learned", max_len=8)
    graphdef, state = nnx.split(model)
    fwd = jit(lambda s, x, p: nnx.merge(graphdef, s)(x, positions=p))
    assert np.all(np.isfinite(fwd(state, _tokens(1, 2), jnp.array([0, 7]))))
    for bad in (8, -1):
        assert np.all(np.isnan(fwd(state, _tokens(1, 2), jnp.array([0, bad]))[:, 1])), bad


# --- item 11: generate arguments and token ids --------------------------------------------------
def test_generate_rejects_empty_prompt_and_bad_temperature():
    model = _model()
    with pytest.raises(ValueError, match=r"prompt .*at least one token"):
        generate(model, _tokens(1, 0), 3)
    for t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.generate(_tokens(1, 2), 3, temperature=t, rng=jax.random.key(0))
    out = model.generate(_tokens(1, 2), 3, temperature=0.5, rng=jax.random.key(0))
    assert out.shape == (1, 5)


@pytest.mark.parametrize("bad", [32, -1])
def test_out_of_vocabulary_ids_raise(bad):
    model = _model()
    tokens = _tokens(1, 3).at[0, 1].set(bad)
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, vocab_size=32\).*{bad}"):
        model(tokens)
    with pytest.raises(ValueError, match=r"vocab_size=32"):
        model.generate(tokens, 2)
    with pytest.raises(ValueError, match=r"vocab_size=32"):
        model.decode(tokens, model.init_cache(1, 4), 0)


def test_traced_out_of_vocabulary_ids_give_nan_logits():
    """A negative id used to wrap around to the last row (silently finite); both sides of the
    range now give NaN logits."""
    model = _model()
    graphdef, state = nnx.split(model)
    fwd = jit(lambda s, x: nnx.merge(graphdef, s)(x))
    assert np.all(np.isfinite(fwd(state, _tokens(1, 3).at[0, 2].set(31))))
    for bad in (32, -1):
        assert np.all(np.isnan(fwd(state, _tokens(1, 3).at[0, 2].set(bad))[:, 2])), bad


# --- item 12: configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("num_layers", 0), ("d_model", -8), ("num_heads", 0), ("vocab_size", 0), ("max_len", 0),
    ("mlp_dim", -1), ("head_dim", 0), ("num_kv_heads", 3), ("d_model", 2.5),
])
def test_decoder_config_rejects_bad_sizes(field, value):
    with pytest.raises(ValueError, match=rf"DecoderConfig\.{field}.*{value}"):
        DecoderConfig(**{**TINY, field: value})


def test_decoder_config_names_bad_pattern_letters_and_mechanisms():
    # the unknown letter is named even when the pattern would not tile num_layers either
    with pytest.raises(ValueError, match=r"layer_pattern letter 'Z'"):
        DecoderConfig(**{**TINY, "num_layers": 3, "layer_pattern": "AZ"})
    with pytest.raises(ValueError, match=r"DecoderConfig\.mechanism='sofmax'.*registered: .*"
                                         r"'softmax'"):
        DecoderConfig(**{**TINY, "mechanism": "sofmax"})
    with pytest.raises(ValueError, match=r"DecoderConfig\.linear_mechanism='glaa'"):
        DecoderConfig(**{**TINY, "linear_mechanism": "glaa", "layer_pattern": "L"})
    with pytest.raises(ValueError, match=r"DecoderConfig\.layer_mechanisms.*'S'.*'nope:3'"):
        DecoderConfig(**{**TINY, "layer_pattern": "S", "layer_mechanisms": (("S", "nope:3"),)})
    with pytest.raises(ValueError, match=r"DecoderConfig\.mlp='swishglu'"):
        DecoderConfig(**{**TINY, "mlp": "swishglu"})
    with pytest.raises(ValueError, match=r"DecoderConfig\.norm='batchnorm'"):
        DecoderConfig(**{**TINY, "norm": "batchnorm"})


@pytest.mark.parametrize("field, value", [
    ("depth", 0), ("width", -8), ("num_heads", 0), ("mlp_dim", 0), ("patch_size", 0),
    ("num_classes", -1), ("channels", 0),
])
def test_vit_config_rejects_bad_sizes(field, value):
    with pytest.raises(ValueError, match=rf"ViTConfig\.{field}.*{value}"):
        vit_config("test/4", image_size=8, **{field: value})


def test_vit_config_names_an_unknown_mechanism():
    with pytest.raises(ValueError, match=r"ViTConfig\.mechanism='sofmax'.*registered: "):
        vit_config("test/4", image_size=8, mechanism="sofmax")
    with pytest.raises(ValueError, match=r"ViTConfig\.mechanism='nope'"):
        vit_config("test/4", image_size=8, depth=2, mechanism=("softmax", "nope"))
    vit_config("test/4", image_size=8, mechanism="neighborhood:2")  # a grid pattern is fine
