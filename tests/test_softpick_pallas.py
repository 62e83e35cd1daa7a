"""Softpick (Zuhri et al. 2025) in the Pallas flash kernel (interpret mode, both drivers) vs the
jattn reference and an independent dense formula; cross-lowering for TPU and CUDA.

Every kernel case runs forward + backward (q, k, v and a cotangent of the kernel's ``lse`` =
``log(sum |e^s - 1| + eps)``) in one jitted vjp, at 16 x 16 tiles so a short sequence spans
full, partial and padded tiles.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jattn
from jattn import _dispatch, _pallas_dispatch, masks, normalizers, score_mods
from jattn.testing import assert_close
from pallas_kernels import flash_attention
from tests.testing import small_blocks

pytestmark = pytest.mark.usefixtures("fast_compiles")

BLK = 16
EPS = normalizers.SOFTPICK_EPS


def _inputs(seed, b, t, hq, hkv, d, q_scale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = q_scale * jax.random.normal(ks[0], (b, t, hq, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    do = jax.random.normal(ks[3], (b, t, hq, d))
    dlse = jax.random.normal(ks[4], (b, hq, t))
    return q, k, v, do, dlse


def _visible(mask, b, t, hq, seg):
    """Bool ``[B, Hq, T, T]`` of the mask (and segment ids)."""
    i = jnp.arange(t)
    vis = jnp.broadcast_to(mask.visible(i[:, None], i[None, :], 0, q_len=t, kv_len=t),
                           (b, hq, t, t))
    if seg is not None:
        vis = vis & (seg[:, None, :, None] == seg[:, None, None, :])
    return vis


def _dense(q, k, v, vis, soft_cap=None):
    """The paper's formula, written independently of jattn: ``o`` and ``log Z``."""
    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) / np.sqrt(q.shape[-1])
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    e = jnp.where(vis, jnp.expm1(jnp.where(vis, s, 0.0)), 0.0)
    z = jnp.sum(jnp.abs(e), -1) + EPS
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.relu(e) / z[..., None], v)
    return o, jnp.log(z)


def _kernel(mask, backend, seg=None, soft_cap=None):
    def fn(q, k, v):
        t = q.shape[1]
        return flash_attention(q, k, v, block_map=mask.block_map(t, t, BLK, BLK),
                               mask_fn=mask.index_fn(t, t), logits_soft_cap=soft_cap,
                               segment_ids=seg, block_q=BLK, block_kv=BLK, return_lse=True,
                               backend=backend, normalizer="softpick")
    return fn


def _vjp(fn, q, k, v, do, dlse):
    @jax.jit
    def run(q, k, v, do, dlse):
        out, pull = jax.vjp(fn, q, k, v)
        return out + pull((do, dlse))

    return run(q, k, v, do, dlse)


def _segments(b, t):
    cuts = np.array([[0] * 11 + [1] * 20 + [2] * (t - 31)] * b, np.int32)
    return jnp.asarray(cuts)


# name: (backend, (B, T, Hq, Hkv, D), mask, dtype, segments, soft_cap)
CASES = {
    "tpu-causal-gqa": ("tpu", (1, 40, 4, 2, 16), masks.causal(), jnp.float32, False, None),
    "cuda-causal-gqa": ("cuda", (1, 40, 4, 2, 16), masks.causal(), jnp.float32, False, None),
    "tpu-window-seg": ("tpu", (2, 37, 2, 1, 8), masks.sliding_window(9), jnp.float32, True, None),
    "cuda-window-seg-cap": ("cuda", (2, 37, 2, 1, 16), masks.sliding_window(9), jnp.float32,
                            True, 3.0),
    "tpu-causal-bf16": ("tpu", (1, 48, 2, 2, 16), masks.causal(), jnp.bfloat16, False, None),
    "cuda-causal-bf16": ("cuda", (1, 48, 2, 2, 16), masks.causal(), jnp.bfloat16, False, None),
}


