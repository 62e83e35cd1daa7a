"""score_mod and jattn.score_mods: every implementation vs independent dense formulas.

The oracle here is a few lines of dense jnp (``_dense_attention``) that share nothing with jattn:
logits are built explicitly, modified by a dense function of ``[B, H, Tq, Tk]`` arrays, masked
and normalized; gradients of captured arrays come from plain autodiff of that formula.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks as M
from jattn import position, score_mods
from jattn.testing import assert_close
from tests.testing import small_blocks

B, T, HQ, HKV, D = 2, 21, 4, 2, 8  # T not a multiple of the tiles: padding is exercised
IMPLS = ("reference", "xla")


def _qkv(seed=0, t=T):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, t, HQ, D)), jax.random.normal(kk, (B, t, HKV, D)),
            jax.random.normal(kv, (B, t, HKV, D)))


def _dense_attention(q, k, v, logits_mod, visible, normalizer="softmax"):
    """Independent oracle. ``logits_mod(s [B, H, Tq, Tk]) -> s'``; ``visible [Tq, Tk]``."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = logits_mod(s)
    if normalizer == "softmax":
        p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    else:
        p = jnp.where(visible, jax.nn.sigmoid(s), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _rel(t=T):
    i = np.arange(t)
    return i[:, None] - i[None, :]  # q_idx - kv_idx


def _t5_bucket_loop(rel_kq: int, num_buckets: int, max_distance: int, bidirectional: bool):
    """T5's bucket of one relative position ``kv - q``, in plain Python (Raffel et al. 2020)."""
    n = -rel_kq
    ret = 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(np.log(n / max_exact) / np.log(max_distance / max_exact)
                            * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


def _case(name):
    """(score_mod factory of the captured array, captured array, dense logits_mod factory)."""
    rng = np.random.default_rng(1)
    rel = jnp.asarray(_rel(), jnp.float32)
    if name == "alibi":
        arr = position.alibi_slopes(HQ)
        return (score_mods.alibi, arr,
                lambda a: lambda s: s - a[None, :, None, None] * rel)
    if name == "relative_bias":
        nb, md = 8, 16
        arr = jnp.asarray(rng.normal(size=(nb, HQ)), jnp.float32)
        buckets = np.vectorize(lambda r: _t5_bucket_loop(-r, nb, md, True))(_rel())
        return (lambda a: score_mods.relative_bias(a, nb, md, bidirectional=True), arr,
                lambda a: lambda s: s + a[buckets].transpose(2, 0, 1)[None])
    if name == "forgetting":
        arr = jax.nn.log_sigmoid(jnp.asarray(rng.normal(size=(B, T, HQ)) + 2.0, jnp.float32))
        def dense(a):
            c = jnp.cumsum(a, axis=1).transpose(0, 2, 1)  # [B, H, T]
            return lambda s: s + c[..., :, None] - c[..., None, :]
        return score_mods.forgetting, arr, dense
    if name == "tanh_cap":
        arr = jnp.asarray([0.5, 1.0, 2.0, 4.0], jnp.float32)
        return (score_mods.tanh_cap, arr,
                lambda a: lambda s: a[None, :, None, None] * jnp.tanh(s / a[None, :, None, None]))
    raise ValueError(name)


MASKS = {"causal": M.causal(), "window5": M.sliding_window(5)}


def _visible(mask):
    i = jnp.arange(T)
    return mask.visible(i[:, None], i[None, :], 0, q_len=T, kv_len=T)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,mask_name,normalizer", [
    ("alibi", "causal", "softmax"),
    ("relative_bias", "window5", "softmax"),
    ("forgetting", "causal", "softmax"),
    ("tanh_cap", "causal", "sigmoid"),
])
def test_score_mod_matches_dense_formula(impl, name, mask_name, normalizer):
    """Forward and gradients (q, k, v and the captured array), GQA, masks, padded tiles."""
    make_mod, arr, dense_mod = _case(name)
    mask = MASKS[mask_name]
    q, k, v = _qkv()
    w = jax.random.normal(jax.random.PRNGKey(9), (B, T, HQ, D))

    def ours(arr, q, k, v):
        o = jattn.attention(q, k, v, mask=mask, score_mod=make_mod(arr), normalizer=normalizer,
                            implementation=impl)
        return jnp.sum(o * w), o

    def oracle(arr, q, k, v):
        o = _dense_attention(q, k, v, dense_mod(arr), _visible(mask), normalizer)
        return jnp.sum(o * w), o

    with small_blocks():
        (_, out), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3), has_aux=True))(
            arr, q, k, v)
    (_, want), want_grads = jax.value_and_grad(oracle, argnums=(0, 1, 2, 3), has_aux=True)(
        arr, q, k, v)
    assert_close(out, want, name="out")
    for g, wg, n in zip(grads, want_grads, (name, "dq", "dk", "dv"), strict=True):
        assert_close(g, wg, rtol=1e-4, name=n)


