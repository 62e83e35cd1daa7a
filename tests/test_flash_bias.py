"""FlashBias: ``attention(..., bias_factors=(u, w))`` equals ``bias=u @ w^T`` in every
implementation, forward and gradients (q, k, v, u, w), causal + GQA, broadcast factors, the
folded and the tiled routes; errors name ``bias_factors`` and the expected shapes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _flash_bias, _pallas_dispatch
from jattn import masks as M
from jattn.testing import assert_close
from tests.testing import small_blocks

pytestmark = pytest.mark.usefixtures("fast_compiles")

B, T, HQ, HKV, D, R = 2, 21, 4, 2, 8, 3


def _inputs(seed=0, u_shape=(B, HQ, T, R), w_shape=(B, HQ, T, R)):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, HQ, D))
    k = jax.random.normal(ks[1], (B, T, HKV, D))
    v = jax.random.normal(ks[2], (B, T, HKV, D))
    u = 0.5 * jax.random.normal(ks[3], u_shape)
    w = 0.5 * jax.random.normal(ks[4], w_shape)
    cot = jax.random.normal(ks[5], (B, T, HQ, D))
    return q, k, v, u, w, cot


def _dense_bias(u, w):
    """Independent: the bias as an explicit [B|1, Hq, Tq, Tk] product (w's Hkv heads repeated
    over each query-head group)."""
    if w.shape[1] not in (1, HQ):
        w = jnp.repeat(w, HQ // w.shape[1], axis=1)
    return jnp.einsum("bhqr,bhkr->bhqk", u, w)


def _grads(fn, q, k, v, u, w, cot):
    loss = lambda *a: jnp.sum(fn(*a) * cot)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, u, w)


def _assert_same_loss_and_grads(ours, dense, q, k, v, u, w, cot):
    """``ours`` (run with small kernel tiles) matches ``dense`` in the loss and all five grads."""
    with small_blocks():
        got, g_got = _grads(ours, q, k, v, u, w, cot)
    want, g_want = _grads(dense, q, k, v, u, w, cot)
    assert_close(got, want, rtol=1e-5, name="loss")
    for a, e, n in zip(g_got, g_want, ("dq", "dk", "dv", "du", "dw"), strict=True):
        assert_close(a, e, rtol=1e-4, name=n)


@pytest.fixture
def small_pallas_blocks(monkeypatch):
    """Several kernel tiles at T = 21 (the kernel's default blocks would cover it in one)."""
    monkeypatch.setattr(_pallas_dispatch, "DEFAULT_BLOCK_Q", 8)
    monkeypatch.setattr(_pallas_dispatch, "DEFAULT_BLOCK_KV", 8)


@pytest.mark.usefixtures("small_pallas_blocks")
@pytest.mark.parametrize("impl,u_shape,w_shape", [
    # per query head: k, v repeated per head in the fold
    *[(impl, (B, HQ, T, R), (B, HQ, T, R)) for impl in ("reference", "xla", "pallas")],
    # w shared by a GQA group (no repeat); factors shared over heads / batch
    *[(impl, (1, HQ, T, R), (B, HKV, T, R)) for impl in ("xla", "pallas")],
    *[(impl, (B, 1, T, R), (1, 1, T, R)) for impl in ("xla", "pallas")],
], ids=["per_head-reference", "per_head-xla", "per_head-pallas", "gqa_w-xla", "gqa_w-pallas",
        "broadcast-xla", "broadcast-pallas"])
def test_bias_factors_equal_dense_bias(impl, u_shape, w_shape):
    q, k, v, u, w, cot = _inputs(1, u_shape, w_shape)
    mask = M.causal()

    def ours(q, k, v, u, w):
        return jattn.attention(q, k, v, mask=mask, bias_factors=(u, w), implementation=impl)

    def dense(q, k, v, u, w):
        return jattn.attention(q, k, v, mask=mask, bias=_dense_bias(u, w),
                               implementation="reference")

    _assert_same_loss_and_grads(ours, dense, q, k, v, u, w, cot)


@pytest.mark.parametrize("normalizer", ["sigmoid", "relu", "softpick", "stick_breaking"])
def test_other_normalizers_fold(normalizer, impl="xla"):
    """The fold leaves the scores' values alone, so it holds for every normalizer of the
    scores; with a soft cap and the caller's own score_mod, which runs after the bias."""
    assert _flash_bias.foldable(normalizer)
    q, k, v, u, w, cot = _inputs(2)
    shift = lambda s, b, h, i, j: 1.2 * s  # noqa: E731  (runs after the bias)

    def ours(q, k, v, u, w):
        return jattn.attention(q, k, v, mask=M.sliding_window(6), bias_factors=(u, w),
                               normalizer=normalizer, score_mod=shift, logits_soft_cap=4.0,
                               implementation=impl)

    def dense(q, k, v, u, w):
        return jattn.attention(q, k, v, mask=M.sliding_window(6), bias=_dense_bias(u, w),
                               normalizer=normalizer, score_mod=shift, logits_soft_cap=4.0,
                               implementation="reference")

    _assert_same_loss_and_grads(ours, dense, q, k, v, u, w, cot)


def test_tiled_route_for_an_unknown_rowwise_normalizer(monkeypatch):
    """A normalizer the fold is not known to be exact for goes through the score_mod route."""
    monkeypatch.setattr(_flash_bias, "foldable", lambda normalizer: False)
    q, k, v, u, w, cot = _inputs(3)
    with small_blocks():
        got = jattn.attention(q, k, v, mask=M.causal(), bias_factors=(u, w), implementation="xla")
    want = jattn.attention(q, k, v, mask=M.causal(), bias=_dense_bias(u, w),
                           implementation="reference")
    assert_close(got, want)


def test_fold_is_the_documented_concatenation():
    q, k, v, u, w, _ = _inputs(4)
    q2, k2, v2 = _flash_bias.fold(q, k, v, u, w, 0.5)
    assert q2.shape == (B, T, HQ, D + R) and k2.shape == (B, T, HQ, D + R)
    np.testing.assert_allclose(q2[..., :D], 0.5 * q, rtol=1e-6)
    np.testing.assert_allclose(k2[:, :, ::2, D:], w.transpose(0, 2, 1, 3)[:, :, ::2], rtol=1e-6)
    assert v2.shape == (B, T, HQ, D)  # w per query head: k, v repeated per head


def test_attention_weights_and_lse():
    q, k, v, u, w, _ = _inputs(5)
    p = jattn.attention_weights(q, k, mask=M.causal(), bias_factors=(u, w))
    want = jattn.attention_weights(q, k, mask=M.causal(), bias=_dense_bias(u, w))
    assert_close(p, want)
    with small_blocks():
        _, lse = jattn.attention(q, k, v, mask=M.causal(), bias_factors=(u, w), return_lse=True,
                                 implementation="xla")
    _, want_lse = jattn.attention(q, k, v, mask=M.causal(), bias=_dense_bias(u, w),
                                  return_lse=True, implementation="reference")
    assert_close(lse, want_lse)


@pytest.mark.parametrize("factors,err,match", [
    (None, TypeError, "pair"),
    ("uw", TypeError, "pair"),
    ((jnp.ones((B, HQ, T, R)),), TypeError, "pair"),
    ((jnp.ones((B, HQ, T + 1, R)), jnp.ones((B, HQ, T, R))), ValueError, "got u of shape"),
    ((jnp.ones((B, 3, T, R)), jnp.ones((B, HQ, T, R))), ValueError, "got u of shape"),
    ((jnp.ones((B, HQ, T, R)), jnp.ones((B, 3, T, R))), ValueError, "got w of shape"),
    ((jnp.ones((B, HQ, T, R)), jnp.ones((B, HQ, T, R + 1))), ValueError, "ranks differ"),
    ((jnp.ones((B, HQ, T, R), jnp.int32), jnp.ones((B, HQ, T, R))), TypeError, "floating"),
])
def test_errors_name_bias_factors_and_shapes(factors, err, match):
    q, k, v, *_ = _inputs()
    if factors is None:
        factors = jnp.ones((B, HQ, T, T))  # a dense bias passed as factors
    with pytest.raises(err, match=match) as info:
        jattn.attention(q, k, v, bias_factors=factors)
    assert "bias_factors" in str(info.value) and "Tq=21" in str(info.value)


@pytest.mark.parametrize("route", ["fold", "tiled"])
def test_xla_path_never_materializes_the_bias(route, monkeypatch):
    """The point of FlashBias: forward and backward of the xla path hold no [Tq, Tk] array
    (the equality tests above also pass if the factors were multiplied out into a dense bias).
    ``tiled``: the score_mod route of a normalizer the fold is not known to be exact for."""
    if route == "tiled":
        monkeypatch.setattr(_flash_bias, "foldable", lambda normalizer: False)
    t = 1030  # > the 512 default tile, so a [T, T] (or padded [1536, 1536]) array is the tell
    spec = jax.ShapeDtypeStruct

    def loss(q, k, v, u, w):
        o = jattn.attention(q, k, v, mask=M.causal(), bias_factors=(u, w), implementation="xla")
        return jnp.sum(o)

    args = (spec((1, t, 2, D), jnp.float32), spec((1, t, 1, D), jnp.float32),
            spec((1, t, 1, D), jnp.float32), spec((1, 2, t, R), jnp.float32),
            spec((1, 1, t, R), jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).as_text()
    square = re.findall(r"(?<![0-9])(?:1030|1536)x(?:1030|1536)x", text)
    assert not square, f"a [T, T] array in the xla program ({square[:3]})"
