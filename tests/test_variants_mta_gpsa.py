"""jattn.variants.multi_token_attention (Golovneva et al. 2025) and gpsa_attention (ConViT)
against independent dense NumPy float64 formulas written from the papers' index notation:
forward and gradients (to q, k, v and the kernels / positional weights / gates), masks, GQA,
and halo tiles smaller than the convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks as M
from jattn import variants
from jattn.testing import assert_close
from tests.variants_oracle import (
    HQ,
    MASK_PARAMS,
    MASKS,
    T,
    check_against_formula,
    np_out,
    np_scores,
    np_softmax,
    qkv,
)

CQ, CK, CH = 3, 4, 2  # an even c_k: the key window is asymmetric (2 ahead, 1 behind)


def np_mta(q, k, v, theta, w, vis):
    """Golovneva et al. eq. (2)-(3), pre-softmax, looped over the paper's (i', j') offsets."""
    a0 = np.where(vis, np_scores(q, k), 0.0)  # Mask_0
    b, h, tq, tk = a0.shape
    theta = np.asarray(theta, np.float64)
    conv = np.zeros_like(a0)
    for i_off in range(CQ):  # i' in [0, c_q): queries i - i'
        for j_off in range(-(CK // 2), (CK + 1) // 2):  # j' in [-floor(c_k/2), ceil(c_k/2))
            for i in range(tq):
                for j in range(tk):
                    qi, kj = i - i_off, j - j_off
                    if 0 <= qi < tq and 0 <= kj < tk:
                        conv[:, :, i, j] += theta[:, i_off, j_off + CK // 2] * a0[:, :, qi, kj]
    w = np.asarray(w, np.float64)
    mixed = np.zeros_like(conv)
    for n in range(h // CH):
        for o in range(CH):
            for i in range(CH):
                mixed[:, n * CH + o] += w[n, o, i] * conv[:, n * CH + i]
    return np_out(np_softmax(mixed, vis), v)


def mta_args(seed=0):
    q, k, v = qkv(seed)
    theta = 0.5 * jax.random.normal(jax.random.key(seed + 11), (HQ, CQ, CK))
    w = jnp.eye(CH) + 0.3 * jax.random.normal(jax.random.key(seed + 12), (HQ // CH, CH, CH))
    return q, k, v, theta, w


@pytest.mark.parametrize("mask_name", MASK_PARAMS)
def test_mta_matches_the_paper_formula(mask_name):
    mask = MASKS[mask_name]
    args = mta_args()
    g_ref = check_against_formula(variants.multi_token_attention, np_mta, mask, "reference",
                                  args=args)
    # tiles smaller than the kernel: the halo spans more than one neighbouring tile
    g_xla = check_against_formula(variants.multi_token_attention, np_mta, mask, "xla",
                                  args=args, blocks={"block_q": 2, "block_kv": 3})
    for a, e, n in zip(g_xla, g_ref, ("q", "k", "v", "theta", "w"), strict=True):
        assert_close(a, e, rtol=1e-4, name=f"d{n} xla vs reference")


def test_mta_identity_kernels_are_softmax_attention_and_no_future_leaks():
    q, k, v = qkv()
    kq, hk = variants.mta_identity_kernels(HQ, CQ, CK, CH)
    causal = M.causal()
    for impl in ("reference", "xla"):
        out = variants.multi_token_attention(q, k, v, kq, hk, mask=causal, implementation=impl)
        assert_close(out, jattn.attention(q, k, v, mask=causal), rtol=1e-5)
    # causality: perturbing the last token leaves every earlier output unchanged
    _, _, _, theta, w = mta_args()
    out = variants.multi_token_attention(q, k, v, theta, w, mask=causal, block_q=4, block_kv=4)
    k2, v2 = k.at[:, -1].add(3.0), v.at[:, -1].add(3.0)
    out2 = variants.multi_token_attention(q, k2, v2, theta, w, mask=causal, block_q=4,
                                          block_kv=4)
    np.testing.assert_allclose(np.asarray(out)[:, :-1], np.asarray(out2)[:, :-1], atol=1e-6)


def test_mta_rejects_bad_kernels():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="kq_kernel"):
        variants.multi_token_attention(q, k, v, np.zeros((HQ + 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="head_kernel"):
        variants.multi_token_attention(q, k, v, np.zeros((HQ, 2, 2), np.float32),
                                       np.zeros((1, 3, 3), np.float32))


# --- GPSA -----------------------------------------------------------------------------------
GRID, PREFIX = (4, 5), 1  # T = 1 + 20 = 21


def np_gpsa(q, k, v, pos_weights, gate_logits, vis):
    """ConViT's GPSA: gated mix of the content and positional softmaxes, renormalized."""
    coords = [(None, None)] * PREFIX + [(t // GRID[1], t % GRID[1])
                                        for t in range(GRID[0] * GRID[1])]
    r = np.zeros((T, T, 3))
    on_grid = np.zeros((T, T), bool)
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            if yi is not None and yj is not None:
                dx, dy = xj - xi, yj - yi
                r[i, j] = (dx, dy, dx * dx + dy * dy)
                on_grid[i, j] = True
    pos = np.einsum("qkc,hc->hqk", r, np.asarray(pos_weights, np.float64))[None]
    p_c = np_softmax(np_scores(q, k), vis)
    p_p = np_softmax(np.broadcast_to(pos, p_c.shape), vis & on_grid)
    g = 1.0 / (1.0 + np.exp(-np.asarray(gate_logits, np.float64)))[None, :, None, None]
    a = (1 - g) * p_c + g * p_p
    z = a.sum(-1, keepdims=True)
    return np_out(a / np.where(z > 0, z, 1.0), v)


def gpsa(q, k, v, pw, gl, **kw):
    return variants.gpsa_attention(q, k, v, pw, gl, grid=GRID, num_prefix_tokens=PREFIX, **kw)


@pytest.mark.parametrize("mask_name", ["none", "dense"])
def test_gpsa_matches_the_paper_formula(mask_name):
    mask = M.full() if mask_name == "none" else MASKS[mask_name]
    q, k, v = qkv()
    pw = jnp.asarray(variants.gpsa_locality_init(HQ)) + 0.1 * jax.random.normal(
        jax.random.key(5), (HQ, 3))
    gl = jnp.asarray([1.0, -0.5, 0.0, 2.0])
    args = (q, k, v, pw, gl)
    g_ref = check_against_formula(gpsa, np_gpsa, mask, "reference", args=args)
    g_xla = check_against_formula(gpsa, np_gpsa, mask, "xla", args=args)
    for a, e, n in zip(g_xla, g_ref, ("q", "k", "v", "pos", "gate"), strict=True):
        assert_close(a, e, rtol=1e-4, name=f"d{n} xla vs reference")


def test_gpsa_locality_init_centres_heads_on_offsets():
    w = variants.gpsa_locality_init(9)
    # v . r = -||delta - Delta||^2 + const: each head's positional argmax is its centre
    offsets = np.array([(dx, dy, dx * dx + dy * dy) for dy in range(-2, 3) for dx in range(-2, 3)])
    best = offsets[np.argmax(offsets @ w.T, axis=0)][:, :2]
    assert {tuple(b) for b in best} == {(x, y) for x in (-1, 0, 1) for y in (-1, 0, 1)}
    q, k, v = qkv()
    with pytest.raises(ValueError, match="num_prefix_tokens \\+ gh \\* gw"):
        variants.gpsa_attention(q, k, v, w[:HQ], np.ones(HQ), grid=(3, 3))