@pytest.mark.parametrize("impl", IMPLS)
def test_alibi_score_mod_equals_dense_alibi_bias(impl):
    q, k, v = _qkv(1)
    bias = position.alibi_bias(HQ, T, T)
    with small_blocks():
        got = jattn.attention(q, k, v, mask=M.causal(), implementation=impl,
                              score_mod=score_mods.alibi(position.alibi_slopes(HQ)))
    want = jattn.attention(q, k, v, mask=M.causal(), bias=bias, implementation="reference")
    assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_cap_score_mod_equals_logits_soft_cap_and_order(impl):
    """soft_cap(c) == logits_soft_cap=c; order is bias -> score_mod -> cap -> mask -> sinks."""
    q, k, v = _qkv(2)
    q = 4 * q  # large logits, so the cap matters
    bias = jax.random.normal(jax.random.PRNGKey(3), (1, HQ, T, T))
    sinks = jnp.linspace(-1.0, 1.0, HQ)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat(7, 1))
    common = dict(mask=M.causal(), bias=bias, sinks=sinks, segment_ids=seg)
    with small_blocks():
        got = jattn.attention(q, k, v, score_mod=score_mods.soft_cap(3.0), implementation=impl,
                              **common)
        # shift then cap: the score_mod runs before logits_soft_cap
        shifted = jattn.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + 1.0,
                                  logits_soft_cap=3.0, implementation=impl, **common)
    want = jattn.attention(q, k, v, logits_soft_cap=3.0, implementation="reference", **common)
    assert_close(got, want)
    want_shifted = jattn.attention(q, k, v, mask=M.causal(), bias=bias + 1.0, sinks=sinks,
                                   segment_ids=seg, logits_soft_cap=3.0, implementation="reference")
    assert_close(shifted, want_shifted)

    # gradients through bias -> score_mod (with a captured per-head shift) -> cap -> sinks
    def loss(shift, q, bias, impl):
        o = jattn.attention(q, k, v, mask=M.causal(), bias=bias, sinks=sinks, segment_ids=seg,
                            logits_soft_cap=3.0, implementation=impl,
                            score_mod=lambda s, b, h, i, j: s * 1.5 + shift[h])
        return jnp.sum(jnp.sin(o))

    shift = jnp.linspace(-0.5, 0.5, HQ)
    with small_blocks():
        got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(shift, q, bias, impl)
    want = jax.grad(loss, (0, 1, 2))(shift, q, bias, "reference")
    for a, e, n in zip(got, want, ("dshift", "dq", "dbias"), strict=True):
        assert_close(a, e, rtol=1e-4, name=n)


