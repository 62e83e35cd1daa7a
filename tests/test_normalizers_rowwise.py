"""Row-wise normalizers softpick (Zuhri et al. 2025) and stick-breaking (Tan et al. 2024) vs
independent dense formulas of the papers."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks as M
from jattn.testing import assert_close
from tests.testing import small_blocks

B, T, HQ, HKV, D = 2, 21, 4, 2, 8


def _qkv(seed=0, scale=1.0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (scale * jax.random.normal(kq, (B, T, HQ, D)), jax.random.normal(kk, (B, T, HKV, D)),
            jax.random.normal(kv, (B, T, HKV, D)))


def _assert_matches_formula(q, k, v, mask, impl, normalizer, naive, w_seed):
    """Output and gradients of `normalizer` under `mask` equal the dense formula `naive`."""
    i = jnp.arange(T)
    visible = mask.visible(i[:, None], i[None, :], 0, q_len=T, kv_len=T)
    w = jax.random.normal(jax.random.PRNGKey(w_seed), q.shape)

    def ours(q, k, v):
        return jnp.sum(w * jattn.attention(q, k, v, mask=mask, normalizer=normalizer,
                                           implementation=impl))

    def want(q, k, v):
        return jnp.sum(w * naive(q, k, v, visible))

    with small_blocks():
        got, g_got = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))(q, k, v)
    ref, g_ref = jax.value_and_grad(want, (0, 1, 2))(q, k, v)
    assert_close(got, ref, rtol=1e-5)
    for a, e, n in zip(g_got, g_ref, ("dq", "dk", "dv"), strict=True):
        assert_close(a, e, rtol=1e-4, name=n)


def _naive_softpick(q, k, v, visible, eps=1e-6):
    """Zuhri et al.'s formula as written: relu(e^s - 1) / (sum_visible |e^s - 1| + eps)."""
    k, v = jnp.repeat(k, HQ // HKV, axis=2), jnp.repeat(v, HQ // HKV, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    e = jnp.where(visible, jnp.expm1(jnp.where(visible, s, 0.0)), 0.0)
    p = jax.nn.relu(e) / (jnp.sum(jnp.abs(e), -1, keepdims=True) + eps)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("mask", [M.causal(), M.sliding_window(5)], ids=["causal", "window5"])
def test_softpick_matches_the_paper_formula(impl, mask):
    q, k, v = _qkv()
    _assert_matches_formula(q, k, v, mask, impl, "softpick", _naive_softpick, w_seed=1)


def test_softpick_is_stable_for_huge_logits_and_empty_rows():
    """Logits ~ 1e3 overflow e^s; the running-max form stays finite. Row 0 sees nothing."""
    q, k, v = _qkv(2, scale=300.0)
    dense = jnp.tril(jnp.ones((T, T), bool)).at[0].set(False)

    def run(impl, q):
        with small_blocks():
            return jattn.attention(q, k, v, mask=dense, normalizer="softpick",
                                   implementation=impl)

    got, want = run("xla", q), run("reference", q)
    assert np.all(np.isfinite(np.asarray(got)))
    assert_close(got, want)
    assert np.all(np.asarray(got[:, 0]) == 0)
    grads = jax.grad(lambda q: jnp.sum(run("xla", q) ** 2))(q)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_softpick_weights_can_sum_below_one_and_ignore_negative_scores():
    q, k, _ = _qkv(3)
    p = jattn.attention_weights(q, k, mask=M.causal(), normalizer="softpick")
    sums = np.asarray(p.sum(-1))
    assert np.all(sums <= 1 + 1e-5) and np.any(sums < 0.9)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(D)
    assert np.all(np.asarray(p)[np.asarray(s) <= 0] == 0)


def _naive_stick_breaking(q, k, v, visible):
    """Tan et al.'s definition as a literal product: p_ij = b_ij prod_{k > j visible} (1 - b_ik)."""
    k, v = jnp.repeat(k, HQ // HKV, axis=2), jnp.repeat(v, HQ // HKV, axis=2)
    beta = jax.nn.sigmoid(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D))  # [B, H, i, k]
    j, kk = np.arange(T)[:, None], np.arange(T)[None, :]
    later = (kk > j)[None] & np.asarray(visible)[:, None, :]  # [i, j, k]
    factors = jnp.where(later[None, None], 1.0 - beta[:, :, :, None, :], 1.0)
    p = jnp.where(visible, beta * jnp.prod(factors, axis=-1), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("mask", [M.causal(), M.sliding_window(5)], ids=["causal", "window5"])
def test_stick_breaking_matches_the_paper_formula(impl, mask):
    q, k, v = _qkv(4, scale=2.0)
    _assert_matches_formula(q, k, v, mask, impl, "stick_breaking", _naive_stick_breaking,
                            w_seed=5)


def test_stick_breaking_weights_sum_to_at_most_one_and_favor_the_nearest_key():
    q, k, _ = _qkv(6)
    p = np.asarray(jattn.attention_weights(q, k, mask=M.causal(), normalizer="stick_breaking"))
    assert np.all(p.sum(-1) <= 1 + 1e-5)
    # equal scores: beta = 1/2 everywhere, p_ij = 2^-(i - j + 1)
    p0 = np.asarray(jattn.attention_weights(jnp.zeros_like(q), k, mask=M.causal(),
                                            normalizer="stick_breaking"))
    i, j = np.tril_indices(T)
    np.testing.assert_allclose(p0[0, 0, i, j], 0.5 ** (i - j + 1), rtol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_stick_breaking_empty_rows_are_zero_with_finite_gradients(impl):
    q, k, v = _qkv(7, scale=50.0)
    dense = jnp.tril(jnp.ones((T, T), bool)).at[0].set(False).at[9].set(False)

    def run(q):
        with small_blocks():
            return jattn.attention(q, k, v, mask=dense, normalizer="stick_breaking",
                                   implementation=impl)

    out = run(q)
    assert np.all(np.asarray(out[:, 0]) == 0) and np.all(np.asarray(out[:, 9]) == 0)
    grads = jax.grad(lambda q: jnp.sum(run(q) ** 2))(q)
    assert np.all(np.isfinite(np.asarray(grads)))
    if impl == "xla":
        assert_close(out, jattn.attention(q, k, v, mask=dense, normalizer="stick_breaking",
                                          implementation="reference"))


@pytest.mark.parametrize("normalizer", ["softpick", "stick_breaking"])
def test_rowwise_normalizers_refuse_context_parallelism(normalizer):
    """A hop merge for them does not exist: the ring would silently sum partial rows."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 4), ("context", "data"), axis_types=(AxisType.Auto,) * 2)
    q = jnp.zeros((1, 16, 2, 8))
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match=normalizer):
        jattn.attention(q, q, q, mask=M.causal(), normalizer=normalizer, context_axis="context")
