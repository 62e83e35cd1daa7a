"""Short causal depthwise convolutions (models.cores.short_conv) and the delta-rule layers that
use them (deltanet, gated_deltanet, kda, deltaproduct; issue 19's "full layer"):

* ``ShortConv`` equals a float64 numpy loop of ``silu(b + sum_i w_i u_{t-W+1+i})`` from a given
  past, and hands back the last ``W - 1`` inputs;
* each delta core equals the same core with the convolutions done by that numpy loop on q, k, v
  (before the GQA expansion) feeding ``jattn.linear.delta_rule``'s reference: which streams are
  convolved, in which order, causally;
* decoding one token at a time (carrying the conv window in the cache) equals the forward;
* ``conv_width=0`` is the convolution-free layer, and bad widths are refused by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn.linear
from jattn.testing import assert_close
from models import Decoder, DecoderConfig, capture_intermediates
from models.config import AttentionConfig
from models.cores.base import CoreInputs, repeat_kv
from models.cores.short_conv import ShortConv
from models.registry import build_core
from tests.testing import forward_and_decoded


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _conv_numpy(u, past, kernel, bias):
    """float64 loop: ``y_t = silu(b + sum_i w_i u_{t-W+1+i})`` with ``past`` before ``u``."""
    u, past, kernel = (np.asarray(a, np.float64) for a in (u, past, kernel))
    w, t = kernel.shape[0], u.shape[1]
    full = np.concatenate([past, u], axis=1)
    y = np.zeros_like(u)
    for s in range(t):
        for i in range(w):
            y[:, s] += kernel[i] * full[:, s + i]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return _silu(y)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_matches_numpy_loop(width, bias):
    conv = ShortConv(width, (3, 5), (None, None), bias=bias, rngs=nnx.Rngs(0))
    if bias:
        conv.bias[...] = jax.random.normal(jax.random.key(3), (3, 5))
    u = jax.random.normal(jax.random.key(1), (2, 7, 3, 5))
    past = jax.random.normal(jax.random.key(2), (2, width - 1, 3, 5))
    y, new_past = conv(u, past)
    want = _conv_numpy(u, past, conv.kernel[...], conv.bias[...] if bias else None)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    full = np.concatenate([np.asarray(past), np.asarray(u)], axis=1)
    np.testing.assert_array_equal(np.asarray(new_past), full[:, full.shape[1] - (width - 1):])
    # no past = zeros before the sequence (causal start)
    y0, _ = conv(u)
    np.testing.assert_allclose(np.asarray(y0), _conv_numpy(u, 0 * past, conv.kernel[...],
                               conv.bias[...] if bias else None), rtol=1e-5, atol=1e-6)


def _core_and_inputs(mechanism, opts=(), t=11):
    cfg = AttentionConfig(d_model=24, num_heads=4, num_kv_heads=2, mechanism=mechanism,
                          linear_implementation="reference", options=opts)
    core = build_core(cfg, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(7), 4)
    b, dh = 2, cfg.dh
    inp = CoreInputs(x=jax.random.normal(keys[0], (b, t, 24)),
                     q=jax.random.normal(keys[1], (b, t, 4, dh)),
                     k=jax.random.normal(keys[2], (b, t, 2, dh)),
                     v=jax.random.normal(keys[3], (b, t, 2, dh)),
                     positions=jnp.arange(t))
    return core, inp


@pytest.mark.parametrize("mechanism", ["deltanet", "gated_deltanet", "kda"])
def test_delta_core_equals_numpy_convs_then_delta_rule(mechanism):
    core, inp = _core_and_inputs(mechanism)
    got = core(inp)

    def conv(name, u):
        c = core.convs()[name]
        assert c.bias is None  # fla's ShortConvolution: no bias in the DeltaNet family
        zeros = np.zeros((u.shape[0], c.width - 1) + u.shape[2:])
        return jnp.asarray(_conv_numpy(u, zeros, c.kernel[...], None), jnp.float32)

    h = core.cfg.num_heads
    q = conv("q", inp.q)
    k, v = repeat_kv(conv("k", inp.k), h), repeat_kv(conv("v", inp.v), h)
    gates = core.gates(inp)
    o, _ = jattn.linear.delta_rule(q, k, v, gates["beta"], g=gates["g"], use_qk_l2norm=True,
                                   implementation="reference")
    want = core.out(inp.x, o) if core.out is not None else o
    assert_close(got, want, rtol=2e-5, name=f"{mechanism} core vs numpy convs + delta rule")


def test_conv_width_zero_is_the_convolution_free_layer():
    core, inp = _core_and_inputs("gated_deltanet", (("conv_width", 0),))
    assert core.convs() == {} and core.state_size(11) == 4 * 6 * 6
    h = core.cfg.num_heads
    gates = core.gates(inp)
    o, _ = jattn.linear.delta_rule(jax.nn.silu(inp.q), jax.nn.silu(repeat_kv(inp.k, h)),
                                   repeat_kv(inp.v, h), gates["beta"], g=gates["g"],
                                   use_qk_l2norm=True, implementation="reference")
    assert_close(core(inp), core.out(inp.x, o), rtol=2e-5, name="conv_width=0")


def test_the_convolutions_change_the_layer_and_are_causal():
    core, inp = _core_and_inputs("deltanet")
    flat, _ = _core_and_inputs("deltanet", (("conv_width", 0),))
    assert float(jnp.max(jnp.abs(core(inp) - flat(inp)))) > 1e-3
    # perturbing token 6 leaves outputs before it unchanged and changes token 6 onwards
    poked = inp._replace(v=inp.v.at[:, 6].add(1.0))
    diff = jnp.max(jnp.abs(core(poked) - core(inp)), axis=(0, 2, 3))
    assert float(jnp.max(diff[:6])) == 0.0 and float(jnp.min(diff[6:])) > 0.0


@pytest.mark.parametrize("mechanism,opts", [
    ("gated_deltanet", ()),
    ("kda", (("conv_width", 2),)),
    ("deltaproduct", (("num_householder", 2),)),
])
def test_decoding_carries_the_conv_window(mechanism, opts):
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=32,
                        num_layers=2, positions="none", mechanism=mechanism,
                        attention_options=opts)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
    full, decoded = forward_and_decoded(model, tokens, prompt_len=3)
    assert_close(decoded, full, rtol=1e-4, name=f"{mechanism} decoded logits")
    core = model.layers[0].attn.core
    width = core.opts.conv_width
    conv_floats = sum((width - 1) * int(np.prod(c.features)) for c in core.convs().values())
    assert core.state_size(9) == 2 * 8 * 8 + conv_floats
    # the analysis path (nnx.capture) runs the same layer: it once failed on an nnx.Dict
    captured = capture_intermediates(model, tokens)
    assert captured and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(captured))


@pytest.mark.parametrize("width", [-1, 1.5, True])
def test_bad_conv_width_is_refused_by_name(width):
    with pytest.raises(ValueError, match="conv_width must be an int >= 0"):
        _core_and_inputs("deltanet", (("conv_width", width),))