# The slowest duplicates (one lowering already covers the feature) run with -m slow.
SLOW = {"cuda-causal-bf16", "tpu-window-seg"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(CASES)])
def test_kernel_matches_reference_and_formula(name):
    backend, (b, t, hq, hkv, d), mask, dtype, use_seg, cap = CASES[name]
    q, k, v, do, dlse = _inputs(1, b, t, hq, hkv, d)
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    seg = _segments(b, t) if use_seg else None
    got = _vjp(_kernel(mask, backend, seg, cap), q, k, v, do, dlse)
    vis = _visible(mask, b, t, hq, seg)
    want = _vjp(lambda q, k, v: _dense(q, k, v, vis, cap), *(x.astype(jnp.float32)
                                                             for x in (q, k, v, do)), dlse)
    ref_o = jattn.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                            mask=mask, segment_ids=seg, logits_soft_cap=cap,
                            normalizer="softpick", implementation="reference")
    rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    assert got[0].dtype == dtype
    assert_close(got[0], ref_o, dtype=dtype, name="o vs jattn reference")
    for n, a, e in zip(("o", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, e, rtol=rtol, atol=1e-6, name=n)


@pytest.mark.parametrize("backend", [pytest.param("tpu", marks=pytest.mark.slow), "cuda"])
def test_huge_scores_and_rows_that_see_nothing(backend):
    """Scores ~ 1e3 overflow fp32 ``e^s``: the running max keeps everything finite. Rows in
    segment 7 (absent from the keys) see nothing: output 0, ``lse = log eps``, zero
    gradients; they match jattn's reference (same convention: masked keys add 0)."""
    b, t, hq, hkv, d = 1, 40, 2, 1, 16
    q, k, v, do, dlse = _inputs(2, b, t, hq, hkv, d, q_scale=300.0)
    seg_q = jnp.asarray([[0] * 10 + [7] * 6 + [1] * 24], jnp.int32)
    seg_k = jnp.asarray([[0] * 10 + [2] * 6 + [1] * 24], jnp.int32)
    mask = masks.causal()

    def ref(q, k, v):
        return jattn.attention(q, k, v, mask=mask, segment_ids=(seg_q, seg_k),
                               normalizer="softpick", implementation="reference")

    # A zero lse cotangent: the kernel's gradients are then those of o alone, as the reference's.
    o, lse, dq, dk, dv = _vjp(_kernel(mask, backend, (seg_q, seg_k)), q, k, v, do,
                              jnp.zeros_like(dlse))
    for n, x in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.isfinite(np.asarray(x))), n
    assert np.all(np.asarray(o[:, 10:16]) == 0) and np.all(np.asarray(dq[:, 10:16]) == 0)
    np.testing.assert_allclose(np.asarray(lse[:, :, 10:16]), np.log(EPS), rtol=1e-6)
    want_o, pull = jax.vjp(ref, q, k, v)
    assert_close(o, want_o, rtol=1e-4, name="o")
    for n, a, e in zip(("dq", "dk", "dv"), (dq, dk, dv), pull(do), strict=True):
        assert_close(a, e, rtol=1e-4, atol=1e-5, name=n)


def test_no_keys_closed_form():
    q = jnp.ones((1, 3, 2, 8))
    kv = jnp.ones((1, 0, 2, 8))
    o, lse = flash_attention(q, kv, kv, return_lse=True, normalizer="softpick")
    assert np.all(np.asarray(o) == 0)
    np.testing.assert_allclose(np.asarray(lse), np.log(EPS), rtol=1e-6)


def test_kernel_eps_is_jattns():
    from pallas_kernels import _flash_kernels

    assert _flash_kernels.SOFTPICK_EPS == normalizers.SOFTPICK_EPS


def test_bad_inputs():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="normalizer"):
        flash_attention(q, q, q, normalizer="sigmoid")
    with pytest.raises(ValueError, match="sinks"):
        flash_attention(q, q, q, normalizer="softpick", sinks=jnp.zeros((2,)))


