"""pallas_kernels.chunk_gla / chunk_delta_rule: interpret mode vs an independent scan oracle.

Forward outputs, final states and gradients (q, k, v, g, beta, initial_state) through both
outputs and final state; T not a multiple of the chunk; weak, strong (-30 per step) and
constant -30 gates; scalar and per-channel gates; fp32 and bf16; both sequential drivers
(TPU grid+scratch, GPU/interpret fori) in interpret mode; cross-lowering for TPU and CUDA.

Each case compiles ONE jitted function holding kernel and oracle (value and grads), with
XLA's backend optimizations off: interpret-mode kernels are compile-bound on CPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels
from jattn.testing import assert_close

F32 = jnp.float32
B, H = 1, 2
_FAST = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------- oracle


def _per_channel(g, shape):
    if g is None:
        return jnp.zeros(shape, F32)
    g = g.astype(F32)
    return jnp.broadcast_to(g[..., None], shape) if g.ndim == 3 else g


def scan_gla(q, k, v, g, scale, s0):
    """S_t = exp(g_t)[:, None] S_{t-1} + k_t^T v_t;  o_t = scale q_t S_t (fp32 lax.scan)."""
    g = _per_channel(g, q.shape)

    def step(s, x):
        qt, kt, vt, gt = x
        s = jnp.exp(gt)[..., None] * s + kt[..., None] * vt[..., None, :]
        return s, scale * jnp.einsum("bhk,bhkv->bhv", qt, s)

    xs = [jnp.moveaxis(a.astype(F32), 1, 0) for a in (q, k, v, g)]
    s, o = jax.lax.scan(step, s0.astype(F32), xs)
    return jnp.moveaxis(o, 0, 1), s


def scan_delta(q, k, v, beta, g, scale, s0, l2norm=False):
    """S'_t = exp(g_t) S_{t-1}; S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t); o_t = scale q_t S_t."""
    q, k = q.astype(F32), k.astype(F32)
    if l2norm:
        q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
        k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
    g = _per_channel(g, q.shape)

    def step(s, x):
        qt, kt, vt, bt, gt = x
        s = jnp.exp(gt)[..., None] * s
        pred = jnp.einsum("bhk,bhkv->bhv", kt, s)
        s = s + bt[..., None, None] * kt[..., None] * (vt - pred)[..., None, :]
        return s, scale * jnp.einsum("bhk,bhkv->bhv", qt, s)

    xs = [jnp.moveaxis(a.astype(F32), 1, 0) for a in (q, k, v, beta, g)]
    s, o = jax.lax.scan(step, s0.astype(F32), xs)
    return jnp.moveaxis(o, 0, 1), s


# ----------------------------------------------------------------------------- inputs


def make(seed, t, kd, vd, gate, strength, dtype=F32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, H, kd))
    k = rng.standard_normal((B, t, H, kd)) / np.sqrt(kd)
    v = rng.standard_normal((B, t, H, vd))
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, t, H))))
    shape = {"channel": (B, t, H, kd), "scalar": (B, t, H), None: None}[gate]
    if shape is None:
        g = None
    elif strength == "const30":
        g = np.full(shape, -30.0)
    else:
        g = -strength * rng.uniform(size=shape)
    s0 = rng.standard_normal((B, H, kd, vd))
    cast = lambda x, d=dtype: None if x is None else jnp.asarray(x, d)
    return cast(q), cast(k), cast(v), cast(beta, F32), cast(g, F32), cast(s0, F32)


def _loss(o, s):
    o = o.astype(F32)
    return jnp.sum(o * jnp.sin(o)) + 0.3 * jnp.sum(s * jnp.cos(s))


def _value_and_grads(fn, args, argnums):
    def loss(*a):
        o, s = fn(*a)
        return _loss(o, s), (o, s)

    return jax.value_and_grad(loss, argnums=argnums, has_aux=True)


def run_pair(kernel, oracle, args, argnums):
    """Compile kernel and oracle (value + grads) in one jit; returns both results."""

    def both(*a):
        return (_value_and_grads(kernel, a, argnums)(*a), _value_and_grads(oracle, a, argnums)(*a))

    compiled = jax.jit(both).lower(*args).compile(compiler_options=_FAST)
    return compiled(*args)


def check(res, names, dtype):
    ((_, (o, s)), grads), ((_, (ro, rs)), rgrads) = res
    assert o.dtype == dtype and s.dtype == F32
    assert_close(o, ro, dtype=dtype, name="o")
    assert_close(s, rs, dtype=dtype, name="final_state")
    for name, a, e in zip(names, grads, rgrads, strict=True):
        assert a.dtype == e.dtype, name
        # bf16 gradients pass through bf16 matmuls twice: allow 3e-2 relative RMSE.
        rtol = 3e-2 if dtype == jnp.bfloat16 else None
        # dg is ~e^-30 under constant -30 gates: check it in relative terms only (no abs
        # floor), so exact-cancellation errors in the gate gradient cannot hide.
        atol = 0.0 if name == "g" else None
        assert_close(a, e, dtype=dtype, rtol=rtol, atol=atol, name="d" + name)


