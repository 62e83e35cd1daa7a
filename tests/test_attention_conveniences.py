"""`jattn.attention`'s conveniences for users of JAX libraries: `is_causal=` and
`local_window_size=` (jax.nn.dot_product_attention's spellings, mapped onto jattn.masks), and
use as `flax.nnx.MultiHeadAttention(attention_fn=jattn.attention)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import masks

B, T, H, D = 2, 8, 2, 4


def _qkv(seed=0, tq=T, tk=T):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, tq, H, D)), jax.random.normal(kk, (B, tk, H, D)),
            jax.random.normal(kv, (B, tk, H, D)))


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize(
    ("kwargs", "explicit"),
    [
        ({"is_causal": True}, masks.causal()),
        ({"local_window_size": (2, 1)}, masks.local(2, 1)),
        ({"local_window_size": 2}, masks.local(2, 2)),
        ({"is_causal": True, "local_window_size": (3, 0)}, masks.causal() & masks.local(3, 0)),
    ],
    ids=["causal", "window_pair", "window_int", "causal_and_window"],
)
def test_conveniences_equal_the_explicit_masks(kwargs, explicit, implementation):
    q, k, v = _qkv()
    got = jattn.attention(q, k, v, implementation=implementation, **kwargs)
    want = jattn.attention(q, k, v, mask=explicit, implementation=implementation)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jattn.attention_weights(q, k, **kwargs),
                                  jattn.attention_weights(q, k, mask=explicit))


def test_conveniences_match_jax_dot_product_attention():
    q, k, v = _qkv(1)
    for kwargs in ({"is_causal": True}, {"local_window_size": (2, 1)},
                   {"is_causal": True, "local_window_size": (3, 0)}):
        got = jattn.attention(q, k, v, implementation="reference", **kwargs)
        want = jax.nn.dot_product_attention(q, k, v, **kwargs)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(kwargs))


def test_conveniences_are_anded_with_mask():
    q, k, v = _qkv(2)
    strided = masks.strided(2)
    got = jattn.attention(q, k, v, mask=strided, is_causal=True, implementation="reference")
    want = jattn.attention(q, k, v, mask=strided & masks.causal(), implementation="reference")
    np.testing.assert_array_equal(got, want)
    # a dense bool mask (what flax passes), broadcastable to [B, H, Tq, Tk]
    dense = jax.random.bernoulli(jax.random.key(3), 0.7, (B, 1, T, T))
    got = jattn.attention(q, k, v, mask=dense, local_window_size=(1, 1),
                          implementation="reference")
    want = jattn.attention(q, k, v, mask=dense & masks.local(1, 1).dense(T, T),
                           implementation="reference")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [(1, 2, 3), "causal", 1.5, (1, -1)])
def test_bad_local_window_size_names_it(bad):
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match="local_window_size"):
        jattn.attention(q, k, v, local_window_size=bad)


def _mha(attention_fn=None, dropout_rate=0.0):
    kwargs = {} if attention_fn is None else {"attention_fn": attention_fn}
    return nnx.MultiHeadAttention(num_heads=H, in_features=8, qkv_features=H * D,
                                  dropout_rate=dropout_rate, decode=False,
                                  rngs=nnx.Rngs(0), **kwargs)


def test_flax_multihead_attention_with_jattn_equals_its_default():
    x = jax.random.normal(jax.random.key(4), (B, T, 8))
    default, ours = _mha(), _mha(jattn.attention)
    nnx.update(ours, nnx.state(default))  # the same parameters (the same seed also gives them)
    causal = nnx.make_causal_mask(jnp.ones((B, T)))
    for kwargs in ({}, {"mask": causal}, {"is_causal": True}):
        np.testing.assert_allclose(ours(x, **kwargs), default(x, **kwargs), atol=1e-5,
                                   err_msg=str(kwargs))


def test_flax_dropout_is_refused_unless_deterministic():
    x = jnp.ones((B, T, 8))
    mha = _mha(jattn.attention, dropout_rate=0.1)
    np.testing.assert_allclose(mha(x, deterministic=True), _mha(dropout_rate=0.1)(
        x, deterministic=True), atol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        mha(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    with pytest.raises(NotImplementedError, match="attention_weights"):
        _mha(jattn.attention)(x, sow_weights=True)
