"""Run-time block sparsity: ``jattn.attention(..., block_mask=bm)`` on every implementation.

The oracle is the reference with the dense expansion of ``bm`` as a mask. Each test names the bug
it catches: a path that reduces the map over (batch, head) without masking inside the tile, a
skipped block whose NaN leaks through ``0 * NaN``, or a traced map that recompiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _blocked

B, T, HQ, HKV, D = 2, 64, 4, 2, 8
BLOCK = 16  # the xla path's tile in these tests (its default is 512, one block at T = 64)
N = T // BLOCK


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocked-path tiles of 16 so T = 64 has 4 x 4 blocks (the logic is size-independent)."""
    monkeypatch.setattr(_blocked, "default_block_sizes", lambda tq, tk: (BLOCK, BLOCK))


def _inputs(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, t, HQ, D))
    k = jax.random.normal(ks[1], (B, t, HKV, D))
    v = jax.random.normal(ks[2], (B, t, HKV, D))
    return q, k, v, ks[3]


def _run(impl, q, k, v, bm, mask):
    def loss(q, k, v):
        out = jattn.attention(q, k, v, mask=mask, block_mask=bm, implementation=impl)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_xla_matches_reference_per_batch_and_head(small_tiles):
    # Random per-(batch, head) maps: the xla path visits the union over (batch, head), so a
    # tile visibility that ignored bm would let every head see the union's blocks.
    q, k, v, key = _inputs()
    mask = jattn.masks.causal()
    assert jattn.attention_block_sizes(T, T, "xla") == (BLOCK, BLOCK)
    bm = jax.random.bernoulli(key, 0.5, (B, HQ, N, N))
    ref = _run("reference", q, k, v, bm, mask)
    _assert_close(_run("xla", q, k, v, bm, mask), ref)
    # the map really restricts: it differs from the unrestricted call
    free = jattn.attention(q, k, v, mask=mask, implementation="reference")
    assert not np.allclose(ref[0], free, atol=1e-3)


def test_reference_is_the_dense_expansion(small_tiles):
    q, k, v, key = _inputs(1)
    bm = jax.random.bernoulli(key, 0.5, (B, HQ, N, N))
    dense = np.asarray(bm)[:, :, np.arange(T) // BLOCK][:, :, :, np.arange(T) // BLOCK]
    want = jattn.attention(q, k, v, mask=jnp.asarray(dense), implementation="reference")
    got = jattn.attention(q, k, v, block_mask=bm.astype(jnp.int32), implementation="reference")
    _assert_close(got, want)


def _nan_case(seed):
    """NaN in K and V of key block 1, batch 0, kv head 0; bm empty there for both query heads
    of that kv head (0 and 1) and set everywhere else."""
    q, k, v, _ = _inputs(seed)
    rows = slice(BLOCK, 2 * BLOCK)
    k_nan = k.at[0, rows, 0].set(jnp.nan)
    v_nan = v.at[0, rows, 0].set(jnp.nan)
    bm = np.ones((B, HQ, N, N), bool)
    bm[0, :2, :, 1] = False
    return q, k_nan, v_nan, jnp.asarray(bm), k.at[0, rows, 0].set(0.0), v.at[0, rows, 0].set(0.0)


@pytest.mark.parametrize("impl", ["xla"])  # the reference materializes every score: no skipping
def test_nan_in_a_skipped_block_does_not_reach_output_or_gradients(small_tiles, impl):
    # Other heads and batches still visit key block 1, so the xla path enters the tile: without
    # zeroing the skipped K/V, 0 * NaN in p @ v (and ds @ k) poisons kv head 0 of batch 0.
    q, k_nan, v_nan, bm, k0, v0 = _nan_case(2)
    out, (dq, dk, dv) = _run(impl, q, k_nan, v_nan, bm, jattn.masks.causal())
    want_out, (wdq, wdk, wdv) = _run("reference", q, k0, v0, bm, jattn.masks.causal())
    for x in (out, dq, dk, dv):
        assert np.isfinite(np.asarray(x)).all()
    _assert_close((out, dq, dk, dv), (want_out, wdq, wdk, wdv))


def test_traced_map_does_not_recompile(small_tiles):
    q, k, v, key = _inputs(3)
    f = jax.jit(lambda q, k, v, bm: jattn.attention(q, k, v, block_mask=bm, implementation="xla"))
    a = f(q, k, v, jax.random.bernoulli(key, 0.3, (B, HQ, N, N)))
    b = f(q, k, v, jax.random.bernoulli(key, 0.7, (B, HQ, N, N)))
    assert f._cache_size() == 1
    assert not np.allclose(a, b)


def test_broadcast_map_and_all_empty_rows(small_tiles):
    # [1, 1, nq, nk] broadcasts over batch and heads; a query block with no key block sees
    # nothing (output 0, finite gradients) like any fully masked row.
    q, k, v, _ = _inputs(4)
    bm = np.ones((1, 1, N, N), bool)
    bm[:, :, 2] = False
    out, grads = _run("xla", q, k, v, jnp.asarray(bm), None)
    _assert_close((out, grads), _run("reference", q, k, v, jnp.asarray(bm), None))
    assert np.all(np.asarray(out)[:, 2 * BLOCK: 3 * BLOCK] == 0)


@pytest.mark.parametrize("shape", [(B, HQ, N, N + 1), (B, 3, N, N), (B, HQ, N)])
def test_wrong_shape_is_a_value_error(small_tiles, shape):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="block_mask must have shape"):
        jattn.attention(q, k, v, block_mask=jnp.ones(shape, bool), implementation="xla")


def test_float_map_is_a_type_error(small_tiles):
    q, k, v, _ = _inputs()
    with pytest.raises(TypeError, match="block_mask"):
        jattn.attention(q, k, v, block_mask=jnp.ones((B, HQ, N, N)), implementation="xla")


def test_pallas_kernel_per_batch_and_head_map(fast_compiles):
    # The flash kernel (interpret mode on CPU) takes the per-(batch, head) map directly;
    # T = 256 with its 128-wide blocks is a 2 x 2 map. NaN in a skipped block stays out.
    t = 256
    bq, bk = jattn.attention_block_sizes(t, t, "pallas")
    assert (bq, bk) == (128, 128)
    q, k, v, key = _inputs(5, t)
    bm = np.asarray(jax.random.bernoulli(key, 0.6, (B, HQ, 2, 2))).copy()
    bm[1, :2, :, 0] = False  # batch 1, kv head 0: key block 0 skipped by both query heads
    bm = jnp.asarray(bm)
    k_nan = k.at[1, :128, 0].set(jnp.nan)
    v_nan = v.at[1, :128, 0].set(jnp.nan)
    got = _run("pallas", q, k_nan, v_nan, bm, jattn.masks.causal())
    idx = np.arange(t) // 128  # the reference, at its own block sizes, gets the dense expansion
    dense = np.asarray(bm)[:, :, idx][:, :, :, idx] & np.tri(t, dtype=bool)
    want = _run("reference", q, k.at[1, :128, 0].set(0.0), v.at[1, :128, 0].set(0.0), None,
                jnp.asarray(dense))
    _assert_close(got, want, tol=1e-4)
