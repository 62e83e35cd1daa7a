"""pallas_kernels.chunk_dplr_delta_rule (interpret mode) against the reference scan: outputs,
final state and gradients of q, k, v, a, b, g and the initial state, with and without
``segment_ids``; scalar, per-channel and no gates; T not a multiple of the chunk; fp32 and
bf16; both sequential drivers; cross-lowering for TPU and CUDA; and ``implementation=None``
picking the kernel on an accelerator.

Each case compiles ONE jitted function holding kernel and oracle (value and grads), with
XLA's backend optimizations off: interpret-mode kernels are compile-bound on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
import pallas_kernels
from jattn.linear import _checks
from jattn.testing import assert_close
from tests.test_chunk_pallas import _custom_calls, _export, _loss, check, run_pair

F32 = jnp.float32
B, H = 2, 2
# row 0: restarts inside chunks and on a chunk edge (16); row 1: one restart
SEGMENTS = np.array([[0] * 5 + [1] * 11 + [2] * 3 + [3] * 2 + [4] * 24,
                     [7] * 30 + [2] * 15], np.int32)


def make(seed, t, kd, vd, gate, dtype=F32):
    """RWKV-7-like inputs: ``a = -icl * kh``, ``b = kh`` (unit ``kh``), unit keys."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, H, kd))
    k, kh = rng.standard_normal((2, B, t, H, kd))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    kh = kh / np.linalg.norm(kh, axis=-1, keepdims=True)
    a, b = -rng.uniform(0.1, 0.9, (B, t, H, 1)) * kh, kh
    v = rng.standard_normal((B, t, H, vd))
    shape = {"channel": (B, t, H, kd), "scalar": (B, t, H), None: None}[gate]
    g = None if shape is None else np.log(rng.uniform(0.3, 0.999, shape))
    s0 = rng.standard_normal((B, H, kd, vd))
    cast = lambda x, d=dtype: None if x is None else jnp.asarray(x, d)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(a), cast(b), cast(g, F32), cast(s0, F32)


CASES = [  # (id, T, K, V, chunk, gate, dtype, backend, segments)
    # backend="cuda" in interpret mode: K, V zero-padded to powers of two, V tiles.
    ("channel-seg-f32-gpu-pad", 45, 24, 40, 16, "channel", F32, "cuda", True),
    ("scalar-bf16-tpu-driver", 45, 16, 16, 32, "scalar", jnp.bfloat16, "tpu", False),
    ("nogate-seg-f32", 45, 16, 16, 16, None, F32, None, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dplr_kernel_matches_reference(case):
    _, t, kd, vd, chunk, gate, dtype, backend, segments = case
    q, k, v, a, b, g, s0 = make(1, t, kd, vd, gate, dtype)
    seg = jnp.asarray(SEGMENTS[:, :t]) if segments else None

    def kernel(q, k, v, a, b, g, s0):
        return pallas_kernels.chunk_dplr_delta_rule(
            q, k, v, a, b, g=g, initial_state=s0, output_final_state=True, chunk_size=chunk,
            segment_ids=seg, backend=backend)

    def oracle(q, k, v, a, b, g, s0):
        o, s = L.dplr_delta_rule(q, k, v, a, b, g=g, initial_state=s0, output_final_state=True,
                                 segment_ids=seg, implementation="reference")
        return o.astype(dtype), s

    names = "q k v a b g initial_state".split()
    args = (q, k, v, a, b, g, s0)
    if g is None:
        names.remove("g")
        kern, orac = (lambda *x, f=f: f(*x[:5], None, x[5]) for f in (kernel, oracle))
        args = (q, k, v, a, b, s0)
    else:
        kern, orac = kernel, oracle
    res = run_pair(kern, orac, args, tuple(range(len(args))))
    check(res, names, dtype)


def test_public_function_reaches_the_kernel(monkeypatch):
    """``implementation="pallas"`` calls the kernel; None picks it on an accelerator (and
    falls back to the chunk form when the kernel turns the call down)."""
    q, k, v, a, b, g, s0 = make(2, 20, 8, 8, "scalar")
    calls = []
    real = pallas_kernels.chunk_dplr_delta_rule

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pallas_kernels, "chunk_dplr_delta_rule", spy)
    kw = dict(g=g, initial_state=s0, output_final_state=True, chunk_size=16)
    o, s = L.dplr_delta_rule(q, k, v, a, b, implementation="pallas", **kw)
    assert len(calls) == 1 and calls[0]["chunk_size"] == 16
    ro, rs = L.dplr_delta_rule(q, k, v, a, b, implementation="reference", **kw)
    assert_close(o, ro, name="o")
    assert_close(s, rs, name="final_state")
    L.dplr_delta_rule(q, k, v, a, b, **kw)
    assert len(calls) == 1  # CPU: None runs the chunk form
    monkeypatch.setattr(_checks, "on_accelerator", lambda: True)
    L.dplr_delta_rule(q, k, v, a, b, **kw)
    assert len(calls) == 2  # accelerator: None picks the kernel
    o7, _ = L.dplr_delta_rule(q, k, v, a, b, **{**kw, "chunk_size": 8})  # not a multiple of 16
    assert_close(o7, ro, name="fallback to chunk")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_dplr_kernel_cross_lowers(platform):
    t, kd, vd, chunk = 100, 64, 64, 32
    bf = jnp.bfloat16
    x = jax.ShapeDtypeStruct((1, t, 2, kd), bf)
    v = jax.ShapeDtypeStruct((1, t, 2, vd), bf)
    gc = jax.ShapeDtypeStruct((1, t, 2, kd), F32)
    s0 = jax.ShapeDtypeStruct((1, 2, kd, vd), F32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def dplr(q, k, v, a, b, g, s0, seg):
        return pallas_kernels.chunk_dplr_delta_rule(
            q, k, v, a, b, g=g, initial_state=s0, segment_ids=seg, output_final_state=True,
            chunk_size=chunk, interpret=False, backend=platform)

    fn = jax.grad(lambda *a: _loss(*dplr(*a)), argnums=tuple(range(7)))
    text = _export(fn, (x, x, v, x, x, gc, s0, seg), platform)
    expected = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert expected in _custom_calls(text)
    # forward: 2 (UT) + 2 (backbone); backward: 3 (backbone) + 2 (UT)
    assert text.count(expected) >= 9, text.count(expected)
