"""A-shape, vertical-slash and cross-shaped masks: dense views against independent numpy
formulas, block maps exact against the dense view."""

import jax
import numpy as np
import pytest

from jattn import masks as M
from tests.test_masks import block_truth


def _aligned(tq, tk):
    i = np.arange(tq)[:, None] + (tk - tq)  # end-aligned query position
    j = np.arange(tk)[None, :]
    return i, j


def _check(mask, want, tq, tk, blocks):
    got = np.asarray(jax.jit(mask.dense, static_argnums=(0, 1))(tq, tk))
    np.testing.assert_array_equal(got, want)
    for bq, bk in blocks:
        got_map = np.asarray(jax.jit(mask.block_map, static_argnums=(0, 1, 2, 3))(tq, tk, bq, bk))
        np.testing.assert_array_equal(got_map, block_truth(want, bq, bk), err_msg=f"{bq}x{bk}")


@pytest.mark.parametrize("sink,window,tq,tk", [(2, 3, 17, 17), (4, 5, 20, 9)])
def test_a_shape_against_numpy(sink, window, tq, tk):
    i, j = _aligned(tq, tk)
    want = (j <= i) & ((j < sink) | (j > i - window))
    # Small blocks see the sink/band edges inside a block; 4x6 pads the last blocks.
    _check(M.a_shape(sink, window), want, tq, tk, [(2, 3), (4, 6)])


def test_a_shape_block_map_is_exact_where_composition_is_not():
    # The same predicate composed from & and | says "partial" for a block that is full only
    # through the union of the sink and the band; the dedicated mask claims it full. Rows 4-7
    # see keys 0-1 (sink) and 2-3 (band, j > i - 6).
    sink_keys = M.from_array(np.broadcast_to(np.arange(8)[None, :] < 2, (8, 8)))
    composed = M.causal() & (sink_keys | M.sliding_window(6))
    exact = M.a_shape(2, 6)
    np.testing.assert_array_equal(np.asarray(exact.dense(8, 8)), np.asarray(composed.dense(8, 8)))
    assert np.asarray(composed.block_map(8, 8, 4, 4))[1, 0] == M.PARTIAL
    assert np.asarray(exact.block_map(8, 8, 4, 4))[1, 0] == M.FULL


def test_vertical_slash_against_numpy():
    cols, offs = [0, 1, 2, 9, 15, 16], [0, 1, 5, 11, 12]
    for tq, tk in [(20, 20), (11, 23)]:
        i, j = _aligned(tq, tk)
        want = (j <= i) & (np.isin(j, cols) | np.isin(i - j, offs))
        _check(M.vertical_slash(cols, offs), want, tq, tk, [(1, 2), (4, 3)])
    # MInference's always-on parts (sinks, nearest diagonals) make full blocks: claimed exactly.
    mask = M.vertical_slash(range(4), range(7))
    i, j = _aligned(24, 24)
    want = (j <= i) & ((j < 4) | (i - j < 7))
    _check(mask, want, 24, 24, [(4, 4)])
    assert (np.asarray(mask.block_map(24, 24, 4, 4)) == M.FULL).sum() == 5  # the sink column
    # Duplicates and order do not matter (a static jit key built from runs).
    assert M.vertical_slash([2, 1, 0, 1], [3]) == M.vertical_slash(range(3), [3])


@pytest.mark.parametrize("grid,width,orientation", [((6, 5), 2, "horizontal"),
                                                    ((6, 5), 2, "vertical"),
                                                    ((4, 7), 3, "vertical")])
def test_cross_shaped_against_numpy(grid, width, orientation):
    n = grid[0] * grid[1]
    rows, cols = np.unravel_index(np.arange(n), grid)
    stripe = (rows if orientation == "horizontal" else cols) // width
    want = stripe[:, None] == stripe[None, :]
    _check(M.cross_shaped(grid, width, orientation), want, n, n, [(4, 6)])


def test_cross_shaped_per_head_halves():
    g, heads = (4, 4), 4
    mask = M.per_head([M.cross_shaped(g, 1, "horizontal")] * (heads // 2)
                      + [M.cross_shaped(g, 1, "vertical")] * (heads // 2))
    dense = np.asarray(mask.dense(16, 16))
    rows, cols = np.unravel_index(np.arange(16), g)
    np.testing.assert_array_equal(dense[0], rows[:, None] == rows[None, :])
    np.testing.assert_array_equal(dense[3], cols[:, None] == cols[None, :])
    # the union over the two halves is the CSWin cross through each token
    cross = dense[0] | dense[3]
    assert cross.sum(axis=1).tolist() == [7] * 16


def test_new_mask_arguments():
    with pytest.raises(ValueError, match="window must be a positive int"):
        M.a_shape(4, 0)
    with pytest.raises(ValueError, match="sink must be a non-negative int"):
        M.a_shape(-1, 4)
    with pytest.raises(ValueError, match="columns must be a non-negative int"):
        M.vertical_slash([-1], [0])
    with pytest.raises(TypeError, match="offsets must be a sequence"):
        M.vertical_slash([0], 3)
    with pytest.raises(ValueError, match="at least one column or offset"):
        M.vertical_slash([], [])
    with pytest.raises(ValueError, match="orientation must be"):
        M.cross_shaped((4, 4), 2, "diagonal")
    with pytest.raises(ValueError, match="stripe_width = 5 exceeds"):
        M.cross_shaped((4, 4), 5, "vertical")
    with pytest.raises(ValueError, match="needs q_len = kv_len = 16"):
        M.cross_shaped((4, 4), 2, "vertical").dense(15, 15)