def test_dispatch_picks_the_kernel_for_softpick():
    """implementation=None on an accelerator picks pallas for softpick (not stick-breaking),
    and implementation='pallas' through jattn.attention (with a score_mod) matches reference."""
    for normalizer, want in (("softpick", "pallas"), ("stick_breaking", "xla")):
        choice = _dispatch.choose(
            None, ("reference", "xla", "pallas"), fallback="xla", accelerator=True,
            unsupported=lambda n=normalizer: _pallas_dispatch.unsupported_reason(normalizer=n))
        assert choice.name == want, (normalizer, choice)
    with pytest.raises(NotImplementedError, match="stick_breaking"):
        jattn.attention(jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)),
                        jnp.zeros((1, 8, 2, 16)), normalizer="stick_breaking",
                        implementation="pallas")

    b, t, hq, hkv, d = 1, 24, 2, 1, 16
    q, k, v, do, _ = _inputs(3, b, t, hq, hkv, d, q_scale=2.0)
    slopes = jnp.asarray([0.5, 0.25])

    def run(impl):
        def f(q, k, v, slopes):
            return jattn.attention(q, k, v, is_causal=True, normalizer="softpick",
                                   score_mod=score_mods.alibi(slopes), implementation=impl)

        @jax.jit
        def go(q, k, v, slopes, do):
            o, pull = jax.vjp(f, q, k, v, slopes)
            return (o,) + pull(do)

        return go(q, k, v, slopes, do)

    for n, a, e in zip(("o", "dq", "dk", "dv", "dslopes"), run("pallas"), run("reference"),
                       strict=True):
        assert_close(a, e, rtol=1e-4, name=n)


CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_forward_and_backward(platform):
    """Cross-lowering (Mosaic / Triton) of the softpick kernels: forward, dq and dk/dv."""
    b, t, tq, hq, hkv, d = 1, 384, 320, 4, 2, 64
    mask = masks.sliding_window(200)
    bm, mfn = mask.block_map(tq, t, 128, 128), mask.index_fn(tq, t)

    def fwd_bwd(q, k, v, seg_q, seg_k):
        def f(q, k, v):
            return flash_attention(q, k, v, block_map=bm, mask_fn=mfn, logits_soft_cap=30.0,
                                   segment_ids=(seg_q, seg_k), return_lse=True,
                                   interpret=False, backend=platform, normalizer="softpick")

        out, pull = jax.vjp(f, q, k, v)
        return out, pull(out)

    spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    args = (spec((b, tq, hq, d)), spec((b, t, hkv, d)), spec((b, t, hkv, d)),
            spec((b, tq), jnp.int32), spec((b, t), jnp.int32))
    checks = [export.DisabledSafetyCheck.custom_call(CALL["cuda"])]
    exp = export.export(jax.jit(fwd_bwd), platforms=(platform,), disabled_checks=checks)(*args)
    assert len(re.findall(re.escape(CALL[platform]), exp.mlir_module())) == 3


def test_run_time_block_mask_through_jattn(monkeypatch):
    """A traced block mask (kernel block sizes) with softpick: query block 1 of head 0 sees no
    block at all (output 0, never visited), the rest match the reference."""
    monkeypatch.setattr(_pallas_dispatch, "DEFAULT_BLOCK_Q", BLK)
    monkeypatch.setattr(_pallas_dispatch, "DEFAULT_BLOCK_KV", BLK)
    b, t, hq, hkv, d = 1, 32, 2, 1, 16
    q, k, v, do, _ = _inputs(4, b, t, hq, hkv, d, q_scale=2.0)
    bq, bk = jattn.attention_block_sizes(t, t, "pallas")
    nq, nk = -(-t // bq), -(-t // bk)
    assert (nq, nk) == (2, 2)
    bm = jnp.ones((1, hq, nq, nk), bool).at[0, 0, 1].set(False).at[0, 1, 0, 0].set(False)

    def run(impl):
        def f(q, k, v):
            return jattn.attention(q, k, v, is_causal=True, normalizer="softpick",
                                   block_mask=bm, implementation=impl)

        @jax.jit
        def go(q, k, v, do):
            o, pull = jax.vjp(f, q, k, v)
            return (o,) + pull(do)

        return go(q, k, v, do)

    got = run("pallas")
    with small_blocks(BLK, BLK):  # the reference reads the same map at its own block sizes
        want = run("reference")
    assert np.all(np.asarray(got[0][:, bq:, 0]) == 0)
    for n, a, e in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, e, rtol=1e-4, name=n)
