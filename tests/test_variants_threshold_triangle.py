"""jattn.variants.top_theta_attention / calibrate_top_theta and dual_triangle_attention against
independent dense NumPy float64 formulas (forward and gradients), masks and GQA included."""

from __future__ import annotations

import numpy as np
import pytest

from jattn import masks as M
from jattn import variants
from jattn.testing import assert_close
from tests.variants_oracle import (
    HQ,
    MASK_PARAMS,
    MASKS,
    D,
    T,
    check_against_formula,
    np_out,
    np_scores,
    np_softmax,
    qkv,
)

THETA = np.array([-0.5, 0.0, 0.3, -np.inf], np.float32)  # the last head keeps everything


def np_top_theta(q, k, v, vis, theta=THETA):
    s = np_scores(q, k)
    diag = np.eye(T, dtype=bool)
    keep = vis & ((s >= np.asarray(theta, np.float64)[None, :, None, None]) | diag)
    return np_out(np_softmax(s, keep), v)


@pytest.mark.parametrize("mask_name", MASK_PARAMS)
def test_top_theta_matches_formula_in_both_implementations(mask_name):
    mask = MASKS[mask_name]

    def fn(q, k, v, **kw):
        return variants.top_theta_attention(q, k, v, THETA, **kw)

    g_ref = check_against_formula(fn, np_top_theta, mask, "reference")
    g_xla = check_against_formula(fn, np_top_theta, mask, "xla")
    for a, e, n in zip(g_xla, g_ref, "qkv", strict=True):
        assert_close(a, e, rtol=1e-4, name=f"d{n} xla vs reference")


def test_top_theta_threshold_actually_drops_keys_and_minus_inf_is_softmax():
    q, k, v = qkv()
    causal = M.causal()
    out = variants.top_theta_attention(q, k, v, THETA, mask=causal)
    plain = np_out(np_softmax(np_scores(q, k), np.tril(np.ones((T, T), bool))), v)
    assert_close(np.asarray(out)[:, :, 3], plain[:, :, 3], rtol=1e-5)  # theta = -inf: softmax
    assert np.abs(np.asarray(out)[:, :, 2] - plain[:, :, 2]).max() > 1e-2  # theta = 0.3 drops


def test_calibration_keeps_about_k_keys_per_row():
    q, k, _ = qkv(seed=3)
    keep = 6
    theta = np.asarray(variants.calibrate_top_theta(q, k, keep=keep))  # no mask: T keys a row
    s = np_scores(q, k)
    kth = np.sort(s, axis=-1)[..., -keep]  # independent: the k-th largest per row
    np.testing.assert_allclose(theta, kth.mean(axis=(0, 2)), rtol=1e-5)
    kept = (s >= theta[None, :, None, None]).sum(-1).mean(axis=(0, 2))
    assert np.all(np.abs(kept - keep) < 2.5), kept
    with pytest.raises(ValueError, match="keep"):
        variants.calibrate_top_theta(q, k, keep=0)
    with pytest.raises(ValueError, match="theta"):
        variants.top_theta_attention(q, k, k, np.zeros(HQ + 1, np.float32))


def np_scores_half(q, k):
    """Scores of one half with its own scale ``1 / sqrt(Dk / 2)``."""
    return np_scores(q, k) * np.sqrt(D) / np.sqrt(q.shape[-1])


def np_dual_triangle(q, k, v, vis):
    hk, hv = q.shape[-1] // 2, v.shape[-1] // 2
    past = np.tril(np.ones((T, T), bool))
    o_past = np_out(np_softmax(np_scores_half(q[..., :hk], k[..., :hk]), vis & past),
                    v[..., :hv])
    o_future = np_out(np_softmax(np_scores_half(q[..., hk:], k[..., hk:]), vis & past.T),
                      v[..., hv:])
    return np.concatenate([o_past, o_future], axis=-1)


def dual_triangle(q, k, v, *, block_q=None, block_kv=None, **kw):
    return variants.dual_triangle_attention(q, k, v, **kw)  # tiles: jattn.attention's own


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("mask_name", ["none", "window5", "dense"])
def test_dual_triangle_matches_formula(impl, mask_name):
    mask = None if mask_name == "none" else MASKS[mask_name]
    if mask_name == "window5":  # a two-sided window: both triangles keep keys
        mask = M.local(4, 4)
    check_against_formula(dual_triangle, np_dual_triangle,
                          mask if mask is not None else M.full(), impl)


def test_dual_triangle_needs_even_head_dims():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="D even"):
        variants.dual_triangle_attention(q[..., :7], k[..., :7], v)


def test_dual_triangle_tells_left_from_right_without_positions():
    # Reversing the sequence swaps the halves' roles: the output is not the reversed output.
    q, k, v = qkv()
    out = np.asarray(variants.dual_triangle_attention(q, k, v, implementation="reference"))
    rev = np.asarray(variants.dual_triangle_attention(q[:, ::-1], k[:, ::-1], v[:, ::-1],
                                                      implementation="reference"))
    assert np.abs(out - rev[:, ::-1]).max() > 1e-2
