"""jattn.analysis against hand-computed small cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import analysis
from tests.icl_patterns import assert_ideal_patterns


def _uniform_causal(b, h, t):
    p = np.tril(np.ones((t, t), np.float32))
    p /= p.sum(-1, keepdims=True)
    return np.broadcast_to(p, (b, h, t, t)).copy()


def _first_token(b, h, t):
    p = np.zeros((b, h, t, t), np.float32)
    p[..., 0] = 1.0
    return p


# ----------------------------------------------------------------------------- sinks
def test_sink_score_all_mass_on_first_token_is_100():
    assert float(analysis.sink_score(_first_token(2, 4, 8))) == 100.0


def test_sink_score_identity_attention_is_0():
    p = np.broadcast_to(np.eye(6, dtype=np.float32), (2, 3, 6, 6))
    assert float(analysis.sink_score(p)) == 0.0
    # alpha_k = mean_{i >= k} p_{i,k} = 1 / (T - k) for the identity
    np.testing.assert_allclose(analysis.sink_importance(p, k=2), np.full(3, 1 / 4), rtol=1e-6)


def test_sink_importance_uniform_causal_is_harmonic_over_t():
    for t in (3, 16):
        alpha = analysis.sink_importance(_uniform_causal(1, 2, t))
        harmonic = sum(1 / (i + 1) for i in range(t))
        np.testing.assert_allclose(alpha, np.full(2, harmonic / t), rtol=1e-6)
    assert float(analysis.sink_score(_uniform_causal(1, 2, 3))) == 100.0
    assert float(analysis.sink_score(_uniform_causal(1, 2, 16))) == 0.0


def test_sink_score_fraction_of_heads_and_layers():
    t = 8
    layer0 = np.concatenate([_first_token(2, 1, t), _uniform_causal(2, 3, t)], axis=1)
    layer1 = _first_token(2, 4, t)
    # one layer: 1 of 4 heads; two layers: 5 of 8 (layer, head) pairs
    assert float(analysis.sink_score(layer0, eps=0.5)) == pytest.approx(25.0)
    stacked = np.stack([layer0, layer1])
    assert float(analysis.sink_score(stacked, eps=0.5)) == pytest.approx(62.5)
    assert analysis.sink_importance(stacked).shape == (2, 4)


def test_sink_score_averages_batch_first():
    # sequence 0 sinks (alpha = 1), sequence 1 does not (alpha = 1/T): mean 0.5625 at T = 8
    t = 8
    p = np.concatenate(
        [_first_token(1, 1, t), np.broadcast_to(np.eye(t, dtype=np.float32), (1, 1, t, t))]
    )
    np.testing.assert_allclose(analysis.sink_importance(p), [(1 + 1 / t) / 2], rtol=1e-6)
    assert float(analysis.sink_score(p, eps=0.5)) == 100.0
    assert float(analysis.sink_score(p, eps=0.6)) == 0.0


def test_sink_score_jits_and_rejects_bad_input():
    f = jax.jit(analysis.sink_score, static_argnums=(1, 2))
    assert float(f(_first_token(1, 2, 4), 0, 0.3)) == 100.0
    with pytest.raises(ValueError, match="weights"):
        analysis.sink_score(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="k must"):
        analysis.sink_score(_first_token(1, 1, 4), k=4)


def test_token_norm_ratio():
    norms = np.array([[4.0, 1.0, 1.0, 1.0, 1.0]])
    assert float(analysis.token_norm_ratio(norms)) == pytest.approx(4.0)
    assert float(analysis.token_norm_ratio(norms, k=1)) == pytest.approx(1 / (7 / 4))


# ----------------------------------------------------------------------------- maps
def test_entropy_uniform_causal_is_log_i_plus_1():
    ent = analysis.attention_entropy(_uniform_causal(2, 3, 7))
    np.testing.assert_allclose(
        ent, np.broadcast_to(np.log(np.arange(1, 8)), (2, 3, 7)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(analysis.attention_entropy(_first_token(1, 1, 5)), 0.0, atol=0)


def test_entropy_two_point():
    p = np.array([[0.25, 0.75]], np.float32)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(analysis.attention_entropy(p), [want], rtol=1e-6)


def test_mean_attention_distance_1d():
    # uniform causal: mean_{j <= i} (i - j) = i / 2; first token: distance i
    np.testing.assert_allclose(
        analysis.mean_attention_distance(_uniform_causal(1, 1, 6))[0, 0],
        np.arange(6) / 2,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        analysis.mean_attention_distance(_first_token(1, 1, 6))[0, 0], np.arange(6), rtol=1e-6
    )
    # Tq < Tk: the query sits at the end-aligned position
    p = np.zeros((1, 4), np.float32)
    p[0, 0] = 1.0
    np.testing.assert_allclose(analysis.mean_attention_distance(p), [3.0])


def test_mean_attention_distance_grid_with_cls():
    # 1 CLS + 3x3 grid; every patch attends half to CLS and half to patch (0, 0)
    t = 10
    p = np.zeros((t, t), np.float32)
    p[:, 0] = 0.5
    p[:, 1] = 0.5
    d = analysis.mean_attention_distance(p, grid_shape=(3, 3), num_prefix_tokens=1)
    rows, cols = np.unravel_index(np.arange(9), (3, 3))
    np.testing.assert_allclose(d, np.sqrt(rows**2 + cols**2), rtol=1e-6)
    with pytest.raises(ValueError, match="prod"):
        analysis.mean_attention_distance(p, grid_shape=(3, 3))


def test_rollout_of_identity_is_identity():
    eye = np.broadcast_to(np.eye(5, dtype=np.float32), (3, 2, 4, 5, 5))
    np.testing.assert_allclose(
        analysis.attention_rollout(eye), np.broadcast_to(np.eye(5), (2, 5, 5)), atol=1e-6
    )
    np.testing.assert_allclose(
        analysis.attention_rollout(list(eye), residual=False),
        np.broadcast_to(np.eye(5), (2, 5, 5)),
        atol=1e-6,
    )


def test_rollout_matches_hand_product():
    rng = np.random.default_rng(0)
    w = rng.random((2, 1, 3, 4, 4)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    a = [0.5 * w[l, 0].mean(0) + 0.5 * np.eye(4) for l in range(2)]
    want = a[1] @ a[0]
    got = analysis.attention_rollout(w)
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    # first-token attention without residual rolls out to all mass on token 0
    r = analysis.attention_rollout(_first_token(1, 2, 4)[None].repeat(3, 0), residual=False)
    np.testing.assert_allclose(r[0], _first_token(1, 1, 4)[0, 0])


# ----------------------------------------------------------------------------- activations
def test_massive_activations():
    h = np.ones((2, 1, 4, 8), np.float32)
    h[1, 0, 2, 5] = -5000.0
    out = analysis.massive_activations(h)
    np.testing.assert_allclose(out["top"], [1.0, 5000.0])
    np.testing.assert_allclose(out["median"], [1.0, 1.0])
    np.testing.assert_allclose(out["ratio"], [1.0, 5000.0])
    assert out["flag"].tolist() == [False, True]
    assert int(out["token"][1]) == 2 and int(out["channel"][1]) == 5
    assert analysis.massive_activations(list(h), min_ratio=1e4)["flag"].tolist() == [False, False]


# ----------------------------------------------------------------------------- heads
def test_head_ablation_importance_linear_loss():
    # loss = sum_h c_h (1 - m_h): removing head h costs exactly c_h
    c = jnp.array([[0.5, 2.0, 0.0], [1.0, 0.0, 3.0]])

    def loss(m):
        return jnp.sum(c * (1 - m))

    np.testing.assert_allclose(analysis.head_ablation_importance(loss, (2, 3)), c)
    np.testing.assert_allclose(analysis.head_ablation_importance(loss, (2, 3), "gradient"), c)
    np.testing.assert_allclose(
        analysis.head_ablation_importance(lambda m: jnp.sum(c[0] * (1 - m)), 3), c[0]
    )


def test_retrieval_score():
    # context tokens; needle at positions 2..4 (tokens 7, 8, 9); 3 generation steps
    context = np.array([[1, 2, 7, 8, 9, 3]])
    needle = np.array([[0, 0, 1, 1, 1, 0]], bool)
    generated = np.array([[7, 8, 9]])
    w = np.zeros((1, 3, 3, 6), np.float32)
    w[0, 0, [0, 1, 2], [2, 3, 4]] = 1.0  # head 0 copies every needle token: 1
    w[0, 1, [0, 1, 2], [2, 2, 2]] = 1.0  # head 1 copies token 7 once (then wrong token): 1/3
    w[0, 2, :, 0] = 1.0  # head 2 looks outside the needle: 0
    np.testing.assert_allclose(
        analysis.retrieval_score(w, generated, context, needle), [[1.0, 1 / 3, 0.0]], rtol=1e-6
    )


# ----------------------------------------------------------------------------- ICL patterns
def test_icl_patterns_ideal_model():
    d, h = 5, 2
    omega = np.array([-0.13, 0.13])
    mu = np.array([-3.2, 3.2])
    kq = omega[:, None, None] * np.eye(d)
    ov = np.zeros((h, d + 1, d + 1))
    ov[:, -1, -1] = mu
    assert_ideal_patterns(analysis.icl_patterns(kq, ov, scale=1.0), omega, mu)
    np.testing.assert_allclose(analysis.head_omega(kq, scale=0.5), omega / 2, rtol=1e-6)
    np.testing.assert_allclose(analysis.ov_last_entry_ratio(ov[:, -1:, :]), 1.0)


def test_icl_pattern_metrics_hand_values():
    # off-diagonal mass: diag (1, 1), off-diagonal (1, 1): ratio sqrt(2)/2
    kq = np.array([[1.0, 1.0], [1.0, 1.0]])
    assert float(analysis.kq_diagonal_ratio(kq)) == pytest.approx(math.sqrt(0.5))
    # diag (1, 3): |mean| sqrt(d) / ||diag|| = 2 sqrt(2) / sqrt(10)
    assert float(analysis.kq_homogeneity(np.diag([1.0, 3.0]))) == pytest.approx(
        2 * math.sqrt(2) / math.sqrt(10)
    )
    # = 1 / sqrt(1 + (std/mean)^2), std/mean = 0.5
    assert float(analysis.kq_homogeneity(np.diag([1.0, 3.0]))) == pytest.approx(1 / math.sqrt(1.25))
    assert float(analysis.kq_homogeneity(np.diag([1.0, -1.0]))) == pytest.approx(0.0)
    ov = np.array([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    assert float(analysis.ov_last_entry_ratio(ov)) == pytest.approx(0.8)
    assert float(analysis.ov_zero_sum_ratio(np.array([1.0, -3.0]))) == pytest.approx(0.5)
    assert float(analysis.ov_zero_sum_ratio(np.array([2.0]))) == pytest.approx(1.0)