def test_compose_applies_left_to_right_and_weights_agree():
    slopes = position.alibi_slopes(HQ)
    mod = score_mods.compose(score_mods.alibi(slopes), score_mods.soft_cap(2.0))
    q, k, v = _qkv(4)
    p = jattn.attention_weights(q, k, mask=M.causal(), score_mod=mod)
    rel = jnp.asarray(_rel(), jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(D)
    s = 2.0 * jnp.tanh((s - slopes[None, :, None, None] * rel) / 2.0)
    want = jax.nn.softmax(jnp.where(_visible(M.causal()), s, -jnp.inf), axis=-1)
    assert_close(p, want)
    assert "alibi" in mod.__name__ and "soft_cap" in mod.__name__


@pytest.mark.parametrize("impl", IMPLS)
def test_captured_array_gradients_are_bitwise_deterministic(impl):
    q, k, v = _qkv(5)
    log_f = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(6), (B, T, HQ)))
    table = jax.random.normal(jax.random.PRNGKey(7), (8, HQ))

    def loss(log_f, table, q):
        mod = score_mods.compose(score_mods.forgetting(log_f),
                                 score_mods.relative_bias(table, 8, 16, bidirectional=False))
        o = jattn.attention(q, k, v, mask=M.causal(), score_mod=mod, implementation=impl)
        return jnp.sum(o ** 2)

    with small_blocks():
        runs = [jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(log_f, table, q) for _ in range(2)]
        runs.append(jax.grad(loss, argnums=(0, 1, 2))(log_f, table, q))  # eager, too
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(runs[0], runs[2], strict=True):
        assert_close(a, b, rtol=1e-5)


def test_score_mod_closing_over_concrete_and_integer_arrays():
    """Non-traced captures stay constants; an integer capture gets no cotangent (no error)."""
    offsets = jnp.arange(HQ, dtype=jnp.int32)
    q, k, v = _qkv(8)

    def loss(q):
        mod = lambda s, b, h, i, j: s + 0.1 * offsets[h].astype(jnp.float32)  # noqa: E731
        return jnp.sum(jattn.attention(q, k, v, mask=M.causal(), score_mod=mod,
                                       implementation="xla") ** 2)

    def want(q):
        bias = 0.1 * offsets.astype(jnp.float32)[None, :, None, None] * jnp.ones((1, 1, T, T))
        return jnp.sum(jattn.attention(q, k, v, mask=M.causal(), bias=bias,
                                       implementation="reference") ** 2)

    with small_blocks():
        assert_close(jax.jit(jax.grad(loss))(q), jax.grad(want)(q), rtol=1e-4)


def _wrong_shape(s, b, h, q_idx, kv_idx):
    return jnp.stack([s, s])


def _int_result(s, b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def _python_branch(s, b, h, q_idx, kv_idx):
    return s if q_idx > kv_idx else -s


def _reduces(s, b, h, q_idx, kv_idx):
    return s - jnp.max(s)  # a scalar trace cannot see this; the tile check does


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fn,match", [
    (_wrong_shape, "_wrong_shape must return one floating scalar"),
    (_int_result, "_int_result must return one floating scalar"),
    (_python_branch, "_python_branch failed when traced on scalar"),
    (_reduces, "_reduces must be elementwise"),
    ("alibi", "score_mod must be a callable"),
])
def test_bad_score_mod_names_the_function(impl, fn, match):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=match), small_blocks():
        jattn.attention(q, k, v, mask=M.causal(), score_mod=fn, implementation=impl)


def test_library_argument_checks():
    with pytest.raises(ValueError, match="slopes"):
        score_mods.alibi(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="table"):
        score_mods.relative_bias(jnp.ones((4, 2)), 8, 16, True)
    with pytest.raises(ValueError, match="log_f"):
        score_mods.forgetting(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="cap"):
        score_mods.soft_cap(-1.0)


def _capture_free_alibi(s, b, h, q_idx, kv_idx):
    """ALiBi with slopes computed from the head index: captures no array."""
    slope = jnp.exp2(-(h + 1).astype(jnp.float32))
    return s - slope * (q_idx - kv_idx).astype(jnp.float32) + 0.01 * b.astype(jnp.float32)


