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

* ``chunk_dplr_delta_rule`` -- the diagonal-plus-low-rank transition of RWKV-7 (Peng et al.
  2025) and fla's ``dplr_delta_rule``: ``S_t = (diag(exp g_t) + a_t^T b_t) S_{t-1} +
  k_t^T v_t``. Its UT transform (``_chunk_dplr``: the delta rule's, generalised to ``a != b``
  with the read ``b_t S_{t-1}`` at the exclusive gate) yields the reads ``w_t`` per chunk;
  the same backbone then runs on the interleaved sequence (write ``a_t^T w_t``, then
  ``k_t^T v_t`` and the query), chunk ``2 C``.

Packed sequences (``segment_ids [B, T]``, every function): the wrapper turns the ids into
per-row counts of segment starts since the chunk's first row (``_chunk_wrap._segments``); each
kernel masks from them, exactly (no ``-inf`` gate): Gram pairs across segments, the entering
state for rows after a restart, the leaving state's writes from rows before the chunk's last
restart, and the decay of the entering state (0 when the chunk restarts). The ids are data:
moving the boundaries does not recompile.

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

Backends (``backend``): ``None`` = the platform the call runs on; ``"tpu"`` (Mosaic TPU: chunk
index as an "arbitrary" grid axis, state in VMEM scratch); ``"cuda"``/``"gpu"`` (the Triton
lowering, selected by passing ``jax.experimental.pallas.triton.CompilerParams``; one program
per (b, h, V tile[, K tile]) loops over chunks; outputs and gradients run one program per
chunk, see ``_chunk_common`` for every pass's grid). ``interpret=None`` interprets on CPU. A
CPU host can export for either accelerator with ``jax.export``; the module then holds
``tpu_custom_call`` or, for CUDA, ``__gpu$xla.gpu.triton`` custom calls (jax 0.10.2; older jax
named it ``triton_kernel_call``), whose safety check must be disabled
(``jax.export.DisabledSafetyCheck.custom_call(name)``). JAX versions: written against and
tested with jax 0.10.2 (CPU interpret mode; TPU and CUDA cross-lowering), within the project's
pinned range ``>=0.10.2,<0.12``; it uses only long-stable Pallas API (``pl.BlockSpec``,
``pl.ds``, ``pl.program_id``, ``pl.when``, ``pltpu.CompilerParams``, ``pltpu.VMEM``,
``jax.experimental.pallas.triton.CompilerParams``). On GPU, K and V are zero-padded to powers
of two >= 16 (Triton block shapes); ``chunk_size`` must be a multiple of 16 (sub-blocks; on TPU
also the bf16 sublane tiling) and, on GPU, a power of two.

Costs: scalar gates are broadcast to ``[.., K]`` arrays (one data layout), but the kernels
know the gate kind statically: for scalar (or no) gates the intra-chunk products are single
masked matmuls times a ``[C, C]`` decay; only per-channel gates pay the sub-blocked Gram.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _chunk_kernels as ck
from pallas_kernels._chunk_dplr import dplr_wy
from pallas_kernels._chunk_wrap import (
    F32,
    LOG_DECAY_FLOOR,  # noqa: F401  (re-exported)
    _check,
    _check_segments,
    _config,
    _empty_result,
    _l2norm,
    _layout,
    _outputs,
    _pad_last,
    _to_bh,
)

__all__ = ["chunk_gla", "chunk_delta_rule", "chunk_dplr_delta_rule"]


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
    segment_ids: jax.Array | None = None,
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
      segment_ids: None or int ``[B, T]``: packed sequences. The state restarts from zero
        wherever the id changes between ``t - 1`` and ``t``; ``initial_state`` is the first
        segment's, the final state the last segment's. In-chunk pairs across segments are
        masked (exact: no ``-inf`` gate); the ids are data, so moving them does not recompile.

    Returns ``(o [B, T, H, V] in the inputs' dtype, S_T or None)`` with
    ``S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t`` and ``o_t = scale * q_t S_t``.
    """
    _check(q, k, v, g, initial_state, chunk_size)
    if g is None:
        raise ValueError("g is required for chunk_gla (use zeros for plain linear attention)")
    b, t, h, kd = q.shape
    _check_segments(segment_ids, b, t)
    vd = v.shape[-1]
    cfg = _config(t, kd, g, scale, chunk_size, interpret, backend)
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if 0 in (b, t, h, vd):
        return _empty_result(initial_state, q.shape, vd, dt, output_final_state)
    x = _layout(q, k, v, g, initial_state, segment_ids, cfg, dt)
    o, h_t = ck.backbone(x.q, x.k, x.v, None, x.g, x.h0, x.seg, cfg)
    return _outputs(o, h_t, q.shape, vd, output_final_state)


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
    segment_ids: jax.Array | None = None,
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
      segment_ids: None or int ``[B, T]``: packed sequences, as in :func:`chunk_gla` (the UT
        transform's system is block-diagonal by segment inside a chunk).

    Returns ``(o [B, T, H, V], S_T or None)`` with ``S'_t = exp(g_t) S_{t-1}``,
    ``S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t)``, ``o_t = scale q_t S_t``.
    """
    _check(q, k, v, g, initial_state, chunk_size)
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be [B, T, H] = {(b, t, h)}; got {beta.shape}")
    _check_segments(segment_ids, b, t)
    cfg = _config(t, kd, g, scale, chunk_size, interpret, backend)
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if 0 in (b, t, h, vd):
        return _empty_result(initial_state, q.shape, vd, dt, output_final_state)
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    x = _layout(q, k, v, g, initial_state, segment_ids, cfg, dt)
    betab = _to_bh(beta.astype(F32)[..., None], x.t_pad)  # [BH, T, 1]; 0 on padded steps
    u, w = ck.wy(x.k, x.v, betab, x.g, x.seg, cfg)
    o, h_t = ck.backbone(x.q, x.k, u, w, x.g, x.h0, x.seg, cfg)
    return _outputs(o, h_t, q.shape, vd, output_final_state)


def chunk_dplr_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    segment_ids: jax.Array | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Chunked diagonal-plus-low-rank delta rule (RWKV-7's transition; Peng et al. 2025,
    "RWKV-7 'Goose' with Expressive Dynamic State Evolution"; fla's ``dplr_delta_rule``).

    ``S_t = (diag(exp g_t) + a_t^T b_t) S_{t-1} + k_t^T v_t``,  ``o_t = scale * q_t S_t``.

    The UT transform generalised to ``a != b`` (``_chunk_dplr``) gives, per chunk, the reads
    ``w_t = b_t S_{t-1}`` as ``u_t + Wk_t h_c``; the shared backbone then runs on the
    interleaved sequence of ``2 T`` steps (key ``a_t`` with value ``w_t``, then key ``k_t``
    with value ``v_t`` and query ``q_t``; both at the cumulative gate ``G_t``), chunk ``2 C``.

    Args:
      q, k, a, b: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: None (no decay), ``[B, T, H]`` or ``[B, T, H, K]`` log-decay ``<= 0`` (``-inf``:
        full reset; a concrete entry > 0 or NaN raises ``ValueError``).
      scale: default ``1/sqrt(K)``. initial_state: ``[B, H, K, V]`` or None.
      chunk_size: a multiple of 16 (GPU: a power of two); any ``T``.
      segment_ids: None or int ``[B, T]``: packed sequences, as in :func:`chunk_gla`.

    Returns ``(o [B, T, H, V] in the inputs' dtype, S_T [B, H, K, V] fp32 or None)``.
    Differentiable in q, k, v, a, b, g and ``initial_state``. Stability is the caller's (the
    transition's spectrum must stay in the unit disc).
    """
    _check(q, k, v, g, initial_state, chunk_size)
    bsz, t, h, kd = q.shape
    vd = v.shape[-1]
    for name, x in (("a", a), ("b", b)):
        if getattr(x, "shape", None) != (bsz, t, h, kd):
            raise ValueError(f"{name} must be [B, T, H, K] = {(bsz, t, h, kd)}; got "
                             f"{getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point; got {x.dtype}")
    _check_segments(segment_ids, bsz, t)
    cfg = _config(t, kd, g, scale, chunk_size, interpret, backend)
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype, a.dtype, b.dtype)
    if 0 in (bsz, t, h, vd):
        return _empty_result(initial_state, q.shape, vd, dt, output_final_state)
    t_pad, kp, qb, kb, vb, gb, h0, seg = _layout(q, k, v, g, initial_state, segment_ids, cfg, dt)
    ab = _pad_last(_to_bh(a.astype(dt), t_pad), kp)
    bb = _pad_last(_to_bh(b.astype(dt), t_pad), kp)
    # Exclusive cumulative gate G_{t-1} (0 on each chunk's first row): layout glue.
    gc = gb.reshape(bsz * h, t_pad // chunk_size, chunk_size, kp)
    gx = jnp.concatenate([jnp.zeros_like(gc[:, :, :1]), gc[:, :, :-1]], axis=2)
    gx = gx.reshape(gb.shape)
    u, w = dplr_wy(ab, bb, kb, vb, gb, gx, seg, cfg)

    def interleave(x, y):  # [BH, T, D] x2 -> [BH, 2T, D]: x on even, y on odd steps
        return jnp.stack([x, y], axis=2).reshape(x.shape[0], 2 * x.shape[1], x.shape[2])

    cfg2 = dataclasses.replace(cfg, chunk=2 * chunk_size, t_real=2 * t)
    o, h_t = ck.backbone(
        interleave(jnp.zeros_like(qb), qb),
        interleave(ab, kb),
        interleave(u, vb),
        interleave(w, jnp.zeros_like(w)),
        interleave(gb, gb),
        h0,
        None if seg is None else interleave(seg, seg),
        cfg2,
    )
    return _outputs(o[:, 1::2], h_t, q.shape, vd, output_final_state)
