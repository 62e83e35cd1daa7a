"""Packed sequences in the Pallas chunk kernels (interpret mode): ``segment_ids`` through
``jattn.linear`` with ``implementation="pallas"`` equals running each segment separately,
forward (outputs, final state) and gradients of every input; moving the boundaries does not
recompile; the segmented kernels cross-lower for TPU and CUDA.

Each case compiles one jitted function (kernel and oracle together) with XLA's backend
optimizations off: interpret-mode kernels are compile-bound on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
import pallas_kernels
from jattn.testing import assert_close
from tests.linear_runners import runners
from tests.test_chunk_pallas import _custom_calls, _export, _loss
from tests.test_linear_packing import SEGMENTS, B, T, inputs, run_separately

_FAST = {"xla_backend_optimization_level": 0}
CHUNK = 16  # the kernels' minimum: T = 40 spans 3 chunks, boundaries inside and on edges


_gla, _delta, _dplr, _linear = runners(CHUNK)


CASES = {  # name -> (function, gate kind)
    "gla_channel": (_gla, "channel"),
    "gla_scalar": (_gla, "scalar"),
    "deltanet": (_delta, None),
    "kda": (_delta, "channel"),
    "linear_relu": (_linear, None),
}


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=_FAST)(*args)


def _assert_runs_the_kernel(fn, *args):
    """The packed call really reaches a Pallas kernel: a silent fallback to the chunked XLA
    form would also equal the separate runs."""
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*args)), "fell back to the XLA form"


@pytest.mark.parametrize("case", sorted(CASES))
def test_pallas_packed_equals_separate_runs(case):
    fn, gate = CASES[case]
    x, S0 = inputs(0, gate)
    seg = jnp.asarray(SEGMENTS)
    _assert_runs_the_kernel(lambda x, S0, seg: fn(x, S0, seg, "pallas"), x, S0, seg)
    (o, S), (o_sep, S_sep) = _compiled(
        lambda x, S0, seg: (fn(x, S0, seg, "pallas"), run_separately(fn, x, S0, SEGMENTS)),
        x, S0, seg)
    assert_close(o, o_sep, name="o")
    for got, want in zip(jax.tree.leaves(S), jax.tree.leaves(S_sep), strict=True):
        assert_close(got, want, name="final_state")


@pytest.mark.parametrize("case", ["gla_channel", "kda", "deltanet"])
def test_pallas_packed_gradients_equal_separate_runs(case):
    """Gradients of q, k, v, g, beta and the initial state through outputs and final state."""
    fn, gate = CASES[case]
    x, S0 = inputs(3, gate)
    seg = jnp.asarray(SEGMENTS)
    names = [n for n in ("q", "k", "v", "g", "beta") if x[n] is not None]
    if fn is _gla:
        names.remove("beta")

    def grads(vals, S0):
        def loss(vals, S0, packed):
            xs = {**x, **dict(zip(names, vals, strict=True))}
            o, S = fn(xs, S0, seg, "pallas") if packed else run_separately(fn, xs, S0, SEGMENTS)
            return _loss(o, S)

        return [jax.grad(loss, argnums=(0, 1))(vals, S0, packed) for packed in (True, False)]

    _assert_runs_the_kernel(lambda x, S0: fn(x, S0, seg, "pallas"), x, S0)
    (got, dS0), (want, dS0_w) = _compiled(grads, [x[n] for n in names], S0)
    for name, a, b in zip(names, got, want, strict=True):
        assert_close(a, b, name=f"d{name}")
    assert_close(dS0, dS0_w, name="dS0")


def test_pallas_delta_product_packed():
    """DeltaProduct reaches the delta kernel on the interleaved sequence, segments repeated."""
    rng = np.random.default_rng(7)
    n, t = 2, 20
    q = jnp.asarray(rng.standard_normal((B, t, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, t * n, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, t * n, 2, 8)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (B, t * n, 2)), jnp.float32)
    seg = jnp.asarray(SEGMENTS[:, :t])
    kw = dict(num_householder=n, use_qk_l2norm=True, output_final_state=True, chunk_size=CHUNK,
              segment_ids=seg)

    def both(q, k, v, beta):
        return [L.delta_product(q, k, v, beta, implementation=impl, **kw)
                for impl in ("pallas", "reference")]

    _assert_runs_the_kernel(lambda *a: both(*a)[0], q, k, v, beta)
    (o, S), (ro, rS) = _compiled(both, q, k, v, beta)
    assert_close(o, ro, name="o")
    assert_close(S, rS, name="final_state")


def test_moving_boundaries_does_not_recompile():
    x, S0 = inputs(4, "channel")
    f = jax.jit(lambda x, S0, seg: _delta(x, S0, seg, "pallas")[0])
    _assert_runs_the_kernel(f, x, S0, jnp.asarray(SEGMENTS))
    o1 = f(x, S0, jnp.asarray(SEGMENTS))
    shifted = np.roll(SEGMENTS, 5, axis=1)
    o2 = f(x, S0, jnp.asarray(shifted))
    assert f._cache_size() == 1
    assert_close(o2, run_separately(_delta, x, S0, shifted)[0], name="o after the move")
    assert not np.allclose(o1, o2)


def test_kernel_rejects_bad_segment_ids():
    x, _ = inputs(5, "channel")
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]"):
        pallas_kernels.chunk_gla(x["q"], x["k"], x["v"], x["g"],
                                 segment_ids=jnp.zeros((B, T - 1), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        pallas_kernels.chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"],
                                        segment_ids=jnp.zeros((B, T), jnp.float32))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_segmented_kernels_cross_lower(platform):
    t, kd, vd, chunk = 100, 128, 128, 64
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((1, t, 2, kd), bf)
    v = jax.ShapeDtypeStruct((1, t, 2, vd), bf)
    gc = jax.ShapeDtypeStruct((1, t, 2, kd), jnp.float32)
    gs = jax.ShapeDtypeStruct((1, t, 2), jnp.float32)
    s0 = jax.ShapeDtypeStruct((1, 2, kd, vd), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    kw = dict(output_final_state=True, chunk_size=chunk, interpret=False, backend=platform)

    def gla(q, k, v, g, s0, seg):
        return pallas_kernels.chunk_gla(q, k, v, g, initial_state=s0, segment_ids=seg, **kw)

    def delta(q, k, v, beta, g, s0, seg):
        return pallas_kernels.chunk_delta_rule(q, k, v, beta, g=g, initial_state=s0,
                                               segment_ids=seg, **kw)

    def grads(fn, n):
        return jax.grad(lambda *a: _loss(*fn(*a)), argnums=tuple(range(n)))

    expected = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    for name, fn, args in [
        ("gla fwd+bwd", grads(gla, 5), (q, q, v, gc, s0, seg)),
        ("kda fwd+bwd", grads(delta, 6), (q, q, v, gs, gc, s0, seg)),
    ]:
        text = _export(fn, args, platform)
        assert expected in _custom_calls(text), name
        assert text.count(expected) >= 4, name
