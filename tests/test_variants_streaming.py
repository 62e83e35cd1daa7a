"""jattn.variants: clipped softmax (two blocked passes) and Cog's signed softmax (streaming)
against independent dense NumPy float64 formulas: forward, gradients (a directional derivative
by central differences in float64) and xla vs reference gradients, under masks with GQA."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import variants
from jattn.testing import assert_close
from models import AttentionConfig, build_core
from models.cores.base import CoreInputs
from tests.variants_oracle import (
    MASK_PARAMS,
    MASKS,
    T,
    check_against_formula,
    np_out,
    np_scores,
    np_softmax,
    qkv,
)


def np_clipped(q, k, v, vis, gamma, zeta):
    p = np.clip((zeta - gamma) * np_softmax(np_scores(q, k), vis) + gamma, 0, 1)
    return np_out(np.where(vis, p, 0.0), v)


def np_signed(q, k, v, vis):
    s = np_scores(q, k)
    return np_out(np.sign(s) * np_softmax(np.abs(s), vis), v)


@pytest.mark.parametrize("mask_name", MASK_PARAMS)
def test_clipped_softmax_matches_formula_in_both_implementations(mask_name):
    mask = MASKS[mask_name]

    def formula(q, k, v, vis):
        return np_clipped(q, k, v, vis, -0.1, 1.05)

    def fn(q, k, v, **kw):
        return variants.clipped_softmax_attention(q, k, v, gamma=-0.1, zeta=1.05, **kw)

    g_ref = check_against_formula(fn, formula, mask, "reference")
    g_xla = check_against_formula(fn, formula, mask, "xla")
    for a, e, n in zip(g_xla, g_ref, "qkv", strict=True):
        assert_close(a, e, rtol=1e-4, name=f"d{n} xla vs reference")


@pytest.mark.parametrize("mask_name", MASK_PARAMS)
def test_signed_softmax_matches_formula_in_both_implementations(mask_name):
    mask = MASKS[mask_name]
    g_ref = check_against_formula(variants.signed_attention, np_signed, mask, "reference")
    g_xla = check_against_formula(variants.signed_attention, np_signed, mask, "xla")
    for a, e, n in zip(g_xla, g_ref, "qkv", strict=True):
        assert_close(a, e, rtol=1e-4, name=f"d{n} xla vs reference")


def test_rows_without_keys_are_zero_with_finite_gradients():
    q, k, v = qkv()
    mask = np.zeros((1, 1, T, T), bool)
    mask[..., 3:, :2] = True  # rows 0..2 see nothing
    for fn in (variants.clipped_softmax_attention, variants.signed_attention):
        for impl in ("reference", "xla"):
            def total(q, fn=fn, impl=impl):
                out = fn(q, k, v, mask=mask, implementation=impl)
                return jnp.sum(out), out

            g, out = jax.jit(jax.grad(total, has_aux=True))(q)
            assert np.all(np.asarray(out)[:, :3] == 0)
            assert np.all(np.isfinite(np.asarray(g)))


def test_variants_refuse_pallas_by_name():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="clipped_softmax_attention"):
        variants.clipped_softmax_attention(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match="gamma"):
        variants.clipped_softmax_attention(q, k, v, gamma=0.5)


# --- the model cores use the streaming forms: no [T, T] array in the xla program --------------
LONG = 1030  # > the 512 default tile, so a [T, T] (or padded [1536, 1536]) array is the tell


def _lowered_text(mechanism: str) -> str:
    cfg = AttentionConfig(d_model=16, num_heads=2, head_dim=8, mechanism=mechanism,
                          implementation="xla")
    core = build_core(cfg, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, LONG, 16), jnp.float32)
    h = jax.ShapeDtypeStruct((1, LONG, 2, 8), jnp.float32)

    def forward(x, q, k, v):
        return core(CoreInputs(x, q, k, v, jnp.arange(LONG)))

    return jax.jit(forward).lower(x, h, h, h).as_text()


@pytest.mark.parametrize("mechanism", ["clipped_softmax", "cog"])
def test_core_xla_path_never_materializes_the_score_matrix(mechanism):
    # Before the streaming forms both cores built [B, H, T, T] weights for any implementation.
    text = _lowered_text(mechanism)
    square = re.findall(r"(?<![0-9])(?:1030|1536)x(?:1030|1536)x", text)
    assert not square, f"{mechanism}: a [T, T] array in the xla program ({square[:3]})"
    assert "while" in text  # the tile loops
