"""Masks: dense semantics against independent numpy formulas, block maps against dense views."""

import itertools

import jax
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jattn import masks as M


def grid(tq, tk):
    i = np.arange(tq)[:, None]
    j = np.arange(tk)[None, :]
    return i + (tk - tq), j  # end-aligned query position


@pytest.mark.parametrize("tq,tk", [(7, 7), (5, 9), (9, 5)])
def test_dense_semantics(tq, tk):
    i, j = grid(tq, tk)
    expected = {
        M.causal(): j <= i,
        M.local(2, 1): (j >= i - 2) & (j <= i + 1),
        M.sliding_window(3): (j <= i) & (j > i - 3),
        M.chunked(3): (i // 3) == (j // 3),
        M.prefix_lm(2): (j < 2) | (j <= i),
        M.strided(3, 1): np.broadcast_to(j % 3 == 1, (tq, tk)),
        M.full(): np.ones((tq, tk), bool),
        M.causal() & M.strided(2): (j <= i) & (j % 2 == 0),
        M.chunked(4) | M.causal(): ((i // 4) == (j // 4)) | (j <= i),
        ~M.causal(): j > i,
    }
    for mask, want in expected.items():
        np.testing.assert_array_equal(np.asarray(mask.dense(tq, tk)), want, err_msg=str(mask))


def test_from_array_and_per_head():
    rng = np.random.default_rng(0)
    arr = rng.random((3, 6, 8)) < 0.5
    np.testing.assert_array_equal(np.asarray(M.from_array(arr).dense(6, 8)), arr)
    ph = M.per_head([M.causal(), M.full(), M.strided(2, 1)])
    d = np.asarray(ph.dense(6, 8))
    assert d.shape == (3, 6, 8)
    for h, m in enumerate([M.causal(), M.full(), M.strided(2, 1)]):
        np.testing.assert_array_equal(d[h], np.asarray(m.dense(6, 8)))
    both = ph & M.from_array(arr)
    np.testing.assert_array_equal(np.asarray(both.dense(6, 8)), d & arr)


def block_truth(dense, bq, bk):
    tq, tk = dense.shape[-2:]
    nq, nk = -(-tq // bq), -(-tk // bk)
    pad = np.zeros(dense.shape[:-2] + (nq * bq, nk * bk), bool)
    pad[..., :tq, :tk] = dense
    r = pad.reshape(dense.shape[:-2] + (nq, bq, nk, bk))
    anyv, allv = r.any(axis=(-3, -1)), r.all(axis=(-3, -1))
    return np.where(~anyv, 0, np.where(allv, 2, 1))


# Masks whose block claims are exact (closed forms, their negations, evaluated per-head masks).
EXACT_MASKS = [
    M.causal(), M.sliding_window(5), M.local(3, 2), M.chunked(4), M.prefix_lm(6),
    M.strided(3, 2), M.full(), ~M.sliding_window(4), M.per_head([M.causal(), M.strided(4, 1)]),
]
# & and | combine the sides' claims, which is sound but may say "partial" for a block that
# only the combination makes full (|) or empty (&).
COMPOSED_MASKS = [M.causal() & M.strided(2), M.chunked(5) | M.local(1, 1)]
MASKS = EXACT_MASKS + COMPOSED_MASKS


@settings(max_examples=15, deadline=None)
@given(mask=st.sampled_from(MASKS), tq=st.integers(1, 40), tk=st.integers(1, 40),
       bq=st.integers(1, 16), bk=st.integers(1, 16))
# Found by hypothesis: keys 4..7 of query 0 (at position 5) are full only as the union.
@example(mask=M.chunked(5) | M.local(1, 1), tq=3, tk=8, bq=1, bk=4)
# Found by hypothesis: traced, XLA:CPU mis-folded this block map (a visible block claimed empty).
@example(mask=M.causal(), tq=9, tk=3, bq=2, bk=2)
def test_block_map_matches_dense(mask, tq, tk, bq, bk):
    # Jitted: one compile per shape rather than one per eager op.
    got = np.asarray(jax.jit(mask.block_map, static_argnums=(0, 1, 2, 3))(tq, tk, bq, bk))
    want = block_truth(np.asarray(jax.jit(mask.dense, static_argnums=(0, 1))(tq, tk)), bq, bk)
    # Empty and full claims are always true; only composed masks may be conservative.
    assert np.all((got == 0) <= (want == 0)) and np.all((got == 2) <= (want == 2))
    assert np.all((got == want) | (got == 1))
    if mask in EXACT_MASKS:
        np.testing.assert_array_equal(got, want)


@settings(max_examples=10, deadline=None)
@given(tq=st.integers(1, 30), tk=st.integers(1, 30), bq=st.integers(1, 8),
       bk=st.integers(1, 8), seed=st.integers(0, 100))
def test_segment_block_map_claims_are_exact(tq, tk, bq, bk, seed):
    rng = np.random.default_rng(seed)
    seg_q = np.sort(rng.integers(0, 4, (2, tq)), axis=1)
    seg_k = np.sort(rng.integers(0, 4, (2, tk)), axis=1)
    got = np.asarray(jax.jit(M.segment_block_map, static_argnums=(2, 3))(seg_q, seg_k, bq, bk))
    dense = seg_q[:, :, None] == seg_k[:, None, :]
    want = block_truth(dense, bq, bk)
    # Empty and full are exact claims; partial may be conservative.
    assert np.all((got == want) | (got == 1))
    assert np.all((got == 0) <= (want == 0)) and np.all((got == 2) <= (want == 2))


def test_block_map_is_jittable_and_masks_are_static_keys():
    f = jax.jit(lambda: M.sliding_window(64).block_map(1000, 1000, 128, 128))
    np.testing.assert_array_equal(
        np.asarray(f()), block_truth(np.asarray(M.sliding_window(64).dense(1000, 1000)), 128, 128))
    assert M.causal() == M.causal() and hash(M.causal()) == hash(M.causal())
    assert M.sliding_window(4) != M.sliding_window(5)
    traces = []

    @jax.jit
    def g(x, mask):
        traces.append(1)
        return x + mask.dense(4, 4).sum()

    g = jax.jit(g.__wrapped__, static_argnums=1)
    g(1.0, M.causal())
    g(2.0, M.causal())
    assert len(traces) == 1


# --- neighborhood attention, checked against an explicit per-axis window construction ----------
def natten_window_1d(n, kernel, dilation, stride, causal):
    """For each query coordinate, the set of visible key coordinates (explicit enumeration)."""
    out = []
    for x in range(n):
        group = [p for p in range(n) if p % dilation == x % dilation]  # positions of its group
        qi = group.index(x)
        if stride > 1:  # leader: centre of the stride tile, clipped to the group
            tile = qi // stride * stride
            lead = min(tile + (stride - 1) // 2, len(group) - 1)
        else:
            lead = qi
        if causal:
            idx = [p for p in range(len(group)) if lead - kernel + 1 <= p <= min(lead, qi)]
        else:
            start = lead - kernel // 2
            start = max(0, min(start, len(group) - kernel))  # shift inside the border
            idx = list(range(start, start + kernel))
        out.append({group[p] for p in idx})
    return out


def natten_dense(shape, kernel, dilation, stride, causal):
    windows = [natten_window_1d(n, k, d, s, c)
               for n, k, d, s, c in zip(shape, kernel, dilation, stride, causal, strict=True)]
    coords = list(itertools.product(*[range(n) for n in shape]))
    dense = np.zeros((len(coords), len(coords)), bool)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            dense[a, b] = all(kc[ax] in windows[ax][qc[ax]] for ax in range(len(shape)))
    return dense


@pytest.mark.parametrize("shape,kernel,dilation,stride,causal", [
    ((11,), (3,), (1,), (1,), (False,)),
    ((12,), (3,), (2,), (1,), (False,)),
    ((10,), (4,), (1,), (1,), (True,)),
    ((5, 6), (3, 3), (1, 2), (1, 1), (False, False)),
    ((6, 5), (3, 2), (1, 1), (2, 2), (False, False)),
    ((4, 6), (2, 3), (1, 2), (1, 1), (True, False)),
    ((3, 4, 5), (3, 2, 3), (1, 2, 1), (1, 1, 3), (False, True, False)),
])
def test_neighborhood_against_explicit_windows(shape, kernel, dilation, stride, causal):
    mask = M.neighborhood(shape, kernel, dilation=dilation, stride=stride, causal=causal)
    n = int(np.prod(shape))
    got = np.asarray(mask.dense(n, n))
    np.testing.assert_array_equal(got, natten_dense(shape, kernel, dilation, stride, causal))
    if not any(causal):  # clamped windows: every query sees exactly prod(kernel) keys
        assert np.all(got.sum(1) == np.prod(kernel))
    bm = np.asarray(mask.block_map(n, n, 8, 8))
    np.testing.assert_array_equal(bm, block_truth(got, 8, 8))


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match=r"kernel_size \* dilation on axis 1"):
        M.neighborhood((8, 4), (3, 5))
    with pytest.raises(ValueError, match="kernel_size must be an int or a tuple of 2"):
        M.neighborhood((8, 8), (3, 3, 3))
    with pytest.raises(ValueError, match="q_len = kv_len = 64"):
        M.neighborhood((8, 8), 3).dense(60, 60)
    with pytest.raises(ValueError, match="size must be a positive int"):
        M.sliding_window(0)
    with pytest.raises(ValueError, match="offset must be in"):
        M.strided(3, 3)
    with pytest.raises(TypeError, match="bool array"):
        M.from_array(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\[Tq, Tk\] or \[H, Tq, Tk\]"):
        M.from_array(np.zeros(3, bool))
    with pytest.raises(ValueError, match="disagree on the number of heads"):
        M.per_head([M.causal()] * 2) & M.per_head([M.causal()] * 3)
    with pytest.raises(TypeError, match="jattn.masks.Mask"):
        M.causal() & np.ones((2, 2), bool)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        M.causal().block_map(8, 8, 0, 4)


# --- grid windows and prefix tokens, checked against dense numpy formulas ---------------------
def _jit_block_map(mask, n, bq, bk):
    # Jitted: one compile rather than one per eager op.
    return jax.jit(mask.block_map, static_argnums=(0, 1, 2, 3))(n, n, bq, bk)


def grid_windows_dense(shape, size):
    """``coord(i) // size == coord(j) // size`` on every axis (row-major coordinates)."""
    win = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), -1) // np.array(size)
    return np.all(win[:, None, :] == win[None, :, :], axis=-1)


@pytest.mark.parametrize("shape,size", [((10,), (3,)), ((5, 7), (2, 3)), ((3, 4, 5), (2, 2, 3))])
def test_grid_windows_against_numpy(shape, size):
    mask = M.grid_windows(shape, size)
    n = int(np.prod(shape))
    want = grid_windows_dense(shape, size)
    got = np.asarray(mask.dense(n, n))
    np.testing.assert_array_equal(got, want)
    # exact claims (ragged blocks: windows straddle block edges, the last block is padded)
    got_map = np.asarray(_jit_block_map(mask, n, 4, 6))
    np.testing.assert_array_equal(got_map, block_truth(want, 4, 6))


@pytest.mark.parametrize("inner,shape,n_prefix", [(M.grid_windows((4, 6), 2), (4, 6), 1),
                                                  (M.neighborhood((5, 5), 3), (5, 5), 3)])
def test_with_prefix_tokens_against_numpy(inner, shape, n_prefix):
    mask = M.with_prefix_tokens(inner, n_prefix)
    g = int(np.prod(shape))
    n = g + n_prefix
    want = np.ones((n, n), bool)  # prefix rows and columns see / are seen by every token
    want[n_prefix:, n_prefix:] = np.asarray(inner.dense(g, g))
    got = np.asarray(mask.dense(n, n))
    np.testing.assert_array_equal(got, want)
    got_map = np.asarray(_jit_block_map(mask, n, 4, 8))
    np.testing.assert_array_equal(got_map, block_truth(want, 4, 8))
    assert M.with_prefix_tokens(inner, 0) is inner
    assert mask == M.with_prefix_tokens(inner, n_prefix)  # structural: a static jit key


def test_grid_mask_arguments():
    with pytest.raises(ValueError, match="window_size must be an int or a tuple of 2"):
        M.grid_windows((4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        M.grid_windows((4, 4), 0)
    with pytest.raises(ValueError, match="num_tokens must be a non-negative int"):
        M.with_prefix_tokens(M.grid_windows(4, 2), -1)
    with pytest.raises(TypeError, match="jattn.masks.Mask"):
        M.with_prefix_tokens(np.ones((4, 4), bool), 1)