@pytest.mark.parametrize("backend", ["tpu", "cuda"])
def test_pallas_capture_free_score_mod_matches_reference(backend):
    """The kernel (interpret mode, both drivers) applies a capture-free score_mod before the
    cap and differentiates through it; GQA, causal, padded tiles."""
    from pallas_kernels import flash_attention

    q, k, v = _qkv(10, t=40)
    w = jax.random.normal(jax.random.PRNGKey(11), q.shape)
    mask = M.causal()

    def kernel(q, k, v):
        return flash_attention(q, k, v, block_map=mask.block_map(40, 40, 16, 16),
                               mask_fn=mask.index_fn(40, 40), logits_soft_cap=4.0,
                               block_q=16, block_kv=16, backend=backend,
                               score_mod=_capture_free_alibi)

    def reference(q, k, v):
        return jattn.attention(q, k, v, mask=mask, logits_soft_cap=4.0,
                               score_mod=_capture_free_alibi, implementation="reference")

    got, g_got = jax.value_and_grad(lambda *a: jnp.sum(kernel(*a) * w), (0, 1, 2))(q, k, v)
    want, g_want = jax.value_and_grad(lambda *a: jnp.sum(reference(*a) * w), (0, 1, 2))(q, k, v)
    assert_close(got, want, rtol=1e-5, name="loss")
    for a, e, n in zip(g_got, g_want, ("dq", "dk", "dv"), strict=True):
        assert_close(a, e, rtol=1e-4, name=n)


def test_pallas_via_jattn_and_captured_arrays_fall_back():
    q, k, v = _qkv()
    got = jattn.attention(q, k, v, mask=M.causal(), score_mod=_capture_free_alibi,
                          implementation="pallas")
    want = jattn.attention(q, k, v, mask=M.causal(), score_mod=_capture_free_alibi,
                           implementation="reference")
    assert_close(got, want)
    # A dense [4B, Hq, T, T] pair bias is too large to pass whole to every kernel program (small
    # tables and per-position arrays are served: tests/test_score_mod_pallas.py).
    pair = jnp.ones((4 * B, HQ, T, T))
    mod = lambda s, b, h, i, j: s + pair[b, h, i, j]  # noqa: E731
    with pytest.raises(NotImplementedError, match="closes over arrays of shapes"):
        jattn.attention(q, k, v, mask=M.causal(), score_mod=mod, implementation="pallas")
    with pytest.raises(NotImplementedError, match="closes over arrays of shapes"):
        jax.jit(lambda p: jattn.attention(q, k, v, mask=M.causal(), implementation="pallas",
                                          score_mod=lambda s, b, h, i, j: s + p[b, h, i, j]))(
            pair)
    got = jattn.attention(q, k, v, mask=M.causal(), score_mod=mod, implementation=None)
    want = jattn.attention(q, k, v, mask=M.causal(), score_mod=mod, implementation="reference")
    assert_close(got, want)


def _sorts(s, b, h, q_idx, kv_idx):
    return jnp.sort(s, axis=-1)


def _shifts(s, b, h, q_idx, kv_idx):
    return jnp.roll(s, 1, axis=-1)


@pytest.mark.parametrize("fn", [_reduces, _sorts, _shifts])
def test_non_elementwise_score_mod_is_rejected_in_every_implementation(fn):
    q, k, v = _qkv()
    for impl in IMPLS:
        with pytest.raises(TypeError, match=f"{fn.__name__} .*elementwise"), small_blocks():
            jattn.attention(q, k, v, mask=M.causal(), score_mod=fn, implementation=impl)


def test_gathers_and_unit_reshapes_of_scores_are_allowed():
    table = jnp.arange(8.0)

    def mod(s, b, h, q_idx, kv_idx):  # s picks a table entry; s[None][0] is elementwise
        return s[None][0] + table[jnp.clip(s.astype(jnp.int32), 0, 7)]

    q, k, v = _qkv()
    with small_blocks():
        jattn.attention(q, k, v, mask=M.causal(), score_mod=mod, implementation="xla")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,t", [(0, 8), (2, 0)])
def test_empty_sizes_with_a_gathering_score_mod(impl, b, t):
    """No score exists, so the score_mod is never traced (it would index an empty array)."""
    q, k = jnp.ones((b, t, HQ, D)), jnp.ones((b, t, HKV, D))

    def loss(log_f):
        return jattn.attention(q, k, k, mask=M.causal(), implementation=impl,
                               score_mod=score_mods.forgetting(log_f)).sum()

    log_f = jnp.zeros((b, t, HQ))
    assert jax.grad(loss)(log_f).shape == log_f.shape