# ----------------------------------------------------------------------------- GLA

GLA_CASES = [  # (id, T, K, V, chunk, gate, strength, dtype, backend)
    # per-channel log-gates uniform in [-30, 0]: weak and strong channels side by side;
    # backend="cuda" in interpret mode: K, V zero-padded to 32, 64 (Triton pow2 blocks), V tiles.
    ("channel-mixed30-f32-gpu-pad", 45, 24, 40, 32, "channel", 30.0, F32, "cuda"),
    ("scalar-const30-bf16-tpu-driver", 37, 16, 16, 16, "scalar", "const30", jnp.bfloat16, "tpu"),
]


@pytest.mark.parametrize("case", GLA_CASES, ids=[c[0] for c in GLA_CASES])
def test_gla_matches_scan(case):
    _, t, kd, vd, chunk, gate, strength, dtype, backend = case
    q, k, v, _, g, s0 = make(1, t, kd, vd, gate, strength, dtype)
    scale = kd**-0.5

    def kernel(q, k, v, g, s0):
        return pallas_kernels.chunk_gla(
            q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk, backend=backend
        )

    def oracle(q, k, v, g, s0):
        o, s = scan_gla(q, k, v, g, scale, s0)
        return o.astype(dtype), s

    res = run_pair(kernel, oracle, (q, k, v, g, s0), argnums=(0, 1, 2, 3, 4))
    check(res, ["q", "k", "v", "g", "initial_state"], dtype)


# ----------------------------------------------------------------------------- delta rule

DELTA_CASES = [  # (id, T, K, V, chunk, gate, strength, dtype, l2norm, backend)
    ("deltanet-f32", 33, 16, 32, 16, None, None, F32, False, None),
    ("gated-weak-l2norm-bf16-gpu-pad", 40, 20, 16, 16, "scalar", 0.1, jnp.bfloat16, True, "cuda"),
    ("kda-mixed30-l2norm-f32-tpu-driver", 37, 16, 16, 32, "channel", 30.0, F32, True, "tpu"),
]


@pytest.mark.parametrize("case", DELTA_CASES, ids=[c[0] for c in DELTA_CASES])
def test_delta_rule_matches_scan(case):
    _, t, kd, vd, chunk, gate, strength, dtype, l2n, backend = case
    q, k, v, beta, g, s0 = make(2, t, kd, vd, gate, strength, dtype)
    scale = kd**-0.5

    def kernel(q, k, v, beta, g, s0):
        return pallas_kernels.chunk_delta_rule(
            q, k, v, beta, g=g, initial_state=s0, output_final_state=True, use_qk_l2norm=l2n,
            chunk_size=chunk, backend=backend)

    def oracle(q, k, v, beta, g, s0):
        o, s = scan_delta(q, k, v, beta, g, scale, s0, l2norm=l2n)
        return o.astype(dtype), s

    if g is None:
        args, argnums, names = (q, k, v, beta, s0), (0, 1, 2, 3, 4), "q k v beta initial_state"
        kern = lambda q, k, v, beta, s0: kernel(q, k, v, beta, None, s0)
        orac = lambda q, k, v, beta, s0: oracle(q, k, v, beta, None, s0)
    else:
        args, argnums = (q, k, v, beta, g, s0), (0, 1, 2, 3, 4, 5)
        names, kern, orac = "q k v beta g initial_state", kernel, oracle
    res = run_pair(kern, orac, args, argnums)
    check(res, names.split(), dtype)


# ----------------------------------------------------------------------------- semantics


def test_padding_leaves_state_unchanged_and_no_final_state_by_default():
    q, k, v, beta, g, s0 = make(3, 20, 16, 16, "channel", 0.5)
    o, s = jax.eval_shape(lambda *a: pallas_kernels.chunk_gla(*a, chunk_size=16), q, k, v, g)
    assert s is None and o.shape == (B, 20, H, 16)
    # With zero inputs the state only decays: the padding steps (T=20 -> 32) must not decay it.
    z = jnp.zeros_like(q)

    def fn(beta, g, s0):
        return pallas_kernels.chunk_delta_rule(
            z,
            z,
            jnp.zeros_like(v),
            beta,
            g=g,
            initial_state=s0,
            output_final_state=True,
            chunk_size=16,
        )[1]

    s1 = jax.jit(fn).lower(beta, g[..., 0], s0).compile(compiler_options=_FAST)(beta, g[..., 0], s0)
    expect = s0 * jnp.exp(jnp.sum(g[..., 0], axis=1))[..., None, None]
    assert_close(s1, expect, name="decayed state")


def test_bad_inputs():
    q, k, v, beta, g, s0 = make(4, 8, 16, 16, "channel", 0.5)
    with pytest.raises(ValueError, match="g must be"):
        pallas_kernels.chunk_gla(q, k, v, g[..., :3])
    with pytest.raises(ValueError, match="initial_state"):
        pallas_kernels.chunk_gla(q, k, v, g, initial_state=s0[:, :1])
    with pytest.raises(ValueError, match="beta"):
        pallas_kernels.chunk_delta_rule(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="backend"):
        pallas_kernels.chunk_gla(q, k, v, g, backend="metal")
    with pytest.raises(NotImplementedError, match="chunk_size"):
        pallas_kernels.chunk_gla(q, k, v, g, chunk_size=24)
    with pytest.raises(NotImplementedError, match="power-of-two"):
        pallas_kernels.chunk_gla(q, k, v, g, chunk_size=48, backend="cuda")


