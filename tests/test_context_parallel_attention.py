"""Context-parallel attention (jattn.context_parallel) on the 8-device simulated CPU mesh
(tests/conftest.py): the split call equals the single-device call, forward and gradients of q, k,
v and sinks, for ring and allgather, context sizes 2/4/8 and every kind of mask; the load
balance and the skipped hops are checked from the static block maps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import jattn
from jattn import context_parallel as cp
from jattn import masks
from jattn.testing import assert_close

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _mesh(n: int):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax.make_mesh((n, 8 // n), ("context", "data"), axis_types=(AxisType.Auto,) * 2)


def _inputs(b, tq, tk, hq, hkv, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, tq, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, tk, hkv, d), jnp.float32)
    sinks = jax.random.normal(ks[3], (hq,), jnp.float32)
    return q, k, v, sinks


def _value_and_grads(attend, q, k, v, sinks):
    """Output and d/d(q, k, v, sinks) of a loss that weights every output element differently."""

    def loss(q, k, v, sinks):
        o = attend(q, k, v, sinks)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
        return jnp.sum(o * w), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks)
    return o, grads


def _check(n, strategy, *, tq=64, tk=None, hq=4, hkv=2, use_sinks=False, **kwargs):
    tk = tk or tq
    q, k, v, sinks = _inputs(2, tq, tk, hq, hkv, 8)
    sinks_arg = (lambda s: s) if use_sinks else (lambda s: None)
    reference = jit(functools.partial(
        _value_and_grads, lambda q, k, v, s: jattn.attention(
            q, k, v, sinks=sinks_arg(s), implementation="reference", **kwargs)))
    split = jit(functools.partial(
        _value_and_grads, lambda q, k, v, s: jattn.attention(
            q, k, v, sinks=sinks_arg(s), context_axis="context", context_strategy=strategy,
            **kwargs)))
    want_o, want_g = reference(q, k, v, sinks)
    with jax.set_mesh(_mesh(n)):
        got_o, got_g = split(q, k, v, sinks)
        hlo = split.lower(q, k, v, sinks).as_text()
    assert got_o.sharding.spec[1] == "context"  # the result stays split along the sequence
    # the strategy really communicates: K/V rotate (ring) or are gathered once (allgather)
    assert ("collective_permute" if strategy == "ring" else "all_gather") in hlo, strategy
    assert_close(got_o, want_o, name="out")
    names = ("dq", "dk", "dv", "dsinks") if use_sinks else ("dq", "dk", "dv")
    for name, got, want in zip(names, got_g, want_g, strict=False):
        assert_close(got, want, name=name)


def _documents(b, t, seed=1):
    """Packed-document segment ids [B, T] with a few random boundaries per row."""
    rng = np.random.default_rng(seed)
    starts = np.zeros((b, t), np.int32)
    for row in range(b):
        starts[row, rng.choice(np.arange(1, t), size=3, replace=False)] = 1
    return jnp.asarray(np.cumsum(starts, axis=1))


CASES = {
    # name: (context size, strategy, attention kwargs and shapes); together they cover every
    # mask family, documents, sinks, soft-cap, GQA/MQA, cross attention and the normalizers.
    "causal_sinks_softcap_gqa": (4, "ring", dict(mask=masks.causal(), use_sinks=True,
                                                 logits_soft_cap=5.0)),
    "sliding_window_8way": (8, "ring", dict(mask=masks.sliding_window(6))),
    "chunked_documents_2way": (2, "ring", dict(mask=masks.chunked(16),
                                               segment_ids=_documents(2, 64))),
    "per_head_composed_neighborhood": (2, "ring", dict(mask=masks.per_head(
        [masks.neighborhood((8, 8), 3, dilation=2), masks.causal() & ~masks.chunked(8),
         masks.sliding_window(9) | masks.prefix_lm(5), masks.full()]))),
    "cross_attention_causal": (4, "ring", dict(tq=32, tk=64, mask=masks.causal())),
    "relu_window_documents": (2, "ring", dict(mask=masks.sliding_window(12), normalizer="relu",
                                              segment_ids=_documents(2, 64, seed=2))),
    "allgather_causal_documents_sinks": (4, "allgather", dict(
        mask=masks.causal(), segment_ids=_documents(2, 64, seed=3), use_sinks=True)),
    "allgather_prefix_mqa_8way": (8, "allgather", dict(mask=masks.prefix_lm(10), hkv=1)),
}
SLOW_CASES = {
    "sigmoid_causal": (4, "ring", dict(mask=masks.causal(), normalizer="sigmoid")),
    "prefix_lm_8way": (8, "ring", dict(mask=masks.prefix_lm(21))),
    "neighborhood_causal": (4, "ring", dict(mask=masks.neighborhood((8, 8), 3, causal=True))),
    "allgather_window_cross": (2, "allgather", dict(tq=32, tk=64,
                                                    mask=masks.sliding_window(7))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(name):
    n, strategy, kwargs = CASES[name]
    _check(n, strategy, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_matches_single_device_more(name):
    n, strategy, kwargs = SLOW_CASES[name]
    _check(n, strategy, **kwargs)


def test_unread_keys_are_never_computed():
    """Tq=32 < Tk=64 with a window of 8 (end-aligned): keys 0..24 are visible to no query, so
    whole hops (contiguous layout: device 0's K/V, keys 0..15) and blocks are skipped. NaN in
    those keys' K and V would poison the output or gradients if they were computed and masked.
    """
    mask = masks.sliding_window(8)
    work = cp.hop_work(mask, 32, 64, 4, layout="contiguous")
    # Device d meets device 0's K/V at hop d: skipped on every device; other hops do work.
    assert (np.diagonal(work) == 0).all() and work.sum() > 0
    q, k, v, _ = _inputs(1, 32, 64, 2, 2, 8)
    poison = jnp.arange(64)[None, :, None, None] < 16
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)

    def run(q, k, v, **kw):
        attend = (functools.partial(cp.attention, **kw) if kw
                  else functools.partial(jattn.attention, implementation="reference"))
        return _value_and_grads(lambda q, k, v, s: attend(q, k, v, mask=mask),
                                q, k, v, jnp.zeros(2))

    want_o, want_g = jit(run)(q, k, v)
    with jax.set_mesh(_mesh(4)):
        got_o, got_g = jit(functools.partial(run, axis="context", layout="contiguous"))(
            q, k_bad, v_bad)
    assert_close(got_o, want_o, name="out")
    for name, got, want in zip(("dq", "dk", "dv"), got_g, want_g, strict=False):
        assert bool(jnp.isfinite(got).all()), name
        assert_close(got, want, name=name)


def test_causal_load_balance_from_block_maps():
    """Per-device attention work (visited tiles summed over hops): zigzag within 1.2x of the
    mean for a causal mask at 2/4/8 devices; contiguous shards are far off (the reason for it)."""
    for n in (2, 4, 8):
        for t, block in ((4096, None), (4096, 64)):
            per_device = cp.hop_work(masks.causal(), t, t, n, block_q=block,
                                     block_kv=block).sum(axis=1)
            assert per_device.max() <= 1.2 * per_device.mean(), (n, t, per_device)
    contiguous = cp.hop_work(masks.causal(), 4096, 4096, 8, layout="contiguous", block_q=64,
                             block_kv=64).sum(axis=1)
    assert contiguous.max() > 1.8 * contiguous.mean()  # ~(2n - 1) / n
    # A window much shorter than a shard: most hops are skipped outright.
    window = cp.hop_work(masks.sliding_window(64), 4096, 4096, 8)
    assert (window == 0).sum() >= 8 * 8 // 2


def test_zigzag_helpers_and_permuted_inputs():
    """zigzag_permute/unpermute are inverse; a caller that permutes once gets the permuted
    output (and lse, sinks included) of the unsplit call (inputs_permuted=True skips the
    internal permutation)."""
    x = jnp.arange(2 * 32).reshape(2, 32)
    assert (cp.zigzag_unpermute(cp.zigzag_permute(x, 4), 4) == x).all()
    assert list(cp.zigzag_indices(8, 2)) == [0, 1, 6, 7, 2, 3, 4, 5]
    q, k, v, sinks = _inputs(2, 32, 32, 2, 2, 8)
    kw = dict(mask=masks.causal(), sinks=sinks, return_lse=True)
    want, want_lse = jattn.attention(q, k, v, implementation="reference", **kw)
    zz = functools.partial(cp.zigzag_permute, num_shards=4)
    with jax.set_mesh(_mesh(4)):
        got, got_lse = jit(lambda q, k, v: cp.attention(q, k, v, axis="context",
                                                        inputs_permuted=True, **kw))(
            zz(q), zz(k), zz(v))
    assert_close(cp.zigzag_unpermute(got, 4), want, name="out")
    assert_close(cp.zigzag_unpermute(got_lse, 4, axis=2), want_lse, name="lse")


def test_eager_calls_on_a_partly_manual_mesh():
    """Called outside jit on a mesh with another (automatic) axis: a bare partial-manual
    shard_map rejected its own out_specs ("out_specs refers to 'data'"); attention and the
    linear functions both equal the unsplit call."""
    q, k, v = _inputs(2, 32, 32, 2, 2, 8)[:3]
    want = jattn.attention(q, k, v, mask=masks.causal())
    g = jnp.full(q.shape, -0.1)
    want_gla, _ = jattn.linear.gla(q, k, v, g)
    with jax.set_mesh(_mesh(4)):
        got = jattn.attention(q, k, v, mask=masks.causal(), context_axis="context")
        got_gla, _ = jattn.linear.gla(q, k, v, g, context_axis="context")
    assert_close(got, want)
    assert_close(got_gla, want_gla)


def test_bad_input_names_the_argument():
    q, k, v, _ = _inputs(1, 36, 36, 2, 2, 8)
    with jax.set_mesh(_mesh(4)):
        with pytest.raises(ValueError, match=r"36 must be divisible by 2 \* 4 = 8.*'context'"):
            jattn.attention(q, k, v, context_axis="context")
        with pytest.raises(ValueError, match="context_axis='seq' is not an axis.*'context'"):
            jattn.attention(q, k, v, context_axis="seq")
        q, k, v, _ = _inputs(1, 32, 32, 2, 2, 8)
        with pytest.raises(ValueError, match="context_strategy"):
            jattn.attention(q, k, v, context_axis="context", context_strategy="tree")
        with pytest.raises(ValueError, match="mask must be a jattn.masks.Mask"):
            jattn.attention(q, k, v, mask=jnp.ones((32, 32), bool), context_axis="context")
        with pytest.raises(ValueError, match="bias"):
            jattn.attention(q, k, v, bias=jnp.zeros((32, 32)), context_axis="context")
        with pytest.raises(NotImplementedError, match="pallas"):
            jattn.attention(q, k, v, context_axis="context", implementation="pallas")
    with pytest.raises(ValueError, match="needs a current mesh"):
        jattn.attention(q, k, v, context_axis="context")
