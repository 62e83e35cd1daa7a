"""score_mod with captured arrays in the Pallas flash kernel (interpret mode, both drivers).

The captured arrays become kernel operands: per-position arrays (FoX's cumsums) sliced per block,
small per-head tables (ALiBi slopes, T5 buckets) passed whole, anything else a closure holds
passed whole when small. Their gradients come from per-program partials summed outside the
kernel. Oracles: the dense formulas of ``tests/test_score_mod.py`` (shared with the reference and
xla tests), plain autodiff for the captured arrays' gradients.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jattn
from jattn import _pallas_dispatch, score_mods
from jattn import masks as M
from jattn.testing import assert_close
from tests.test_score_mod import HQ, B, T, _case, _dense_attention, _qkv, _visible

pytestmark = pytest.mark.usefixtures("fast_compiles")

BLOCKS = {"tpu": 8, "cuda": 16}  # T = 21: several tiles, a padded last one, on both drivers


def _pallas(q, k, v, mod, backend, mask=M.causal(), **kw):
    blk = BLOCKS[backend]
    return _pallas_dispatch.attention_pallas(
        q, k, v, mask=mask, dense_mask=None, bias=None, scale=None, normalizer="softmax",
        sinks=None, logits_soft_cap=kw.pop("logits_soft_cap", None), segment_ids=None,
        return_lse=False, block_q=blk, block_kv=blk, backend=backend, score_mod=mod, **kw)


def _compose_case():
    """forgetting + relative_bias + alibi, one captured array each (a tuple)."""
    cases = [_case(n) for n in ("forgetting", "relative_bias", "alibi")]

    def make(arrs):
        return score_mods.compose(*(c[0](a) for c, a in zip(cases, arrs, strict=True)))

    def dense(arrs):
        mods = [c[2](a) for c, a in zip(cases, arrs, strict=True)]

        def apply(s):
            for m in mods:
                s = m(s)
            return s

        return apply

    return make, tuple(c[1] for c in cases), dense


def _run_case(name, backend):
    make, arr, dense = _compose_case() if name == "compose" else _case(name)
    q, k, v = _qkv(3)
    w = jax.random.normal(jax.random.PRNGKey(4), (B, T, HQ, q.shape[-1]))

    @jax.jit
    def ours(arr, q, k, v):
        o = _pallas(q, k, v, make(arr), backend, logits_soft_cap=6.0)
        return jnp.sum(o * w), o

    def oracle(arr, q, k, v):
        capped = lambda s: 6.0 * jnp.tanh(dense(arr)(s) / 6.0)  # noqa: E731
        o = _dense_attention(q, k, v, capped, _visible(M.causal()))
        return jnp.sum(o * w), o

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)  # noqa: E731
    return grad(ours)(arr, q, k, v), grad(oracle)(arr, q, k, v)


# every score_mod on one driver in the default suite (both drivers covered), the rest slow
_DEFAULT_DRIVER = {"alibi": "tpu", "relative_bias": "cuda", "forgetting": "tpu",
                   "tanh_cap": "cuda", "compose": "tpu"}


@pytest.mark.parametrize("name,backend", [
    pytest.param(n, b, marks=() if _DEFAULT_DRIVER[n] == b else pytest.mark.slow)
    for n in _DEFAULT_DRIVER for b in ("tpu", "cuda")])
def test_captured_arrays_match_dense_formula(name, backend):
    """Forward and gradients w.r.t. q, k, v and every captured array; causal, GQA (Hq=4,
    Hkv=2), a soft cap after the score_mod, padded tiles."""
    ((_, out), grads), ((_, want), want_grads) = _run_case(name, backend)
    assert_close(out, want, name="out")
    names = (name, "dq", "dk", "dv")
    for g, wg, n in zip(grads, want_grads, names, strict=True):
        for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(wg), strict=True):
            assert_close(a, e, rtol=1e-4, name=f"d{n}")


@pytest.mark.parametrize("backend", ["tpu", "cuda"])
def test_captured_array_gradients_are_bitwise_identical_across_runs(backend):
    make, arrs, _ = _compose_case()
    q, k, v = _qkv(5)

    def loss(arrs, q):
        return jnp.sum(_pallas(q, k, v, make(arrs), backend) ** 2)

    first = jax.jit(jax.grad(loss, argnums=(0, 1)))(arrs, q)
    again = jax.jit(jax.grad(loss, argnums=(0, 1)))(arrs, q)  # a fresh trace and compile
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("backend", ["tpu", "cuda"])
def test_user_closure_over_small_arrays_goes_whole(backend):
    """No KernelForm: the arrays are found by tracing and passed whole (float: gradients;
    integer: none), composed with a library score_mod that has one."""
    q, k, v = _qkv(6)
    offsets = jnp.arange(HQ, dtype=jnp.int32)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])

    def make(shift):
        # a per-head temperature (a constant shift per row would have a zero gradient)
        user = lambda s, b, h, i, j: s * (1.0 + shift[h]) + 0.1 * offsets[h]  # noqa: E731
        return score_mods.compose(user, score_mods.alibi(slopes))

    def loss(shift, q, impl):
        if impl == "pallas":
            o = _pallas(q, k, v, make(shift), backend)
        else:
            o = jattn.attention(q, k, v, mask=M.causal(), score_mod=make(shift),
                                implementation=impl)
        return jnp.sum(jnp.sin(o))

    shift = jnp.linspace(-0.5, 0.5, HQ)
    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(shift, q, "pallas")
    want = jax.grad(loss, (0, 1))(shift, q, "reference")
    for a, e, n in zip(got, want, ("dshift", "dq"), strict=True):
        assert_close(a, e, rtol=1e-4, name=n)


@pytest.mark.parametrize("backend", ["tpu", "cuda"])
def test_with_sinks_and_segments(backend):
    """Operands after the optional sink / segment inputs: forgetting + alibi with per-head
    sinks and packed documents, against the reference (forward, lse and all gradients)."""
    make, arrs, _ = _compose_case()
    arrs = arrs[0], arrs[2]  # forgetting gates, alibi slopes
    q, k, v = _qkv(9)
    sinks = jnp.linspace(-1.0, 1.0, HQ)
    seg = jnp.asarray(np.repeat([[0] * 9 + [1] * 12], B, 0))
    w = jax.random.normal(jax.random.PRNGKey(10), q.shape)

    def loss(arrs, q, sinks, impl):
        mod = score_mods.compose(score_mods.forgetting(arrs[0]), score_mods.alibi(arrs[1]))
        kw = dict(sinks=sinks, segment_ids=seg, return_lse=True, mask=M.causal())
        if impl == "pallas":
            blk = BLOCKS[backend]
            o, lse = _pallas_dispatch.attention_pallas(
                q, k, v, dense_mask=None, bias=None, scale=None, normalizer="softmax",
                logits_soft_cap=None, block_q=blk, block_kv=blk, backend=backend,
                score_mod=mod, **kw)
        else:
            o, lse = jattn.attention(q, k, v, score_mod=mod, implementation=impl, **kw)
        return jnp.sum(o * w) + jnp.sum(jnp.sin(lse))

    got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)(arrs, q, sinks, "pallas")
    want = jax.value_and_grad(loss, (0, 1, 2))(arrs, q, sinks, "reference")
    assert_close(got[0], want[0], rtol=1e-5, name="loss")
    for a, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert_close(a, e, rtol=1e-4, name="grad")


def test_through_jattn_attention_at_default_blocks():
    make, arr, _ = _case("forgetting")
    q, k, v = _qkv(7)
    got = jattn.attention(q, k, v, mask=M.causal(), score_mod=make(arr), implementation="pallas")
    # the kernel runs (a silent fallback to the xla path would also equal the reference)
    jaxpr = jax.make_jaxpr(lambda q: jattn.attention(
        q, k, v, mask=M.causal(), score_mod=make(arr), implementation="pallas"))(q)
    assert "pallas_call" in str(jaxpr)
    want = jattn.attention(q, k, v, mask=M.causal(), score_mod=make(arr),
                           implementation="reference")
    assert_close(got, want)


def test_refusals_name_why_and_none_falls_back():
    q, k, v = _qkv(8)
    # FoX gates for another length: the kernel operand does not fit this call
    mod = score_mods.forgetting(jnp.zeros((B, T + 3, HQ)))
    with pytest.raises(NotImplementedError, match=r"forgetting: its kernel operand 0 \('q'\)"):
        jattn.attention(q, k, v, mask=M.causal(), score_mod=mod, implementation="pallas")
    # a gather from a captured array cannot be lowered by a compiled kernel (interpret runs it)
    shift = jnp.ones((HQ,))
    gathers = lambda s, b, h, i, j: s + shift[h]  # noqa: E731
    with pytest.raises(NotImplementedError, match="indexes an array it closes over"):
        _pallas_dispatch.kernel_score_mod(gathers, B, HQ, T, T, 8, 8, compiled=True)
    fn, ops, axes = _pallas_dispatch.kernel_score_mod(gathers, B, HQ, T, T, 8, 8,
                                                      compiled=False)
    assert axes == ["const"] and ops[0].shape == (HQ,)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ["forgetting", "relative_bias", "compose"])
def test_export_with_captured_arrays(platform, name):
    """Cross-lowering from the CPU host: forward + backward of the kernel with the operands
    (Mosaic for TPU; Triton for GPU): blocks of 128, GQA, a causal block map."""
    call = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
    b, t, hq, hkv, d, nb = 1, 256, 4, 2, 64, 32
    mask = M.causal()

    def mod(log_f, table):
        fox = score_mods.forgetting(log_f)
        rel = score_mods.relative_bias(table, nb, 128, bidirectional=False)
        return {"forgetting": fox, "relative_bias": rel,
                "compose": score_mods.compose(fox, rel)}[name]

    def fwd_bwd(q, k, v, log_f, table):
        def f(q, k, v, log_f, table):
            return _pallas_dispatch.attention_pallas(
                q, k, v, mask=mask, dense_mask=None, bias=None, scale=None,
                normalizer="softmax", sinks=None, logits_soft_cap=None, segment_ids=None,
                return_lse=False, interpret=False, backend=platform,
                score_mod=mod(log_f, table))

        o, pull = jax.vjp(f, q, k, v, log_f, table)
        return o, pull(o)

    spec = jax.ShapeDtypeStruct
    args = (spec((b, t, hq, d), jnp.bfloat16), spec((b, t, hkv, d), jnp.bfloat16),
            spec((b, t, hkv, d), jnp.bfloat16), spec((b, t, hq), jnp.float32),
            spec((nb, hq), jnp.float32))
    exp = export.export(jax.jit(fwd_bwd), platforms=(platform,), disabled_checks=[
        export.DisabledSafetyCheck.custom_call(call["cuda"])])(*args)
    assert len(re.findall(re.escape(call[platform]), exp.mlir_module())) == 3
