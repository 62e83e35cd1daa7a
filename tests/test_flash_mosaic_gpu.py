"""The Hopper flash forward (Pallas Mosaic GPU, ``pallas_kernels._flash_mosaic_gpu``) from a
CPU host: cross-lowered for ``cuda`` with ``jax.export`` (the ``mosaic_gpu_v2`` custom call
replaces the Triton forward; the backward stays Triton), the dispatch (off Hopper and for
unsupported features the Triton kernel is kept), and Mosaic GPU's interpret mode against the
fp32 reference (barriers, TMA ring, block lists, masking and statistics as compiled; the two
products as register dots)."""

from __future__ import annotations

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jattn
from jattn import masks
from pallas_kernels import _flash_mosaic_gpu as mgpu
from pallas_kernels import flash_attention

MOSAIC, TRITON = "mosaic_gpu_v2", "__gpu$xla.gpu.triton"
bf16 = jnp.bfloat16


def _spec(*shape, dtype=bf16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _calls(fn, *args):
    """``{custom call name: count}`` of ``fn`` exported for cuda from this host."""
    checks = [export.DisabledSafetyCheck.custom_call(n) for n in (MOSAIC, TRITON)]
    text = export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(*args)
    text = text.mlir_module()
    return {n: len(re.findall(r"custom_call @" + re.escape(n), text)) for n in (MOSAIC, TRITON)}


def _masked(mask, t, bq=128, bk=128, **kw):
    bm = np.asarray(mask.block_map(t, t, bq, bk))
    return lambda q, k, v: flash_attention(q, k, v, block_map=bm, mask_fn=mask.index_fn(t, t),
                                           block_q=bq, block_kv=bk, backend="cuda",
                                           interpret=False, **kw)


@pytest.mark.parametrize("with_bwd", [False, True], ids=["fwd", "fwd_bwd"])
def test_export_uses_mosaic_forward_triton_backward(with_bwd):
    # Sliding window (empty, partial and full blocks), GQA 4:2, ragged T = 320, sinks, lse.
    t = 320
    fwd = _masked(masks.sliding_window(200), t, sinks=jnp.zeros(4), return_lse=True)

    def fwd_bwd(q, k, v):
        out, pull = jax.vjp(fwd, q, k, v)
        return pull(out)

    with mgpu.force(True):
        calls = _calls(fwd_bwd if with_bwd else fwd, _spec(2, t, 4, 64), _spec(2, t, 2, 64),
                       _spec(2, t, 2, 64))
    assert calls == {MOSAIC: 1, TRITON: 2 if with_bwd else 0}


def test_off_hopper_and_unsupported_features_keep_triton():
    args = (_spec(1, 256, 2, 128), _spec(1, 256, 2, 128), _spec(1, 256, 2, 128))
    causal = masks.causal()
    # this CPU host is no Hopper: the portable Triton kernel, as before
    assert not mgpu.enabled()
    assert _calls(_masked(causal, 256), *args) == {MOSAIC: 0, TRITON: 1}
    with mgpu.force(True):  # features the Mosaic forward lacks fall back per call
        assert _calls(_masked(causal, 256, logits_soft_cap=30.0), *args)[MOSAIC] == 0
        assert _calls(_masked(causal, 256, bq=64), *args)[MOSAIC] == 0
        fp32 = (_spec(1, 256, 2, 128, dtype=jnp.float32),) * 3
        assert _calls(_masked(causal, 256), *fp32)[MOSAIC] == 0
        wide = (_spec(1, 256, 2, 256),) * 3  # D=256: the k/v ring would overflow shared memory
        assert _calls(_masked(causal, 256), *wide)[MOSAIC] == 0
        assert _calls(_masked(causal, 256), *args)[MOSAIC] == 1
    with mgpu.force(False):
        assert _calls(_masked(causal, 256), *args)[MOSAIC] == 0


def test_auto_selection_on_hopper_kill_switch_and_trace_failure_fallback(monkeypatch):
    args = (_spec(1, 256, 2, 128),) * 3
    # a fresh function per export: the choice is made at trace time and jit caches traces
    fwd = lambda: _masked(masks.causal(), 256)  # noqa: E731
    monkeypatch.setattr(mgpu, "on_hopper", lambda: True)  # as on an H100/H200
    # opt-in until measured on hardware: Triton unless PALLAS_KERNELS_MOSAIC_GPU=1
    monkeypatch.delenv("PALLAS_KERNELS_MOSAIC_GPU", raising=False)
    assert _calls(fwd(), *args) == {MOSAIC: 0, TRITON: 1}
    monkeypatch.setenv("PALLAS_KERNELS_MOSAIC_GPU", "0")
    assert _calls(fwd(), *args) == {MOSAIC: 0, TRITON: 1}
    monkeypatch.setenv("PALLAS_KERNELS_MOSAIC_GPU", "1")
    assert _calls(fwd(), *args) == {MOSAIC: 1, TRITON: 0}

    def broken(*a):
        raise AttributeError("module 'plgpu' has no attribute 'wgmma'")  # an API that moved

    monkeypatch.setattr(mgpu, "forward", broken)
    with pytest.warns(RuntimeWarning, match="using the Triton kernel"):
        assert _calls(fwd(), *args) == {MOSAIC: 0, TRITON: 1}
    with mgpu.force(True), pytest.raises(AttributeError):  # forced: the error surfaces
        _calls(fwd(), *args)


def _check_interpret(mask, t, hq, hkv, bk, sinks=None, grads=False):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, t, hq, 64)), bf16)
    k = jnp.asarray(rng.standard_normal((1, t, hkv, 64)), bf16)
    v = jnp.asarray(rng.standard_normal((1, t, hkv, 64)), bf16)
    bm = np.asarray(mask.block_map(t, t, 128, bk))

    def kernel(q, k, v):
        return flash_attention(q, k, v, block_map=bm, mask_fn=mask.index_fn(t, t), block_kv=bk,
                               sinks=sinks, return_lse=True, backend="cuda", interpret=True)

    def reference(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return jattn.attention(*f32, mask=mask, sinks=sinks, return_lse=True,
                               implementation="reference")

    # a spy: the Triton interpret path is correct too, so a silent fallback would pass
    with mgpu.force(True), mock.patch.object(mgpu, "forward", wraps=mgpu.forward) as spy:
        (o, lse), ref = kernel(q, k, v), reference(q, k, v)
        assert spy.call_count >= 1, "the Mosaic GPU forward did not run"
        rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b)  # noqa: E731
                                 / jnp.linalg.norm(b))
        assert rel(o, ref[0]) < 1e-2
        np.testing.assert_allclose(lse, ref[1], atol=2e-3)
        if grads:
            loss = lambda f: lambda *a: jnp.sum(f(*a)[0].astype(jnp.float32) ** 2)  # noqa: E731
            got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
            want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
            for a, b in zip(got, want, strict=True):
                assert rel(a, b) < 2e-2


def test_interpret_causal_matches_reference():
    # block_kv 64: the second query block walks 4 key blocks (2 full, 2 partial), so the
    # 2-slot TMA ring wraps around and both block kinds run. One head: each CTA costs the
    # interpreter seconds (GQA runs in the slow test and in the export test).
    _check_interpret(masks.causal(), 256, hq=1, hkv=1, bk=64)


@pytest.mark.slow
def test_interpret_window_gqa_sinks_gradients():
    _check_interpret(masks.sliding_window(100), 384, hq=2, hkv=1, bk=64,
                     sinks=jnp.asarray([0.5, -1.0]), grads=True)
