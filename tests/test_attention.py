"""jattn.attention chain of trust: reference vs jax.nn.dot_product_attention, xla vs reference."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn import masks as M
from jattn.testing import assert_close
from tests.testing import small_blocks


def qkv(seed, b=2, tq=16, tk=16, hq=4, hkv=2, d=8, dv=None, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, tk, hkv, dv or d), dtype)
    return q, k, v


# --- reference vs jax.nn.dot_product_attention ---------------------------------------------------
@pytest.mark.parametrize("case", ["dense", "causal", "window", "gqa", "mqa", "bias"])
def test_reference_matches_dot_product_attention(case):
    hkv = {"gqa": 2, "mqa": 1}.get(case, 4)
    q, k, v = qkv(0, tq=12, tk=12, hq=4, hkv=hkv)
    kw, dpa = {}, {}
    if case in ("causal", "gqa", "mqa"):
        kw["mask"], dpa["is_causal"] = M.causal(), True
    if case == "window":
        kw["mask"] = M.sliding_window(4)
        dpa.update(is_causal=True, local_window_size=(3, 0))
    if case == "bias":
        bias = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 12, 12))
        kw["bias"], dpa["bias"] = bias, bias
    got = jattn.attention(q, k, v, implementation="reference", **kw)
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **dpa)
    assert_close(got, want)
    g_got = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
        jattn.attention(q, k, v, implementation="reference", **kw))), (0, 1, 2))(q, k, v)
    g_want = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
        jax.nn.dot_product_attention(q, k, v, **dpa))), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want, strict=True):
        assert_close(a, b)


# --- xla vs reference: property-based ------------------------------------------------------------
MASK_CHOICES = [
    None, M.causal(), M.sliding_window(5), M.local(3, 2), M.chunked(6), M.prefix_lm(4),
    M.causal() & M.strided(3, 1), M.chunked(4) | M.sliding_window(3), ~M.causal(),
]


@st.composite
def attention_case(draw):
    b = draw(st.integers(1, 2))
    tq, tk = draw(st.integers(1, 29)), draw(st.integers(1, 29))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([4, 8]))
    norm = draw(st.sampled_from(["softmax", "sigmoid", "relu"]))
    case = dict(b=b, tq=tq, tk=tk, hq=hkv * group, hkv=hkv, d=d, normalizer=norm,
                mask=draw(st.sampled_from(MASK_CHOICES)),
                bias=draw(st.booleans()), soft_cap=draw(st.sampled_from([None, 3.0])),
                segments=draw(st.booleans()), dense=draw(st.booleans()),
                sinks=norm == "softmax" and draw(st.booleans()),
                bq=draw(st.sampled_from([4, 8])), bk=draw(st.sampled_from([4, 8, 16])),
                seed=draw(st.integers(0, 1000)))
    return case


def build(case):
    q, k, v = qkv(case["seed"], case["b"], case["tq"], case["tk"], case["hq"], case["hkv"],
                  case["d"])
    rng = np.random.default_rng(case["seed"])
    kw = dict(mask=case["mask"], normalizer=case["normalizer"],
              logits_soft_cap=case["soft_cap"])
    extra = {}
    if case["bias"]:
        extra["bias"] = jnp.asarray(rng.normal(size=(1, case["hq"], case["tq"], case["tk"])),
                                    jnp.float32)
    if case["sinks"]:
        extra["sinks"] = jnp.asarray(rng.normal(size=(case["hq"],)), jnp.float32)
    if case["segments"]:
        kw["segment_ids"] = (jnp.asarray(np.sort(rng.integers(0, 3, (case["b"], case["tq"])))),
                             jnp.asarray(np.sort(rng.integers(0, 3, (case["b"], case["tk"])))))
    if case["dense"]:
        dense = rng.random((case["b"], 1, case["tq"], case["tk"])) < 0.8
        if case["mask"] is not None:  # combine an explicit array with the mask object
            kw["mask"] = case["mask"] & M.from_array(dense[0, 0])
        else:
            kw["mask"] = jnp.asarray(dense)
    return (q, k, v), kw, extra


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Tiny shapes: compile time dominates, and XLA's optimization passes do not pay off."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def check_xla_against_reference(case):
    (q, k, v), kw, extra = build(case)
    names = ["q", "k", "v"] + sorted(extra)

    def loss(impl):
        def f(*args):
            ex = dict(zip(names[3:], args[3:], strict=True))
            out = jattn.attention(*args[:3], implementation=impl, **kw, **ex)
            return jnp.sum(out * jnp.cos(out)), out
        return f

    args = (q, k, v) + tuple(extra[n] for n in names[3:])
    argnums = tuple(range(len(args)))
    # One jit per case: a single compile instead of one per eager op.
    (_, ref), g_ref = jax.jit(jax.value_and_grad(loss("reference"), argnums, has_aux=True))(*args)
    with small_blocks(case["bq"], case["bk"]):
        (_, got), g_got = jax.jit(jax.value_and_grad(loss("xla"), argnums, has_aux=True))(*args)
    assert_close(got, ref, name="out")
    for n, a, b in zip(names, g_got, g_ref, strict=True):
        assert_close(a, b, name=f"d{n}")


@settings(max_examples=6, deadline=None)
@given(case=attention_case())
def test_xla_matches_reference_forward_and_gradients(case):
    check_xla_against_reference(case)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(case=attention_case())
def test_xla_matches_reference_many_cases(case):
    check_xla_against_reference(case)


def test_return_lse_and_its_gradient():
    q, k, v = qkv(1, tq=19, tk=23)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    kw = dict(mask=M.sliding_window(6), sinks=sinks, return_lse=True)
    out, lse = jattn.attention(q, k, v, implementation="reference", **kw)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
    vis = M.sliding_window(6).dense(19, 23)
    want = jax.nn.logsumexp(jnp.concatenate(
        [jnp.where(vis, s, -jnp.inf), jnp.broadcast_to(sinks[None, :, None, None],
                                                       (2, 4, 19, 1))], -1), -1)
    assert_close(lse, want)
    def lse_loss(impl):
        return jax.jit(jax.grad(lambda q, s: jnp.sum(jnp.sin(jattn.attention(
            q, k, v, implementation=impl, mask=kw["mask"], sinks=s, return_lse=True)[1])),
            (0, 1)))

    with small_blocks(8, 8):
        out_x, lse_x = jax.jit(lambda q: jattn.attention(q, k, v, implementation="xla", **kw))(q)
        g_x = lse_loss("xla")(q, sinks)
    assert_close(out_x, out)
    assert_close(lse_x, lse)
    g_r = lse_loss("reference")(q, sinks)
    for a, b in zip(g_x, g_r, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu"])
def test_rows_without_visible_keys_are_zero_with_finite_gradients(impl, normalizer):
    q, k, v = qkv(2, tq=8, tk=8)
    # Query 0..3 see nothing: keys are restricted to segment 1, which queries 0..3 are not in.
    seg = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]] * 2)
    kw = dict(mask=M.causal(), segment_ids=seg, normalizer=normalizer, implementation=impl)
    k_only = dict(kw, segment_ids=(seg, jnp.ones_like(seg)))
    with small_blocks(4, 4):
        out, grads = jax.jit(jax.value_and_grad(
            lambda q, k, v: (jnp.sum(jattn.attention(q, k, v, **k_only) ** 2),
                             jattn.attention(q, k, v, **k_only)), (0, 1, 2), has_aux=True))(
            q, k, v)
        out = out[1]
    assert np.all(np.asarray(out[:, :4]) == 0.0)
    assert np.all(np.isfinite(np.asarray(out)))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0][:, :4]) == 0.0)


def test_normalizer_semantics():
    q, k, v = qkv(3, tq=6, tk=6, hq=2, hkv=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    i, j = np.arange(6)[:, None], np.arange(6)[None, :]
    causal = j <= i
    p_relu = np.asarray(jattn.attention_weights(q, k, mask=M.causal(), normalizer="relu"))
    assert_close(p_relu, np.where(causal, np.maximum(s, 0), 0) / (i + 1))  # relu(s) / i (1-based)
    p_sig = np.asarray(jattn.attention_weights(q, k, mask=M.causal(), normalizer="sigmoid"))
    assert_close(p_sig, np.where(causal, 1 / (1 + np.exp(-s)), 0))
    sinks = jnp.array([1.0, -2.0])
    p_soft = np.asarray(jattn.attention_weights(q, k, mask=M.causal(), sinks=sinks))
    e = np.where(causal, np.exp(s), 0)
    z = e.sum(-1, keepdims=True) + np.exp(np.asarray(sinks))[None, :, None, None]
    assert_close(p_soft, e / z)


def test_bf16_accumulates_in_fp32_and_returns_bf16():
    q, k, v = qkv(4, tq=40, tk=40)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    want = jattn.attention(qb.astype(jnp.float32), kb.astype(jnp.float32),
                           vb.astype(jnp.float32), mask=M.causal(), implementation="reference")
    for impl in ("reference", "xla"):
        with small_blocks(16, 16):
            got = jattn.attention(qb, kb, vb, mask=M.causal(), implementation=impl)
        assert got.dtype == jnp.bfloat16
        assert_close(got, want, dtype=jnp.bfloat16)


def test_xla_skips_empty_blocks():
    # NaNs in values of a key block that no query of block 0 may see: visiting that block would
    # poison those rows (0 * NaN); skipping it keeps them finite.
    q, k, v = qkv(5, tq=16, tk=16)
    v = v.at[:, 8:].set(jnp.nan)
    with small_blocks(8, 8):
        out = jattn.attention(q, k, v, mask=M.chunked(8), implementation="xla")
    assert np.all(np.isfinite(np.asarray(out[:, :8])))
    assert np.all(np.isnan(np.asarray(out[:, 8:])))


def test_xla_static_block_map_has_no_sort():
    # Issue 21: the block lists of a static mask are compacted on the host; an argsort of the
    # constant map in the graph would be constant-folded by XLA at every compile (slow at 64K).
    q, k, v = qkv(5, tq=32, tk=32)

    def lowered(**kw):
        with small_blocks(8, 8):
            f = jax.jit(lambda q, k, v: jax.grad(lambda q: jnp.sum(jattn.attention(
                q, k, v, implementation="xla", **kw)))(q))
            return f.lower(q, k, v).as_text()

    assert "sort" not in lowered(mask=M.sliding_window(6))
    # Traced segment ids make the map data-dependent: compacted in the graph.
    assert "sort" in lowered(mask=M.causal(), segment_ids=jnp.arange(32)[None].repeat(2, 0) // 9)


def test_masks_are_static_under_jit():
    q, k, v = qkv(6)
    traces = []

    def f(q, k, v):
        traces.append(1)
        return jattn.attention(q, k, v, mask=M.causal(), implementation="xla")

    jf = jax.jit(f)
    jf(q, k, v)
    jf(q + 1, k, v)
    assert len(traces) == 1
    # Dynamic document masks: segment ids are traced values, so new ids do not recompile.
    seg_fn = jax.jit(lambda q, s: jattn.attention(q, k, v, segment_ids=s))
    a = seg_fn(q, jnp.zeros((2, 16), jnp.int32))
    b = seg_fn(q, jnp.repeat(jnp.arange(2), 8)[None].repeat(2, 0))
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_per_head_mask_and_cross_attention_segments():
    q, k, v = qkv(7, tq=10, tk=14, hq=4, hkv=2)
    mask = M.per_head([M.causal(), M.strided(2), M.sliding_window(3), M.full()])
    seg = (jnp.array([[0] * 5 + [1] * 5] * 2), jnp.array([[0] * 7 + [1] * 7] * 2))
    ref = jattn.attention(q, k, v, mask=mask, segment_ids=seg, implementation="reference")
    with small_blocks(4, 4):
        got = jattn.attention(q, k, v, mask=mask, segment_ids=seg, implementation="xla")
    assert_close(got, ref)
    # Head 1 of the reference equals an explicit strided-and-segment computation.
    p = np.asarray(jattn.attention_weights(q, k, mask=mask, segment_ids=seg))[:, 1]
    j = np.arange(14)
    vis = (j[None, :] % 2 == 0) & (np.asarray(seg[0])[0][:, None] == np.asarray(seg[1])[0][None])
    assert np.all(p[:, ~vis] == 0)
    assert_close(p.sum(-1), np.ones((2, 10)))


BAD_CALLS = [
    (dict(q=(2, 8, 4)), ValueError, r"q must have shape \[B, Tq, Hq, Dk\]"),
    (dict(k=(2, 8, 2, 6)), ValueError, r"k must have shape \[B, Tk, Hkv, Dk=8\]"),
    (dict(q=(2, 8, 3, 8)), ValueError, r"Hq=3 .* divisible by Hkv=2"),
    (dict(v=(2, 9, 2, 8)), ValueError, r"v must have shape \[B, Tk=8, Hkv, Dv\]"),
    (dict(normalizer="softmax2"), ValueError, r"normalizer must be one of"),
    (dict(mask=np.ones((8, 7), bool)), ValueError, r"mask must have shape \[B=2, Hq=4, Tq=8"),
    (dict(mask=np.ones((8, 8))), TypeError, r"mask must be a bool array"),
    (dict(bias=np.ones((3, 8, 8), np.float32)), ValueError, r"bias must have shape"),
    (dict(sinks=np.ones(2, np.float32)), ValueError, r"sinks must have shape \[Hq=4\]"),
    (dict(sinks=np.ones(4, np.float32), normalizer="relu"), ValueError, r"sinks need"),
    (dict(segment_ids=np.zeros((2, 7), np.int32)), ValueError, r"segment_ids .* \[B=2, T=8\]"),
    (dict(implementation="cuda"), ValueError, r"implementation must be None or one of"),
    (dict(mask=M.neighborhood((4, 4), 3)), ValueError, r"q_len = kv_len = 16"),
    (dict(mask=M.per_head([M.causal()] * 3)), ValueError, r"per-head mask has 3 heads"),
    (dict(logits_soft_cap=-1.0), ValueError, r"logits_soft_cap must be a positive"),
    (dict(return_lse=True, normalizer="sigmoid"), ValueError, r"return_lse needs"),
    (dict(q=(2, 8, 4, 8), qdtype=jnp.int32), TypeError, r"q must be a floating-point"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_inputs_name_the_argument(call, exc, match):
    call = dict(call)
    shapes = {"q": (2, 8, 4, 8), "k": (2, 8, 2, 8), "v": (2, 8, 2, 8)}
    qdtype = call.pop("qdtype", jnp.float32)
    for n in shapes:
        shapes[n] = call.pop(n, shapes[n])
    q = jnp.ones(shapes["q"], qdtype)
    k, v = jnp.ones(shapes["k"]), jnp.ones(shapes["v"])
    with pytest.raises(exc, match=match):
        jattn.attention(q, k, v, **call)


def test_explicit_pallas_request_raises_or_runs():
    q, k, v = qkv(8, tq=8, tk=8)
    try:
        out = jattn.attention(q, k, v, mask=M.causal(), implementation="pallas")
    except NotImplementedError as e:
        assert "pallas" in str(e).lower() or "kernel" in str(e).lower()
    else:
        assert_close(out, jattn.attention(q, k, v, mask=M.causal(), implementation="reference"))
    # relu is never a Pallas feature: explicit requests say so, None falls back to xla.
    with pytest.raises(NotImplementedError):
        jattn.attention(q, k, v, normalizer="relu", implementation="pallas")
    assert jattn.attention(q, k, v, normalizer="relu").shape == (2, 8, 4, 8)
