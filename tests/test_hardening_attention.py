"""Adversarial inputs to ``jattn.attention`` and the flash kernel (issue 15, items 3-7).

Each test pins a defect found by hostile use: gradients off by the number of tied keys when the
logits are huge (the backward recomputed ``p = exp(s - lse)`` from an lse that had lost
``log(l)`` to rounding), empty shapes that crashed, non-finite static arguments that silently
made every output NaN, and a string mask that failed deep inside JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import masks
from jattn.attention import attention
from jattn.testing import assert_close
from pallas_kernels import flash_attention

# Interpret-mode kernels are XLA while-loops: compile time dominates; skip optimizations.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _grads(fn, *args):
    """Gradients of ``sum(fn(*args) * w)`` (a fixed random cotangent) w.r.t. every arg."""

    @jax.jit
    def run(*args):
        out, pull = jax.vjp(fn, *args)
        cts = jax.tree.map(
            lambda o: jax.random.normal(jax.random.PRNGKey(7), o.shape, jnp.float32), out)
        return pull(cts)

    return run(*args)


def _qkv(b=1, tq=24, tk=24, hq=2, hkv=2, d=16, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, tq, hq, d)), jax.random.normal(ks[1], (b, tk, hkv, d)),
            jax.random.normal(ks[2], (b, tk, hkv, d)))


def _assert_grads_match(got, want, names):
    for name, a, e in zip(names, got, want, strict=True):
        # Scale the absolute floor to the gradient's size (logits of 1e30 give dk ~ 1e30).
        scale = max(float(jnp.max(jnp.abs(e))), 1.0)
        assert_close(a / scale, e / scale, rtol=1e-4, atol=1e-6, name=name)


# ---- item 3: a bias that masks whole rows with a huge negative -----------------------------
@pytest.mark.parametrize("neg", [-1e9, float(np.finfo(np.float32).min)], ids=["1e9", "finfo_min"])
def test_bias_masking_whole_rows_gradients_match_reference(neg):
    # s = -1e9 + O(1) rounds to -1e9 for every key of row 0: Tk exact ties. The lse
    # m + log(Tk) rounds back to m, so exp(s - lse) = 1 instead of 1/Tk: gradients Tk x too big.
    q, k, v = _qkv(tq=20, tk=20)
    bias = jnp.zeros((20, 20)).at[0].set(neg).at[7, 3:].set(neg)

    def fn(impl):
        return lambda q, k, v, bias: attention(q, k, v, bias=bias, implementation=impl,
                                               return_lse=True)

    want = _grads(fn("reference"), q, k, v, bias)
    got = _grads(fn("xla"), q, k, v, bias)
    _assert_grads_match(got, want, ("dq", "dk", "dv", "dbias"))


# ---- item 7: extreme logits with exact ties ------------------------------------------------
def _tied(mult):
    q, k, v = _qkv(tq=40, tk=40)
    k = jnp.tile(k[:, :4], (1, 10, 1, 1))  # every key appears 10 times: ties at any scale
    return q * mult, k, v


@pytest.mark.parametrize("mult", [1e7, 1e30])
def test_tied_extreme_logits_xla_gradients_match_reference(mult):
    q, k, v = _tied(mult)

    def fn(impl):
        return lambda q, k, v: attention(q, k, v, mask=masks.causal(), implementation=impl,
                                         return_lse=True)

    _assert_grads_match(_grads(fn("xla"), q, k, v), _grads(fn("reference"), q, k, v),
                        ("dq", "dk", "dv"))


@pytest.mark.parametrize("backend", ["tpu", "cuda"])
@pytest.mark.parametrize("mult", [1e7, 1e30])
def test_tied_extreme_logits_pallas_gradients_match_reference(mult, backend):
    # Both drivers in interpret mode, several blocks per row, sinks and an lse cotangent.
    q, k, v = _tied(mult)
    sinks = jnp.array([0.5, -1.0])
    mask = masks.causal()

    def ref(q, k, v, s):
        return attention(q, k, v, mask=mask, sinks=s, return_lse=True,
                         implementation="reference")

    def kernel(q, k, v, s):
        return flash_attention(q, k, v, block_map=mask.block_map(40, 40, 16, 16),
                               mask_fn=mask.index_fn(40, 40), sinks=s, block_q=16, block_kv=16,
                               return_lse=True, backend=backend)

    _assert_grads_match(_grads(kernel, q, k, v, sinks), _grads(ref, q, k, v, sinks),
                        ("dq", "dk", "dv", "dsinks"))


# ---- item 4: empty batch / sequences -------------------------------------------------------
# (B, Tq, Tk), with sinks?  Tk = 0 < Tq: every query sees no key (output 0, lse = sink or -inf).
EMPTY_CASES = {"Tq=0_sinks": ((1, 0, 8), True), "Tk=0": ((1, 8, 0), False),
               "Tk=0_sinks": ((1, 8, 0), True), "Tq=Tk=0": ((1, 0, 0), False),
               "B=0_sinks": ((0, 8, 8), True)}


@pytest.mark.parametrize("shape,sinks", EMPTY_CASES.values(), ids=EMPTY_CASES.keys())
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_empty_sizes_give_empty_outputs_and_zero_gradients(impl, shape, sinks):
    b, tq, tk = shape
    q, k, v = jnp.ones((b, tq, 4, 16)), jnp.ones((b, tk, 2, 16)), jnp.ones((b, tk, 2, 8))
    s = jnp.array([0.5, -1.0, 2.0, 0.0]) if sinks else None
    mask = masks.causal() if tq == tk else None

    def fn(q, k, v, s):
        return attention(q, k, v, mask=mask, sinks=s, return_lse=True, implementation=impl)

    @jax.jit
    def loss(q, k, v, s):  # lse is -inf without sinks: it contributes where finite only
        out, lse = fn(q, k, v, s)
        return out.sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    out, lse = fn(q, k, v, s)
    assert out.shape == (b, tq, 4, 8) and out.dtype == q.dtype
    assert lse.shape == (b, 4, tq)
    # No key: output 0; lse = log(exp(sink)) = sink, or -inf without sinks.
    np.testing.assert_array_equal(out, 0.0)
    want_lse = jnp.broadcast_to(s[None, :, None] if sinks else -jnp.inf, lse.shape)
    np.testing.assert_array_equal(lse, want_lse)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3) if sinks else (0, 1, 2))(q, k, v, s)
    for g, x in zip(grads[:3], (q, k, v), strict=True):
        assert g.shape == x.shape
        np.testing.assert_array_equal(g, 0.0)
    if sinks:  # d lse / d sink = p_sink = 1 on every query row
        np.testing.assert_array_equal(grads[3], jnp.full((4,), float(b * tq)))


def test_zero_heads_or_head_dim_is_a_named_error():
    q, k, v = _qkv(d=16)
    with pytest.raises(ValueError, match=r"k must have shape \[B, Tk, Hkv, Dk\] with heads"):
        attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match=r"q must have shape \[B, Tq, Hq, Dk\] with heads"):
        attention(q[..., :0], k[..., :0], v)
    with pytest.raises(ValueError, match="heads and head dims"):
        flash_attention(q[..., :0], k[..., :0], v)


# ---- item 5: non-finite static arguments ---------------------------------------------------
BAD_STATIC = [("scale", float("nan")), ("scale", float("inf")), ("scale", np.float32("-inf")),
              ("logits_soft_cap", float("nan")), ("logits_soft_cap", float("inf")),
              ("logits_soft_cap", np.float64("nan"))]


@pytest.mark.parametrize("name,value", BAD_STATIC, ids=[f"{n}={v}" for n, v in BAD_STATIC])
def test_non_finite_static_arguments_are_rejected(name, value):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        attention(q, k, v, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        flash_attention(q, k, v, **{name: value})


def test_numpy_scalar_static_arguments_are_accepted():
    q, k, v = _qkv()
    want = attention(q, k, v, scale=0.5, logits_soft_cap=3.0, implementation="reference")
    got = attention(q, k, v, scale=np.float32(0.5), logits_soft_cap=np.float32(3.0),
                    implementation="reference")
    assert_close(got, want)
    with pytest.raises(TypeError, match="scale"):
        attention(q, k, v, scale=True)


# ---- item 6: a mask of the wrong kind ------------------------------------------------------
@pytest.mark.parametrize("bad", ["causal", 3, object()], ids=["str", "int", "object"])
def test_mask_of_wrong_type_names_the_argument(bad):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"mask must be a jattn\.masks\.Mask or a bool array"):
        attention(q, k, v, mask=bad)


def test_string_mask_suggests_the_constructor():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"jattn\.masks\.causal\(\)"):
        attention(q, k, v, mask="causal")
