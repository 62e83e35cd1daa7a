"""Log-linear attention (jattn.linear.loglinear_gla): the masked reference and the chunk form
against an independent float64 numpy loop over (t, s) with the Fenwick level from Python's
int.bit_length, gradients of every input chunk vs reference, and the reductions to GLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear
from jattn.linear.loglinear import fenwick_levels, num_levels
from jattn.testing import assert_close


def _numpy_loop(q, k, v, g, lam, scale):
    q, k, v, g, lam = (np.asarray(x, np.float64) for x in (q, k, v, g, lam))
    B, T, H, K = q.shape
    if g.ndim == 3:
        g = np.repeat(g[..., None], K, axis=-1)
    G = np.cumsum(g, axis=1)
    o = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for s in range(t + 1):
                    level = (t ^ s).bit_length()
                    a = np.sum(q[b, t, h] * k[b, s, h] * np.exp(G[b, t, h] - G[b, s, h]))
                    o[b, t, h] += scale * lam[b, t, h, level] * a * v[b, s, h]
    return o


def _inputs(T=21, per_channel=True, B=1, H=2, K=4, V=3, extra_levels=0, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H) + ((K,) if per_channel else ())) + 2)
    lam = jax.random.uniform(ks[4], (B, T, H, num_levels(T) + extra_levels), minval=0.1)
    return q, k, v, g, lam


def test_fenwick_levels_partition_the_prefix_into_power_of_two_buckets():
    T = 13
    t, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    lv = np.asarray(fenwick_levels(jnp.asarray(t), jnp.asarray(s)))
    for ti in range(T):
        counts = np.bincount(lv[ti, : ti + 1], minlength=num_levels(T))
        # level l >= 1 is present iff bit l-1 of t is set, and then holds 2^(l-1) keys
        want = [1] + [(1 << (l - 1)) if (ti >> (l - 1)) & 1 else 0
                      for l in range(1, num_levels(T))]
        assert counts.tolist() == want, ti


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(
    "impl,chunk_size", [("reference", 64), ("chunk", 1), ("chunk", 4), ("chunk", 8), ("chunk", 64)]
)
def test_matches_float64_numpy_loop(per_channel, impl, chunk_size):
    q, k, v, g, lam = _inputs(T=21, per_channel=per_channel, extra_levels=2)
    o = jattn.linear.loglinear_gla(q, k, v, g, lam, scale=0.5, chunk_size=chunk_size,
                                   implementation=impl)
    assert_close(o, _numpy_loop(q, k, v, g, lam[..., : num_levels(21)], 0.5), atol=1e-5,
                 rtol=1e-5, name="o")


def test_unit_level_weights_give_gla():
    q, k, v, g, _ = _inputs(T=21, per_channel=True, extra_levels=2)
    lam = jnp.ones(q.shape[:3] + (num_levels(21) + 2,))
    o = jattn.linear.loglinear_gla(q, k, v, g, lam, scale=0.5, chunk_size=4)
    want, _ = jattn.linear.gla(q, k, v, g, scale=0.5, implementation="reference")
    assert_close(o, want, atol=1e-5, rtol=1e-5, name="o")


@pytest.mark.parametrize("per_channel", [True, False])
def test_chunk_gradients_of_every_input_match_the_reference(per_channel):
    q, k, v, g, lam = _inputs(T=21, per_channel=per_channel)
    w = jax.random.normal(jax.random.key(9), v.shape)

    def loss(impl):
        def f(*xs):
            return jnp.sum(jattn.linear.loglinear_gla(*xs, chunk_size=4, implementation=impl) * w)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, lam)

    for name, a, b in zip("q k v g lambda".split(), loss("chunk"), loss("reference"),
                              strict=True):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=f"d{name}")


def test_full_reset_gate_is_finite_and_cuts_the_past():
    q, k, v, g, lam = _inputs(T=21, per_channel=False, extra_levels=2)
    g = g.at[:, 8].set(-jnp.inf)
    o = jattn.linear.loglinear_gla(q, k, v, g, lam, scale=0.5, chunk_size=4)
    assert bool(jnp.all(jnp.isfinite(o)))
    # after the reset only tokens 8.. matter: changing v before 8 changes nothing after it
    o2 = jattn.linear.loglinear_gla(q, k, v.at[:, :8].set(0.0), g, lam, scale=0.5,
                                    chunk_size=4)
    assert_close(o[:, 8:], o2[:, 8:], atol=1e-6, name="o after the reset")
    grads = jax.jit(jax.grad(lambda g: jnp.sum(jattn.linear.loglinear_gla(q, k, v, g, lam,
                                                                          chunk_size=4))))(g)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_bf16_inputs_keep_dtype_and_agree():
    q, k, v, g, lam = _inputs(T=21, per_channel=True, extra_levels=2)
    o = jattn.linear.loglinear_gla(*(x.astype(jnp.bfloat16) for x in (q, k, v)), g, lam,
                                   scale=0.5, chunk_size=4)
    assert o.dtype == jnp.bfloat16
    want = jattn.linear.loglinear_gla(q, k, v, g, lam, scale=0.5, implementation="reference")
    assert_close(o.astype(jnp.float32), want, atol=5e-2, rtol=5e-2, name="o bf16")


def test_errors_name_the_argument():
    q, k, v, g, lam = _inputs(T=9)
    with pytest.raises(ValueError, match="level_weights"):
        jattn.linear.loglinear_gla(q, k, v, g, lam[..., :3])
    with pytest.raises(ValueError, match="power of two"):
        jattn.linear.loglinear_gla(q, k, v, g, lam, chunk_size=12)
    with pytest.raises(NotImplementedError, match="recurrent"):
        jattn.linear.loglinear_gla(q, k, v, g, lam, implementation="recurrent")
    with pytest.raises(ValueError, match="g"):
        jattn.linear.loglinear_gla(q, k, v, g[..., :2], lam)


@pytest.mark.parametrize("per_channel", [True, False])
def test_decoding_steps_match_the_sequence_form(per_channel):
    T = 11
    q, k, v, g, lam = _inputs(T=T, per_channel=per_channel, extra_levels=1)
    L = lam.shape[-1]

    @jax.jit
    def run_steps(q, k, v, g, lam):
        def step(levels, x):
            o, levels = jattn.linear.loglinear_gla_step(*x[:5], levels, x[5], scale=0.5)
            return levels, o
        xs = tuple(x.swapaxes(0, 1) for x in (q, k, v, g, lam)) + (jnp.arange(T),)
        levels0 = jnp.zeros((L - 1,) + q.shape[:1] + q.shape[2:] + v.shape[-1:])
        return jax.lax.scan(step, levels0, xs)[1].swapaxes(0, 1)

    want = jattn.linear.loglinear_gla(q, k, v, g, lam, scale=0.5, implementation="reference")
    assert_close(run_steps(q, k, v, g, lam), want, atol=1e-5, rtol=1e-5, name="decoded o")


def _numpy_masked(q, k, v, g, lam, scale):
    """float64 masked form, vectorised over (t, s): for sequences too long for the loop."""
    from jattn.linear.chunk import LOG_DECAY_FLOOR

    q, k, v, g, lam = (np.asarray(x, np.float64) for x in (q, k, v, g, lam))
    T, K = q.shape[1], q.shape[-1]
    if g.ndim == 3:
        g = np.repeat(g[..., None], K, axis=-1)
    G = np.cumsum(np.maximum(g, LOG_DECAY_FLOOR), axis=1)  # [B, T, H, K]
    t, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    level = np.where(s <= t, np.bitwise_xor(t, s), 0)
    level = np.array([int(x).bit_length() for x in level.ravel()]).reshape(T, T)
    d = np.where((s <= t)[None, :, :, None, None], G[:, :, None] - G[:, None, :], -np.inf)
    scores = np.einsum("bthk,bshk,btshk->bhts", q, k, np.exp(d))
    weight = np.take_along_axis(lam.transpose(0, 2, 1, 3), np.broadcast_to(level, (1, 1, T, T)),
                                axis=-1)
    return scale * np.einsum("bhts,bshv->bthv", scores * weight, v)


@pytest.mark.parametrize("per_channel", [True, False])
def test_chunk_form_under_extreme_gates_matches_float64(per_channel):
    # Many chunk levels (T = 203, chunk 4: 51 chunks, 6 chunk levels) with gates that are ~0,
    # huge, or -inf resets mixed token by token: every decay of a carried or merged state must
    # stay finite and exact (a rewrite with differences of long cumulative sums would not).
    T = 203
    q, k, v, g, lam = _inputs(T=T, per_channel=per_channel, K=8, V=4, seed=3)
    rng = np.random.default_rng(3)
    choices = np.array([0.0, -1e-6, -0.05, -30.0, -1e4, -np.inf], np.float32)
    g = jnp.asarray(rng.choice(choices, g.shape, p=[.3, .3, .25, .06, .05, .04]), jnp.float32)
    o = jattn.linear.loglinear_gla(q, k, v, g, lam, scale=0.5, chunk_size=4)
    assert bool(jnp.all(jnp.isfinite(o)))
    assert_close(o, _numpy_masked(q, k, v, g, lam, 0.5), atol=2e-5, rtol=2e-5, name="o")
