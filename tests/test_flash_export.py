"""Cross-lowering of the flash kernel from the CPU host with jax.export (no accelerator needed).

TPU: Mosaic lowering -> ``tpu_custom_call`` (Mosaic's own layout/VMEM checks run only at TPU
compile time). GPU: the Triton lowering (selected by Triton compiler params) ->
``__gpu$xla.gpu.triton``; GPU custom calls carry no serialization guarantee, hence
``disabled_checks``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jattn import masks
from pallas_kernels import flash_attention

CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
B, T, HQ, HKV, D = 2, 384, 4, 2, 64


def _spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _export(fn, platform, *args):
    checks = [export.DisabledSafetyCheck.custom_call(CALL["cuda"])]
    exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(*args)
    text = exp.mlir_module()
    return text, len(re.findall(re.escape(CALL[platform]), text))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("with_bwd", [False, True], ids=["fwd", "fwd_bwd"])
def test_export(platform, with_bwd):
    # Sliding window (concrete map: TPU grid width < nk) + sinks + soft cap + documents + GQA,
    # and a ragged length (T = 384 is 3 blocks of 128; Tq = 320 pads the last query block).
    tq = 320
    mask = masks.sliding_window(200)
    bm = mask.block_map(tq, T, 128, 128)
    mfn = mask.index_fn(tq, T)

    def fwd(q, k, v, sinks, seg_q, seg_k):
        return flash_attention(q, k, v, block_map=bm, mask_fn=mfn, sinks=sinks,
                               logits_soft_cap=30.0, segment_ids=(seg_q, seg_k),
                               return_lse=True, interpret=False, backend=platform)

    def fwd_bwd(q, k, v, sinks, seg_q, seg_k):
        (o, lse), pull = jax.vjp(lambda *a: fwd(*a, seg_q, seg_k), q, k, v, sinks)
        return o, pull((o, lse))

    args = (_spec((B, tq, HQ, D)), _spec((B, T, HKV, D)), _spec((B, T, HKV, D)),
            _spec((HQ,), jnp.float32), _spec((B, tq), jnp.int32), _spec((B, T), jnp.int32))
    text, calls = _export(fwd_bwd if with_bwd else fwd, platform, *args)
    assert calls == (3 if with_bwd else 1), text[:2000]  # fwd; + dq and dk/dv kernels


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_unmasked_gqa8_odd_head_dim(platform):
    # No mask / no padding: every block full (the mask is never evaluated); D=80 is padded to
    # 128 on GPU; MQA-style ratio 8.
    def fwd_bwd(q, k, v):
        o, pull = jax.vjp(lambda *a: flash_attention(*a, interpret=False, backend=platform),
                          q, k, v)
        return pull(o)

    args = (_spec((1, 256, 8, 80)), _spec((1, 256, 1, 80)), _spec((1, 256, 1, 80)))
    _, calls = _export(fwd_bwd, platform, *args)
    assert calls == 3


def test_traced_block_map_exports():
    # A block map computed under jit (traced) keeps the full grid width and still lowers.
    def fwd(q, k, v, seg):
        bm = jnp.asarray(masks.causal().block_map(T, T, 128, 128))
        return flash_attention(q, k, v, block_map=bm * (seg[0, 0] >= 0),
                               mask_fn=masks.causal().index_fn(T, T), interpret=False,
                               backend="tpu")

    args = (_spec((1, T, HQ, D)), _spec((1, T, HKV, D)), _spec((1, T, HKV, D)),
            _spec((1, T), jnp.int32))
    _, calls = _export(fwd, "tpu", *args)
    assert calls == 1


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("mask", [masks.chunked(128), masks.neighborhood((16, 16), 5),
                                  masks.causal() & masks.strided(3, 1),
                                  masks.with_prefix_tokens(masks.grid_windows((15, 17), 4), 1)],
                         ids=["chunked", "neighborhood2d", "strided", "grid_windows_prefix"])
def test_export_masks_with_integer_division(platform, mask):
    # Index functions that divide (chunk ids, grid coordinates, strides) must lower for TPU
    # from a CPU host too: masks use lax.div/rem rather than jnp.floor_divide (which goes
    # through `sign`, whose Mosaic rule queries the TPU generation).
    t = 256
    bm, mfn = mask.block_map(t, t, 128, 128), mask.index_fn(t, t)

    def fwd(q, k, v):
        return flash_attention(q, k, v, block_map=bm, mask_fn=mfn, interpret=False,
                               backend=platform)

    args = (_spec((1, t, 2, D)), _spec((1, t, 2, D)), _spec((1, t, 2, D)))
    _, calls = _export(fwd, platform, *args)
    assert calls == 1


@pytest.mark.parametrize("mask", [masks.a_shape(4, 100),
                                  masks.vertical_slash([0, 1, 2, 77], [0, 1, 2, 3, 150]),
                                  masks.cross_shaped((16, 16), 4, "vertical")],
                         ids=["a_shape", "vertical_slash", "cross_shaped"])
def test_export_long_context_and_stripe_masks_for_tpu(mask):
    # Issue 18's masks through the same TPU lowering (the platform whose Mosaic rules reject
    # floor_divide); the GPU lowering of their integer ops is the same as the masks above.
    test_export_masks_with_integer_division("tpu", mask)
