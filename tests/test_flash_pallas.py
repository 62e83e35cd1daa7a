"""pallas_kernels.flash_attention in interpret mode vs the fp32 reference, jax.nn and JAX's kernels.

Every case runs forward + backward (q, k, v, sinks and an lse cotangent) in ONE jitted vjp so each
costs a single XLA compile; both drivers (TPU grid + scalar prefetch, GPU in-kernel loop) run in
interpret mode via ``backend=``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import masks
from jattn.attention import attention
from jattn.testing import assert_close
from pallas_kernels import block_map as bsp
from pallas_kernels import flash_attention
from pallas_kernels.flash import block_sizes

# Interpret-mode kernels are XLA while-loops: compile time dominates; skip optimizations.
pytestmark = pytest.mark.usefixtures("fast_compiles")


BLK = 16


def _inputs(seed, b, tq, tk, hq, hkv, d, dtype, dv=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, tq, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, tk, hkv, dv or d), jnp.float32)
    do = jax.random.normal(ks[3], (b, tq, hq, dv or d), jnp.float32)
    dlse = jax.random.normal(ks[4], (b, hq, tq), jnp.float32)
    sinks = jax.random.normal(ks[5], (hq,), jnp.float32)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(do), dlse, sinks


def _vjp(fn, q, k, v, sinks, do, dlse):
    """(o, lse, dq, dk, dv, dsinks) of ``fn(q, k, v, sinks) -> (o, lse)`` in one jit."""

    @jax.jit
    def run(q, k, v, sinks, do, dlse):
        (o, lse), pull = jax.vjp(fn, q, k, v, sinks)
        return (o, lse) + tuple(pull((do, dlse)))

    return run(q, k, v, sinks, do, dlse)


def _reference(q, k, v, sinks, do, dlse, *, mask, soft_cap=None, segment_ids=None):
    """fp32 jattn reference (materialized scores)."""
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731

    def fn(q, k, v, s):
        return attention(q, k, v, mask=mask, sinks=s, logits_soft_cap=soft_cap,
                         segment_ids=segment_ids, return_lse=True, implementation="reference")

    return _vjp(fn, f32(q), f32(k), f32(v), sinks, f32(do), dlse)


def _kernel(q, k, v, sinks, do, dlse, *, mask, backend, soft_cap=None, segment_ids=None,
            bq=BLK, bk=BLK):
    tq, tk = q.shape[1], k.shape[1]
    bm = None if mask is None else mask.block_map(tq, tk, bq, bk)
    mfn = None if mask is None else mask.index_fn(tq, tk)

    def fn(q, k, v, s):
        return flash_attention(q, k, v, block_map=bm, mask_fn=mfn, sinks=s,
                               logits_soft_cap=soft_cap, segment_ids=segment_ids,
                               block_q=bq, block_kv=bk, return_lse=True, backend=backend)

    return _vjp(fn, q, k, v, sinks, do, dlse)


def _compare(got, want, dtype, names=("o", "lse", "dq", "dk", "dv", "dsinks")):
    for name, a, e in zip(names, got, want, strict=True):
        if a is None or e is None:
            assert a is None and e is None, name
            continue
        if name == "lse":  # -inf exactly where nothing is visible; compare the finite part
            np.testing.assert_array_equal(np.isneginf(a), np.isneginf(e))
            a, e = jnp.where(jnp.isfinite(e), a, 0.0), jnp.where(jnp.isfinite(e), e, 0.0)
            assert_close(a, e, dtype=jnp.float32 if dtype == jnp.float32 else dtype, name=name)
            continue
        if name == "dsinks":
            assert_close(a, e, dtype=dtype, name=name, atol=5e-2 if dtype == jnp.bfloat16 else None)
            continue
        assert_close(a.astype(jnp.float32), e, dtype=dtype, name=name)


def _dense(mask, tq, tk, b=None, hq=None):
    d = mask.dense(tq, tk)
    return d[None, None] if d.ndim == 2 else d[None]


# name: (shape (B, Tq, Tk, Hq, Hkv, D), mask, backend, dtype, sinks, soft_cap, segments)
CASES = {
    "causal_gqa2_ragged_tpu": ((1, 40, 40, 4, 2, 16), masks.causal(), "tpu", "f32", 0, None, None),
    "causal_gqa2_ragged_cuda": ((1, 40, 40, 4, 2, 16), masks.causal(), "cuda", "f32", 0, None,
                                None),
    "chunked_softcap_cuda": ((1, 48, 48, 2, 2, 16), masks.chunked(20), "cuda", "f32", 0, 5.0,
                             None),
    "prefix_lm_sinks_gqa8_tpu": ((1, 40, 40, 8, 1, 16), masks.prefix_lm(10), "tpu", "f32", 1,
                                 None, None),
    "neighborhood2d_sinks_cuda": ((1, 48, 48, 2, 1, 16),
                                  masks.neighborhood((6, 8), (3, 3)), "cuda", "f32", 1, None,
                                  None),
    "document_causal_tpu": ((2, 40, 40, 2, 1, 16), masks.causal(), "tpu", "f32", 0, None, "self"),
    "segments_pair_tq_ne_tk_cuda": ((2, 24, 40, 2, 2, 16), None, "cuda", "f32", 1, 3.0, "pair"),
    "no_mask_full_blocks_cuda": ((1, 32, 32, 2, 2, 32), None, "cuda", "f32", 0, None, None),
    "bf16_causal_sinks_tpu": ((1, 40, 40, 4, 2, 32), masks.causal(), "tpu", "bf16", 1, None,
                              None),
    "bf16_window_cuda": ((1, 40, 40, 4, 4, 32), masks.sliding_window(12), "cuda", "bf16", 0, None,
                         None),
    "per_head_masks_tpu": ((1, 32, 32, 2, 1, 16),
                           masks.per_head([masks.causal(), masks.local(3, 3)]), "tpu", "f32", 0,
                           None, None),
    # Issue 18's masks (block maps exact; the kernel skips empty blocks, drops the mask on full).
    "a_shape_cuda": ((1, 40, 40, 2, 1, 16), masks.a_shape(3, 9), "cuda", "f32", 0, None, None),
    "vertical_slash_cuda": ((1, 40, 40, 2, 1, 16),
                            masks.vertical_slash([0, 1, 17, 18, 30], [0, 1, 2, 13]), "cuda",
                            "f32", 0, None, None),
    "cross_shaped_per_head_cuda": ((1, 48, 48, 2, 1, 16),
                                   masks.per_head([masks.cross_shaped((6, 8), 2, "horizontal"),
                                                   masks.cross_shaped((6, 8), 3, "vertical")]),
                                   "cuda", "f32", 0, None, None),
}


def _segments(kind, b, tq, tk):
    if kind is None:
        return None
    # Three documents per row, boundaries straddling blocks; batch rows differ.
    seg_q = (jnp.arange(tq)[None] >= jnp.array([[7], [20]])).astype(jnp.int32)
    seg_q = seg_q + (jnp.arange(tq)[None] >= jnp.array([[25], [33]]))
    if kind == "self":
        return seg_q
    seg_k = (jnp.arange(tk)[None] >= jnp.array([[9], [30]])).astype(jnp.int32)
    seg_k = seg_k + (jnp.arange(tk)[None] >= jnp.array([[31], [35]]))
    return seg_q, seg_k


SLOW_CASES = {"causal_gqa2_ragged_cuda", "no_mask_full_blocks_cuda", "bf16_window_cuda",
              "per_head_masks_tpu"}  # covered in spirit by the fast ones; run with -m slow


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES])
def test_matches_reference(name):
    (b, tq, tk, hq, hkv, d), mask, backend, dt, use_sinks, cap, seg_kind = CASES[name]
    dtype = jnp.float32 if dt == "f32" else jnp.bfloat16
    q, k, v, do, dlse, sinks = _inputs(hash(name) % 1000, b, tq, tk, hq, hkv, d, dtype)
    sinks = sinks if use_sinks else None
    seg = _segments(seg_kind, b, tq, tk)
    got = _kernel(q, k, v, sinks, do, dlse, mask=mask, backend=backend, soft_cap=cap,
                  segment_ids=seg)
    want = _reference(q, k, v, sinks, do, dlse, mask=mask, soft_cap=cap, segment_ids=seg)
    _compare(got, want, dtype)
    assert got[0].dtype == dtype and got[0].shape == (b, tq, hq, d)
    if sinks is None and seg is None and cap is None:  # vs jax.nn.dot_product_attention
        dense = None if mask is None else _dense(mask, tq, tk)
        if dense is not None and dense.shape[1] > 1:
            return
        ref = jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")
        assert_close(got[0], ref, dtype=dtype, name="o vs jax.nn.dot_product_attention")


@pytest.mark.parametrize("backend", [pytest.param("tpu", marks=pytest.mark.slow), "cuda"])
def test_rows_without_visible_keys(backend):
    # End-aligned causal with Tq > Tk: query rows 0..15 see no key. GQA ratio 8.
    b, tq, tk, hq, hkv, d = 1, 40, 24, 8, 1, 16
    q, k, v, do, dlse, _ = _inputs(3, b, tq, tk, hq, hkv, d, jnp.float32)
    dlse = dlse.at[:, :, :16].set(0.0)
    mask = masks.causal()
    got = _kernel(q, k, v, None, do, dlse, mask=mask, backend=backend)
    o, lse = got[0], got[1]
    assert np.all(np.asarray(o[:, :16]) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, :, :16])))
    for g in got[2:5]:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(got[2][:, :16]) == 0.0)  # dq of empty rows
    _compare(got, _reference(q, k, v, None, do, dlse, mask=mask), jnp.float32)


@pytest.mark.parametrize("backend", ["tpu", pytest.param("cuda", marks=pytest.mark.slow)])
def test_empty_blocks_are_skipped(backend):
    # Tq=16 queries at the end of Tk=64 keys, window 16: key blocks 0 and 1 are empty for every
    # query block. NaNs there must not reach outputs or gradients (they are never computed).
    b, tq, tk, hq, hkv, d = 1, 16, 64, 4, 1, 16
    q, k, v, do, dlse, _ = _inputs(5, b, tq, tk, hq, hkv, d, jnp.float32)
    mask = masks.sliding_window(16)
    bm = np.asarray(mask.block_map(tq, tk, BLK, BLK))
    assert bm[:, :2].max() == 0 and bm[:, 2:].min() > 0
    ents, cnts = bsp.compact(bm[None, None], bsp.static_width(bm))
    assert np.asarray(ents).shape[-1] == 2  # grid width shrinks to the non-empty blocks
    np.testing.assert_array_equal(np.asarray(ents)[..., :] // 4, [[[[2, 3]]]])
    k_nan = k.at[:, :32].set(jnp.nan)
    v_nan = v.at[:, :32].set(jnp.nan)
    got = _kernel(q, k_nan, v_nan, None, do, dlse, mask=mask, backend=backend)
    for g in got:
        if g is not None:
            assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(got[3][:, :32]) == 0) and np.all(np.asarray(got[4][:, :32]) == 0)
    want = _reference(q, k, v, None, do, dlse, mask=mask)
    _compare(got, want, jnp.float32)
    ref = jax.nn.dot_product_attention(q, k, v, mask=_dense(mask, tq, tk))
    assert_close(got[0], ref, name="o vs jax.nn.dot_product_attention")


# ------------------------------------------------------------------------------------------
# Block-list bookkeeping (no kernels).
# ------------------------------------------------------------------------------------------
def test_compact_lists():
    bm = np.array([[0, 2, 0, 1], [0, 0, 0, 0], [1, 1, 2, 2]], np.int32)
    ents, cnts = bsp.compact(bm, bsp.static_width(bm))
    ents = np.asarray(ents)
    np.testing.assert_array_equal(np.asarray(cnts), [2, 0, 4])
    np.testing.assert_array_equal(ents // 4, [[1, 3, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(ents % 4, [[2, 1, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2]])
    assert bsp.static_width(bm[:2]) == 2
    # Transposed lists (dk/dv pass): per key block, the non-empty query blocks.
    ents_t, cnts_t = bsp.compact(bm.T, bsp.static_width(bm.T))
    np.testing.assert_array_equal(np.asarray(cnts_t), [1, 2, 1, 2])
    np.testing.assert_array_equal(np.asarray(ents_t)[:, :2] // 4, [[2, 2], [0, 2], [2, 2], [0, 2]])
    # Traced maps keep the full width.
    assert jax.jit(lambda m: bsp.compact(m, bsp.static_width(m))[0])(bm).shape == (3, 4)


@pytest.mark.parametrize("seed", range(4))
def test_host_and_traced_compaction_agree(seed):
    # Random 0/1/2 maps with all-empty rows (and whole-empty maps): the numpy compaction used for
    # static maps and the jnp one used for traced maps give the same lists and counts.
    rng = np.random.default_rng(seed)
    shape = (2, 3, int(rng.integers(1, 9)), int(rng.integers(1, 13)))
    bm = rng.choice(3, size=shape, p=[0.5, 0.3, 0.2]).astype(np.int8)
    bm[0, 1, 0] = 0  # an all-empty row
    bm[1, 2] = 0  # an all-empty map
    width = bsp.static_width(bm)
    host = bsp.compact_host(bm, width)
    traced = jax.jit(bsp.compact_traced, static_argnums=1)(bm, width)
    assert isinstance(host[0], np.ndarray) and isinstance(host[1], np.ndarray)
    for h, t in zip(host, traced, strict=True):
        assert h.dtype == np.int32 and h.shape == t.shape
        np.testing.assert_array_equal(h, np.asarray(t))
    np.testing.assert_array_equal(host[1], (bm > 0).sum(-1))
    # compact() picks the host path for a concrete map, the jnp path under jit.
    assert isinstance(bsp.compact(bm)[0], np.ndarray)
    np.testing.assert_array_equal(jax.jit(lambda m: bsp.compact(m, width)[0])(bm), host[0])


def _lowered_fwd_bwd(mask, t, **kw):
    def fwd_bwd(q, k, v):
        def f(q, k, v):
            return flash_attention(q, k, v, block_map=mask.block_map(t, t, BLK, BLK),
                                   mask_fn=mask.index_fn(t, t), block_q=BLK, block_kv=BLK,
                                   interpret=True, backend="tpu", **kw)
        o, pull = jax.vjp(f, q, k, v)
        return pull(o)

    x = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    return jax.jit(fwd_bwd).lower(x, x, x).as_text()


def test_static_block_map_compacts_on_host():
    # Issue 21: a static map compacted with jnp became an argsort of a constant, which XLA
    # constant-folds at compile time (10-20 s at 64K). Compacted on the host, no sort is left.
    assert "sort" not in _lowered_fwd_bwd(masks.sliding_window(20), 96)
    # A map that depends on traced segment ids keeps the jnp compaction.
    seg = jnp.zeros((1, 96), jnp.int32)
    assert "sort" in _lowered_fwd_bwd(masks.causal(), 96, segment_ids=seg + jnp.arange(96) // 40)


def test_segment_block_map_matches_jattn():
    seg = jax.random.randint(jax.random.PRNGKey(0), (3, 37), 0, 4).sort(axis=1)
    seg_k = jax.random.randint(jax.random.PRNGKey(1), (3, 50), 0, 4).sort(axis=1)
    ours = bsp.segment_block_map(seg, seg_k, 8, 16)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(masks.segment_block_map(
        seg, seg_k, 8, 16)))


def test_block_map_validation_and_padding_demotion():
    with pytest.raises(ValueError, match="block_map"):
        bsp.normalize_block_map(np.zeros((2, 3), np.int8), 4, 2, 2, 32, 16)
    bm = bsp.normalize_block_map(np.full((2, 3), 2, np.int8), 4, 2, 3, 40, 16)
    np.testing.assert_array_equal(bm[0, :, -1], [1, 1])  # straddling key block: never full
    assert block_sizes(20, 300, 128, 64, "cuda") == (32, 64)
    assert block_sizes(5, 7, 128, 128, "tpu") == (8, 8)
    with pytest.raises(ValueError, match="block_kv"):
        block_sizes(64, 64, 128, 48, "cuda")


def test_bad_inputs():
    q = jnp.zeros((1, 8, 4, 16))
    k = jnp.zeros((1, 8, 3, 16))
    with pytest.raises(ValueError, match="Hq=4"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="sinks"):
        flash_attention(q, q, q, sinks=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, q, q, backend="metal")


# ------------------------------------------------------------------------------------------
# Dispatch from jattn.attention(implementation="pallas").
# ------------------------------------------------------------------------------------------
def test_dispatch_via_jattn():
    # Per-head masks (block map [Hq, nq, nk]) + sinks through jattn.attention(implementation=...).
    b, t, hq, hkv, d = 1, 40, 2, 1, 16
    q, k, v, do, _, sinks = _inputs(11, b, t, t, hq, hkv, d, jnp.float32)
    mask = masks.per_head([masks.sliding_window(10) | masks.prefix_lm(4), masks.local(3, 3)])

    def run(impl):
        f = lambda q, k, v, s: attention(q, k, v, mask=mask, sinks=s, implementation=impl)  # noqa: E731

        @jax.jit
        def go(q, k, v, s, do):
            o, pull = jax.vjp(f, q, k, v, s)
            return (o,) + pull(do)

        return go(q, k, v, sinks, do)

    got, want = run("pallas"), run("reference")
    for name, a, e in zip(("o", "dq", "dk", "dv", "dsinks"), got, want, strict=True):
        assert_close(a, e, name=name)


def test_dispatch_unsupported():
    from jattn._pallas_dispatch import attention_pallas, pallas_supported

    q = jnp.zeros((1, 8, 2, 16))
    common = dict(mask=None, dense_mask=None, bias=None, scale=0.25, normalizer="softmax",
                  sinks=None, logits_soft_cap=None, segment_ids=None, return_lse=False)
    for override, word in [({"bias": jnp.zeros((1, 2, 8, 8))}, "bias"),
                           ({"normalizer": "sigmoid"}, "normalizer"),
                           ({"dense_mask": jnp.ones((2, 1, 8, 8), bool)}, "dense"),
                           ({"mask": masks.from_array(np.tri(8, dtype=bool))}, "from_array")]:
        kw = {**common, **override}
        assert not pallas_supported(**kw)
        with pytest.raises(NotImplementedError, match=word):
            attention_pallas(q, q, q, **kw)
    assert pallas_supported(**{**common, "mask": masks.causal() & masks.local(4, 0)})
    with pytest.raises(NotImplementedError, match="bias"):
        attention(q, q, q, bias=jnp.zeros((8, 8)), implementation="pallas")


# ------------------------------------------------------------------------------------------
# Against JAX's shipped Pallas kernels (interpret mode).
# ------------------------------------------------------------------------------------------
def test_vs_jax_gpu_mha():
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, h, d = 1, 32, 2, 16
    q, k, v, do, _, _ = _inputs(21, b, t, t, h, h, d, jnp.float32)
    sizes = gpu_attention.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_kv_dkv=16,
                                     block_q_dq=16, block_kv_dq=16)
    seg = (jnp.arange(t)[None] >= 12).astype(jnp.int32)
    theirs_fn = functools.partial(gpu_attention.mha, segment_ids=seg, sm_scale=d ** -0.5,
                                  causal=True, block_sizes=sizes, interpret=True)
    causal = masks.causal()
    ours_fn = functools.partial(
        flash_attention, block_map=causal.block_map(t, t, 16, 16),
        mask_fn=causal.index_fn(t, t), segment_ids=seg, block_q=16, block_kv=16, backend="cuda")
    for name, fn in (("ours", ours_fn), ("mha", theirs_fn)):
        out = jax.jit(lambda q, k, v, fn=fn: jax.vjp(fn, q, k, v))(q, k, v)
        if name == "ours":
            o, pull = out
            grads = pull(do)
        else:
            o2, pull2 = out
            grads2 = pull2(do)
    assert_close(o, o2, name="o")
    for name, a, e in zip(("dq", "dk", "dv"), grads, grads2, strict=True):
        assert_close(a, e, name=name)


def test_vs_splash_attention():
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    h, t, d = 2, 128, 32
    q, k, v, _, _, _ = _inputs(31, 1, t, t, h, h, d, jnp.float32)
    mask = sa.MultiHeadMask([sa.LocalMask((t, t), (40, 0), offset=0), sa.CausalMask((t, t))])
    kernel = sa.make_splash_mha(mask, block_sizes=sa.BlockSizes.get_default(), head_shards=1,
                                q_seq_shards=1, attn_logits_soft_cap=20.0, interpret=True)
    theirs = jax.jit(kernel)(q[0].transpose(1, 0, 2), k[0].transpose(1, 0, 2),
                             v[0].transpose(1, 0, 2)).transpose(1, 0, 2)[None]
    ours_mask = masks.per_head([masks.local(40, 0), masks.causal()])
    ours = flash_attention(q, k, v, block_map=ours_mask.block_map(t, t, 128, 128),
                           mask_fn=ours_mask.index_fn(t, t), scale=1.0, logits_soft_cap=20.0,
                           block_q=128, block_kv=128, backend="tpu")
    assert_close(ours, theirs, name="o vs splash")
