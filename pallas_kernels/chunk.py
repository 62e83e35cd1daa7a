"""Chunked gated linear attention and delta rule as Pallas kernels (forward and backward).

Layout ``[B, T, H, D]``; recurrent state ``S [B, H, K, V]`` in fp32; gates are log-decays
``g <= 0``, either scalar per head ``[B, T, H]`` or per key channel ``[B, T, H, K]``.

* ``chunk_gla`` -- Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention
  Transformers with Hardware-Efficient Training", arXiv:2312.06635); scalar gates give
  RetNet / Lightning-attention / Mamba2-style decay:

      S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

* ``chunk_delta_rule`` -- DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with
  the Delta Rule over Sequence Length", arXiv:2406.06484), Gated DeltaNet (Yang et al. 2025,
  arXiv:2412.06464) with a scalar gate, Kimi Delta Attention (per-channel gate):

      S'_t = exp(g_t) * S_{t-1};  S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t);  o_t = scale q_t S_t

Chunk form (as flash-linear-attention). Time is cut into chunks of ``C`` steps; ``G`` is the
cumulative log-gate from the chunk start (a ``cumsum`` in the wrapper). A shared backbone
(``_chunk_kernels``) computes the chunk-boundary states sequentially (one Pallas kernel, fp32
state) and the outputs in parallel (second kernel: inter-chunk ``(q e^G) h_c`` plus the
intra-chunk gated attention matrix). The delta rule first applies the WY / UT transform per
chunk, two more kernels: ``A^kk_jl = sum_d k_jd k_ld e^{G_jd - G_ld}`` (``l < j``), then
``Y = (I + diag(beta) A^kk)^-T`` by forward substitution and ``u = Y^T diag(beta) v``,
``w = Y^T diag(beta) (k e^G)``; the backbone then runs with ``delta = u - w h_c`` in place of
``v``. Backward (custom VJPs): the reverse state recurrence ``dh`` is a sequential kernel
(for the delta rule fed by a parallel ``A^T do`` kernel), then dq/dk/dv/dG in parallel; the
UT transform's backward is two parallel kernels (``dA`` through the inverse, then the gated
Gram's ``dk, dG``). ``dg`` follows from JAX's VJP of the within-chunk cumsum and of the
scalar->channel broadcast. Only layout glue (padding, ``[B,T,H,D] <-> [B*H,T,D]``, per-chunk
transposes) and the cumsum are ``jnp``. Gradients flow through outputs and the final state,
to q, k, v, g, beta and ``initial_state``.

Gates: ``g = -inf`` (a full reset, decay 0) is valid: the wrapper clamps log-gates at
``LOG_DECAY_FLOOR`` (-110) before the within-chunk cumsum, so ``G`` stays finite (else every
``G_i - G_j`` behind a reset is ``-inf - (-inf) = NaN``); ``exp(-110)`` is 0 in fp32, so
no value changes, and the clamp's gradient to ``g`` there is 0, as the exact one is. A
concrete ``g`` with an entry > 0 or NaN raises ``ValueError`` (the kernels clamp exponents to
``<= 0``, so positive gates would be silently wrong); traced positive gates are undefined
behaviour. ``B``, ``T``, ``H`` or ``V`` = 0: empty outputs and the initial state, no kernel
launch; ``K = 0``: ``ValueError``.

Numerics: exponents are never positive. Inter-chunk factors are ``exp(G_i)`` and
``exp(G_last - G_i)`` relative to the chunk start; intra-chunk pairs ``exp(G_i - G_j)``
(``i >= j``) are formed per sub-block of 16 rows through a reference row between the two
sub-blocks, or elementwise (clamped, masked) inside a diagonal sub-block, so a decay of
``g = -30`` per step stays finite and exact. Matmul operands are in the input dtype (bf16
inputs -> bf16 MXU / tensor-core matmuls) with fp32 accumulation; the state is fp32.

Backends (``backend``): ``None`` = the platform the call runs on; ``"tpu"`` (Mosaic TPU:
chunk index as an "arbitrary" grid axis, state in VMEM scratch); ``"cuda"``/``"gpu"`` (the
Triton lowering, selected by passing ``jax.experimental.pallas.triton.CompilerParams``; one
program per (b, h) loops over chunks). ``interpret=None`` interprets on CPU. A CPU host can
export for either accelerator with ``jax.export``; the module then holds ``tpu_custom_call``
or, for CUDA, ``__gpu$xla.gpu.triton`` custom calls (jax 0.10.2; older jax named it
``triton_kernel_call``), whose safety check must be disabled
(``jax.export.DisabledSafetyCheck.custom_call(name)``). JAX versions: written against and
tested with jax 0.10.2 (CPU interpret mode; TPU and CUDA cross-lowering), within the
project's pinned range ``>=0.10.2,<0.12``; it uses only long-stable Pallas API
(``pl.BlockSpec``, ``pl.ds``, ``pl.program_id``, ``pl.when``, ``pltpu.CompilerParams``,
``pltpu.VMEM``, ``jax.experimental.pallas.triton.CompilerParams``).
On GPU, K and V are zero-padded to powers of two >= 16 (Triton block shapes); ``chunk_size``
must be a multiple of 16 (sub-blocks; on TPU also the bf16 sublane tiling) and, on GPU, a
power of two.

Costs: scalar gates are broadcast to ``[.., K]`` arrays (one data layout), but the kernels
know the gate kind statically: for scalar (or no) gates the intra-chunk products are single
masked matmuls times a ``[C, C]`` decay; only per-channel gates pay the sub-blocked Gram.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _chunk_kernels as ck

F32 = jnp.float32
_SUB = 16
# Log-gates are clamped at this floor (see the module docstring): exp(-110) == 0 in fp32.
LOG_DECAY_FLOOR = -110.0

__all__ = ["chunk_gla", "chunk_delta_rule"]


# ----------------------------------------------------------------------------- plumbing


def _target(interpret, backend):
    platform = jax.default_backend()
    if backend is None:
        target = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "cpu")
    else:
        name = str(backend).lower()
        if name in ("gpu", "cuda"):
            target = "gpu"
        elif name == "tpu":
            target = "tpu"
        else:
            raise ValueError(f"backend must be None, 'tpu', 'cuda' or 'gpu'; got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    return target, bool(interpret)


def _check_chunk_for(target, chunk_size):
    if target == "gpu" and chunk_size & (chunk_size - 1):
        raise NotImplementedError(
            f"pallas chunk kernels on GPU (Triton) need a power-of-two chunk_size; got {chunk_size}"
        )


def _addressable(x):
    return getattr(x, "is_fully_addressable", True)


def _check(q, k, v, g, initial_state, chunk_size):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D]; got shape {x.shape}")
    b, t, h, kd = q.shape
    if kd == 0:
        raise ValueError(f"q and k must have a head dim K >= 1; got shape {q.shape}")
    if k.shape != (b, t, h, kd):
        raise ValueError(f"k must have shape {(b, t, h, kd)} like q; got {k.shape}")
    if v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B, T, H, V] = {(b, t, h)} + (V,); got {v.shape}")
    if g is not None and g.shape not in ((b, t, h), (b, t, h, kd)):
        raise ValueError(f"g must be [B, T, H] = {(b, t, h)} or [B, T, H, K]; got {g.shape}")
    vd = v.shape[-1]
    if initial_state is not None and initial_state.shape != (b, h, kd, vd):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = {(b, h, kd, vd)}; got {initial_state.shape}"
        )
    # Traced (or spread over hosts): values unknown, not checked (documented as UB).
    if g is not None and not isinstance(g, jax.core.Tracer) and _addressable(g):
        with jax.ensure_compile_time_eval():  # concrete values inside a jit trace too
            num_bad = int(jnp.sum(~(jnp.asarray(g) <= 0)))  # NaN fails `<= 0` too
            if num_bad:
                raise ValueError(
                    f"g is a log-decay and must be <= 0 everywhere (-inf: full reset), got "
                    f"{num_bad} {'entry' if num_bad == 1 else 'entries'} > 0 or NaN "
                    f"(max {float(jnp.max(g))}); the kernels do not support decays exp(g) > 1"
                )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if chunk_size % _SUB:
        raise NotImplementedError(
            f"pallas chunk kernels need chunk_size a multiple of {_SUB}; got {chunk_size}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point; got {x.dtype}")


def _to_bh(x, t_pad):
    """[B, T, H, D] -> [B*H, T_pad, D] (zero padding at the end of time)."""
    b, t, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t_pad, d)


def _from_bh(x, b, h, t):
    return jnp.transpose(x.reshape(b, h, -1, x.shape[-1])[:, :, :t], (0, 2, 1, 3))


def _gates(g, shape_bthk, t_pad, chunk):
    """Log-gates -> within-chunk cumulative ``G`` [B*H, T_pad, K] fp32 (0 in the padding)."""
    b, t, h, kd = shape_bthk
    if g is None:
        g = jnp.zeros((b, t, h, kd), F32)
    g = jnp.maximum(g.astype(F32), LOG_DECAY_FLOOR)  # -inf (reset): finite cumsums, same values
    if g.ndim == 3:
        g = jnp.broadcast_to(g[..., None], (b, t, h, kd))
    g = _to_bh(g, t_pad)
    g = g.reshape(b * h, t_pad // chunk, chunk, kd)
    return jnp.cumsum(g, axis=2).reshape(b * h, t_pad, kd)


def _state_in(initial_state, b, h, kd, vd):
    if initial_state is None:
        return jnp.zeros((b * h, vd, kd), F32)
    return jnp.swapaxes(initial_state.astype(F32), -1, -2).reshape(b * h, vd, kd)


def _state_out(h_t, b, h, kd, vd):
    return jnp.swapaxes(h_t[:, :vd, :kd].reshape(b, h, vd, kd), -1, -2)


def _empty_result(initial_state, shape_bthk, vd, dtype, output_final_state):
    """``B``, ``T``, ``H`` or ``V`` = 0 (nothing to launch): empty ``o`` and the initial state
    (differentiable: its cotangent passes straight through) as the final state."""
    b, t, h, kd = shape_bthk
    o = jnp.zeros((b, t, h, vd), dtype)
    if not output_final_state:
        return o, None
    if initial_state is None:
        return o, jnp.zeros((b, h, kd, vd), F32)
    return o, initial_state.astype(F32)


def _feature_pad(target, *dims):
    """Triton block shapes are powers of two (>= 16 for ``tl.dot``): on GPU, zero-pad K and V
    (zero q/k/v channels, zero gate, zero state rows: the padded channels stay exactly 0)."""
    if target != "gpu":
        return dims
    return tuple(max(16, 1 << (d - 1).bit_length()) for d in dims)


def _pad_last(x, size, axis=-1, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode) if size != x.shape[axis] else x


def _padded_inputs(q, k, v, g, t_pad, chunk, dt, kp, vp):
    """[B*H, T_pad, D] views, feature dims padded to (kp, vp). Gates pad by edge replication
    so that scalar gates stay equal across K (the kernels rely on it); padded channels have
    q = k = 0 and zero state rows, so their gate value is irrelevant."""
    b, t, h, kd = q.shape
    qb = _pad_last(_to_bh(q.astype(dt), t_pad), kp)
    kb = _pad_last(_to_bh(k.astype(dt), t_pad), kp)
    gb = _pad_last(_gates(g, (b, t, h, kd), t_pad, chunk), kp, mode="edge")
    vb = _pad_last(_to_bh(v.astype(dt), t_pad), vp)
    return qb, kb, vb, gb


# ----------------------------------------------------------------------------- public


def chunk_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    interpret: bool | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Chunked gated linear attention (GLA / RetNet-style decay), Pallas forward and backward.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: log-decay ``<= 0`` (``-inf``: full reset), ``[B, T, H]`` (scalar per head) or
        ``[B, T, H, K]``; a concrete entry > 0 or NaN raises ``ValueError``.
      scale: query scale, default ``1/sqrt(K)``.
      initial_state: ``[B, H, K, V]`` or None (zeros).
      output_final_state: also return ``S_T`` ``[B, H, K, V]`` (fp32).
      chunk_size: chunk length ``C`` (a multiple of 16, else ``NotImplementedError``); any
        ``T`` is padded to a multiple of ``C``.

    Returns ``(o [B, T, H, V] in the inputs' dtype, S_T or None)`` with
    ``S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t`` and ``o_t = scale * q_t S_t``.
    """
    _check(q, k, v, g, initial_state, chunk_size)
    if g is None:
        raise ValueError("g is required for chunk_gla (use zeros for plain linear attention)")
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    cfg = _config(t, kd, g, scale, chunk_size, interpret, backend)
    target = cfg.target
    t_pad = -(-t // chunk_size) * chunk_size
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if 0 in (b, t, h, vd):
        return _empty_result(initial_state, q.shape, vd, dt, output_final_state)
    kp, vp = _feature_pad(target, kd, vd)
    qb, kb, vb, gb = _padded_inputs(q, k, v, g, t_pad, chunk_size, dt, kp, vp)
    h0 = _pad_last(_pad_last(_state_in(initial_state, b, h, kd, vd), kp), vp, axis=1)
    o, h_t = ck.backbone(qb, kb, vb, None, gb, h0, cfg)
    o = _from_bh(o[..., :vd], b, h, t)
    return o, (_state_out(h_t, b, h, kd, vd) if output_final_state else None)


def _gate_kind(g):
    return "none" if g is None else ("scalar" if g.ndim == 3 else "channel")


def _l2norm(x, eps=1e-6):
    x32 = x.astype(F32)
    return (x32 * lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _config(t, kd, g, scale, chunk_size, interpret, backend) -> ck.Config:
    """The static kernel configuration shared by chunk_gla and chunk_delta_rule."""
    target, interp = _target(interpret, backend)
    _check_chunk_for(target, chunk_size)
    return ck.Config(
        scale=float(1.0 / math.sqrt(kd) if scale is None else scale),
        chunk=chunk_size,
        sub=_SUB,
        target=target,
        interpret=interp,
        t_real=t,
        gate=_gate_kind(g),
    )


def chunk_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    interpret: bool | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Chunked (gated) delta rule: DeltaNet, Gated DeltaNet, Kimi Delta Attention.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` in (0, 1).
      g: None (DeltaNet), ``[B, T, H]`` (Gated DeltaNet) or ``[B, T, H, K]`` (KDA),
        log-decay ``<= 0`` (``-inf``: full reset; a concrete entry > 0 or NaN raises).
      scale: default ``1/sqrt(K)``. initial_state: ``[B, H, K, V]`` or None.
      use_qk_l2norm: L2-normalize q and k over the head dim first.
      chunk_size: a multiple of 16; any ``T`` (padded steps have beta = 0, g = 0).

    Returns ``(o [B, T, H, V], S_T or None)`` with ``S'_t = exp(g_t) S_{t-1}``,
    ``S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t)``, ``o_t = scale q_t S_t``.
    """
    _check(q, k, v, g, initial_state, chunk_size)
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be [B, T, H] = {(b, t, h)}; got {beta.shape}")
    cfg = _config(t, kd, g, scale, chunk_size, interpret, backend)
    target = cfg.target
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if 0 in (b, t, h, vd):
        return _empty_result(initial_state, q.shape, vd, dt, output_final_state)
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    t_pad = -(-t // chunk_size) * chunk_size
    kp, vp = _feature_pad(target, kd, vd)
    qb, kb, vb, gb = _padded_inputs(q, k, v, g, t_pad, chunk_size, dt, kp, vp)
    h0 = _pad_last(_pad_last(_state_in(initial_state, b, h, kd, vd), kp), vp, axis=1)
    betab = _to_bh(beta.astype(F32)[..., None], t_pad)  # [BH, T, 1]; 0 on padded steps
    u, w = ck.wy(kb, vb, betab, gb, cfg)
    o, h_t = ck.backbone(qb, kb, u, w, gb, h0, cfg)
    o = _from_bh(o[..., :vd], b, h, t)
    return o, (_state_out(h_t, b, h, kd, vd) if output_final_state else None)