def test_dispatch_via_jattn_linear():
    """jattn.linear.*(implementation="pallas") reaches these kernels and agrees with its
    own reference scan."""
    import jattn.linear as L

    q, k, v, beta, g, s0 = make(5, 33, 16, 16, "scalar", 1.0)
    kw = dict(initial_state=s0, output_final_state=True, chunk_size=16)

    def both(q, k, v, beta, g):
        out = {}
        for impl in ("pallas", "reference"):
            out[impl] = (
                L.gla(q, k, v, g, implementation=impl, **kw),
                L.delta_rule(q, k, v, beta, g=g, use_qk_l2norm=True, implementation=impl, **kw),
            )
        return out

    args = (q, k, v, beta, g)
    out = jax.jit(both).lower(*args).compile(compiler_options=_FAST)(*args)
    for i, name in enumerate(["gla", "delta_rule"]):
        (o, s), (ro, rs) = out["pallas"][i], out["reference"][i]
        assert_close(o, ro, name=name + " o")
        assert_close(s, rs, name=name + " state")


# ----------------------------------------------------------------------------- lowering

_GPU_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call", "mosaic_gpu", "mosaic_gpu_v2")


def _export(fn, args, platform):
    disabled = [export.DisabledSafetyCheck.custom_call(n) for n in _GPU_CALLS]
    exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=disabled)(*args)
    return exp.mlir_module()


def _custom_calls(text):
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text)
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_cross_lowering(platform):
    t, kd, vd, chunk = 100, 128, 128, 64
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((B, t, H, kd), bf)
    v = jax.ShapeDtypeStruct((B, t, H, vd), bf)
    gc = jax.ShapeDtypeStruct((B, t, H, kd), F32)
    gs = jax.ShapeDtypeStruct((B, t, H), F32)
    s0 = jax.ShapeDtypeStruct((B, H, kd, vd), F32)
    kw = dict(output_final_state=True, chunk_size=chunk, interpret=False, backend=platform)

    def gla(q, k, v, g, s0):
        return pallas_kernels.chunk_gla(q, k, v, g, initial_state=s0, **kw)

    def delta(q, k, v, beta, g, s0):
        return pallas_kernels.chunk_delta_rule(q, k, v, beta, g=g, initial_state=s0, **kw)

    def grads(fn, n):
        return jax.grad(lambda *a: _loss(*fn(*a)), argnums=tuple(range(n)))

    expected = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    for name, fn, args in [
        ("gla fwd", gla, (q, q, v, gc, s0)),
        ("gla fwd+bwd", grads(gla, 5), (q, q, v, gs, s0)),
        ("delta fwd", delta, (q, q, v, gs, gc, s0)),
        ("delta fwd+bwd", grads(delta, 6), (q, q, v, gs, gs, s0)),
        (
            "deltanet fwd+bwd",
            grads(lambda q, k, v, b, s0: delta(q, k, v, b, None, s0), 5),
            (q, q, v, gs, s0),
        ),
    ]:
        text = _export(fn, args, platform)
        calls = _custom_calls(text)
        assert expected in calls, (name, calls)
        # forward: 2 kernels; + backward: 2 (GLA) or 3 (delta rule) more.
        n_kernels = text.count(expected)
        assert n_kernels >= (2 if "bwd" not in name else 4), (name, n_kernels)


@pytest.mark.slow
@pytest.mark.parametrize("mech", ["gla", "delta"])
def test_chunk64_larger(mech):
    """Default chunk (4 sub-blocks: every off-diagonal reference row), K=V=64, T=300, mixed
    weak/strong per-channel gates, both drivers."""
    q, k, v, beta, g, s0 = make(6, 300, 64, 64, "channel", 8.0)
    scale = 64**-0.5
    for backend in (None, "tpu"):
        if mech == "gla":
            kern = lambda q, k, v, g, s0, backend=backend: pallas_kernels.chunk_gla(
                q, k, v, g, initial_state=s0, output_final_state=True, backend=backend
            )
            orac = lambda q, k, v, g, s0: scan_gla(q, k, v, g, scale, s0)
            args, names = (q, k, v, g, s0), "q k v g initial_state"
        else:
            kern = lambda q, k, v, beta, g, s0, backend=backend: pallas_kernels.chunk_delta_rule(
                q, k, v, beta, g=g, initial_state=s0, output_final_state=True, backend=backend
            )
            orac = lambda q, k, v, beta, g, s0: scan_delta(q, k, v, beta, g, scale, s0)
            args, names = (q, k, v, beta, g, s0), "q k v beta g initial_state"
        res = run_pair(kern, orac, args, tuple(range(len(args))))
        check(res, names.split(), F32)
