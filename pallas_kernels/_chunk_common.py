"""Pallas kernels of the chunked linear-attention backbone: shared pieces (private; see
``chunk.py``). Config, matmul/gated-Gram helpers, compiler params and the parallel driver.

The passes live one per module, as in flash-linear-attention: ``_chunk_state`` (sequential
boundary states, forward and reverse), ``_chunk_output`` (parallel outputs and gradients),
``_chunk_wy`` (the delta rule's UT transform), ``_chunk_kernels`` (the backbone's custom VJP).

All arrays are flattened to ``[B*H, T_pad, D]`` (time-major inside a head) and the recurrent
state is carried TRANSPOSED, ``[V, K]`` in fp32, so that every per-key-channel gate acts along
the lane (last) dimension and no in-kernel transpose of a gate vector is ever needed.

Within one chunk of ``C`` steps, ``G`` is the inclusive cumulative sum of the log-gates from
the chunk start (``G <= 0``, non-increasing). The backbone, shared by GLA and the delta rule:

    delta = u - w h_c                         (GLA: w = 0, u = v)
    h_{c+1} = exp(G_last) * h_c + (k * exp(G_last - G))^T delta
    o = scale * [(q * exp(G)) h_c + A delta],  A_ij = sum_d q_id k_jd exp(G_id - G_jd), i >= j

``A`` is a *gated Gram* matrix. It cannot be factored as ``(q e^G)(k e^-G)^T`` because
``e^-G`` overflows under strong decay, so rows are processed in sub-blocks of ``s`` steps:
pairs in different sub-blocks factor through a reference row between them (every exponent
<= 0), pairs inside a diagonal sub-block are formed elementwise with the exponent clamped to
<= 0 and masked (``_gram``). Scalar gates (or none) skip this: the decay factors out of
the K sum, so ``A = (q k^T) * exp(min(G_i - G_j, 0))`` masked.

Kernels and grids (see ``_seq_call`` for the sequential drivers; N chunks):
* ``states_fwd``   (BH, V/BV, K/BK), chunks sequential inside: boundary states ``h_c`` (and
  ``delta``). GLA tiles K too (per-key decay, no contraction over K in the step); the delta
  rule's ``w h_c`` contracts over K, so it tiles V only (BK = K).
* ``output_fwd``   (BH, N, V/BV): ``o``, no carried state (reads ``h_c``).
* ``dlocal_bwd``   (BH, N): ``scale * A^T do`` (delta rule only).
* ``states_bwd``   as ``states_fwd``, reverse: ``dh_{c+1}`` per chunk, ``dh_0`` (and full
  ``d delta``).
* ``grads_bwd``    (BH, N): ``dq, dk, d delta, dG`` (and ``dw``).
* ``wy_gram_fwd`` / ``wy_solve_fwd``: the delta rule's UT transform (``A^kk``; the inverse
  of ``I + diag(beta) A^kk`` by forward substitution; ``u``, ``w``); ``wy_solve_bwd`` /
  ``wy_gram_bwd`` its backward; all (BH, N).

Tiles: GPU BV = 32, BK = 64 in the state passes (fla's chunk_h BV); in the output pass
BV = 64 for scalar or no gates only (``_chunk_output.output_tile``); TPU 128-lane multiples in
the state passes (a state dim is also the lane dim of a chunk input), full V in the output
pass; interpret mode 16. At B=2, H=16, K=V=128, T=16K, C=64 on GPU: state passes 32 x 4 x 2 =
256 programs (GLA) / 32 x 4 = 128 (delta rule); output pass 32 x 256 = 8192 (GLA, KDA) or
16384 (Gated DeltaNet, DeltaNet); gradient passes 8192.

Sequential kernels have two drivers from the same chunk body: on TPU the chunk index is the
innermost "arbitrary" grid axis (the tiles "parallel") and the state lives in VMEM scratch; on
GPU (Triton) and in interpret mode one program per (bh, V tile, K tile) runs a ``fori_loop``
over chunks carrying the state tile in registers. Only ``h_c`` (chunk-start states, fp32) and,
for the delta rule, ``delta``, ``A^kk`` and the inverse are saved for the backward; the reverse
pass recomputes the rest.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one backbone call (hashable: used as a nondiff argument)."""

    scale: float
    chunk: int  # C
    sub: int  # s, rows per sub-block of the gated Gram
    target: str  # "tpu" | "gpu" | "cpu"
    interpret: bool
    # "channel": per-key-channel gates (sub-blocked gated Gram); "scalar": one gate per step
    # (gates broadcast over K: Gram = masked matmul * [C, C] decay); "none": all gates 0.
    gate: str = "channel"
    # True sequence length (0: unknown = no padding). Padded steps have g = 0, so the last
    # real row of the final chunk is where G_last is reached; grads_bwd needs it (see there).
    t_real: int = 0


# ----------------------------------------------------------------------------- helpers


def _mm(a, b, ta=False, tb=False, dtype=None):
    """2-D matmul with fp32 accumulation; operands cast to ``dtype`` (default: a's dtype)."""
    dtype = a.dtype if dtype is None else dtype
    if ta:  # explicit fp32 transpose, as JAX's TPU flash-attention backward does (p.T, ds.T)
        a = a.astype(F32).T
    a = a.astype(dtype)
    b = b.astype(dtype)
    dims = ((1,), (1,) if tb else (0,))
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=F32)


def _row(x, i):
    """Row ``i`` of a 2-D value as ``[1, D]`` (masked sum: no dynamic slicing of values)."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == i, x, 0.0), axis=0, keepdims=True)


def _gram(
    gate,
    a_p,
    gs_p,
    b_all,
    gs_all,
    b_p,
    gs_bp,
    blk,
    s,
    mode,
    dm_p=None,
    want_m=True,
    acc_strict=False,
    same=None,
):
    """Gated Gram rows for sub-block ``blk`` of a chunk, optionally contracted with ``dm_p``.

    ``gate`` (static): "channel" as below; "scalar" / "none" (gates equal across K, or 0):
    the decay factors out, ``m = (a b^T) * exp(min(gs_p - gs_c, 0))`` masked.

    ``a_p, gs_p`` [s, K]: the block's rows (index p); ``b_all, gs_all`` [C, K]: every row of
    the chunk (index c); ``b_p, gs_bp`` [s, K]: ``b``'s rows of the same block. Returns
    ``m`` [s, C] with ``m_pc = sum_d a_pd b_cd exp(gs_pd - gs_cd)`` on valid pairs (0
    elsewhere) and ``acc`` [s, K] with ``acc_p = sum_c dm_pc b_c exp(gs_p - gs_c)``.
    ``mode``: "lower" (c <= p), "strict" (c < p), "upper" (c >= p; pass gs = -G). On valid
    pairs ``gs_p <= gs_c``, and every exponent below is clamped to <= 0 before ``exp``.
    ``acc_strict``: leave the diagonal pair ``c == p`` out of ``acc`` (not of ``m``).
    ``same`` (packed sequences) [s, C] bool or None: pairs in different segments are 0 in
    ``m`` and left out of ``acc`` (``dm_p`` is masked before the contraction).
    """
    if same is not None and dm_p is not None:
        dm_p = jnp.where(same, dm_p.astype(F32), 0.0)
    m, acc = _gram_unmasked(gate, a_p, gs_p, b_all, gs_all, b_p, gs_bp, blk, s, mode, dm_p,
                            want_m, acc_strict)
    if same is not None and m is not None:
        m = jnp.where(same, m, 0.0)
    return m, acc


def _gram_unmasked(gate, a_p, gs_p, b_all, gs_all, b_p, gs_bp, blk, s, mode, dm_p, want_m,
                   acc_strict):
    c_len, kdim = b_all.shape
    nb = c_len // s
    start = blk * s
    upper = mode == "upper"
    if gate in ("none", "scalar"):  # the decay factors out of the K sum: masked matmuls
        cols = lax.broadcasted_iota(jnp.int32, (s, c_len), 1)
        p_glob = start + lax.broadcasted_iota(jnp.int32, (s, 1), 0)
        ok = {"lower": cols <= p_glob, "strict": cols < p_glob, "upper": cols >= p_glob}[mode]
        if gate == "scalar":
            # columns of gs are equal: max over K is exact. The [1, C] row of gs_all comes
            # from a masked max over a [C, C] broadcast (no transpose in the kernel).
            gp = jnp.max(gs_p, axis=1, keepdims=True)
            gc = jnp.max(gs_all, axis=1, keepdims=True)
            eye = lax.broadcasted_iota(jnp.int32, (c_len, c_len), 0) == lax.broadcasted_iota(
                jnp.int32, (c_len, c_len), 1
            )
            gc_row = jnp.max(jnp.where(eye, gc, -jnp.inf), axis=0, keepdims=True)
            w = jnp.where(ok, jnp.exp(jnp.minimum(gp - gc_row, 0.0)), 0.0)
        else:
            w = jnp.where(ok, 1.0, 0.0)
        m = w * _mm(a_p, b_all, tb=True) if want_m else None
        acc = None
        if dm_p is not None:
            w_acc = jnp.where(cols == p_glob, 0.0, w) if acc_strict else w
            acc = _mm(w_acc * dm_p.astype(F32), b_all, dtype=b_all.dtype)
        return m, acc
    m = jnp.zeros((s, c_len), F32)
    acc = jnp.zeros((s, kdim), F32)
    has_off = blk < nb - 1 if upper else blk > 0
    if has_off:
        r = start + s if upper else start - 1
        gs_r = _row(gs_all, r)
        rows_c = lax.broadcasted_iota(jnp.int32, (c_len, 1), 0)
        valid_c = rows_c >= start + s if upper else rows_c < start
        e_p = jnp.exp(jnp.minimum(gs_p - gs_r, 0.0))
        bc = jnp.where(valid_c, b_all.astype(F32) * jnp.exp(jnp.minimum(gs_r - gs_all, 0.0)), 0.0)
        bc = bc.astype(b_all.dtype)
        if want_m:
            m = _mm((a_p.astype(F32) * e_p).astype(a_p.dtype), bc, tb=True)
        if dm_p is not None:
            acc = _mm(dm_p, bc, dtype=b_all.dtype) * e_p

    p_loc = lax.broadcasted_iota(jnp.int32, (s, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (s, c_len), 1)
    a32 = a_p.astype(F32)
    b32 = b_p.astype(F32)

    def diag(t, carry):
        m, acc = carry
        bt = _row(b32, t)
        gt = _row(gs_bp, t)
        if mode == "lower":
            ok = p_loc >= t
        elif mode == "strict":
            ok = p_loc > t
        else:
            ok = p_loc <= t
        e = jnp.where(ok, jnp.exp(jnp.minimum(gs_p - gt, 0.0)), 0.0)
        col_mask = cols == start + t
        if want_m:
            col = jnp.sum(a32 * bt * e, axis=1, keepdims=True)
            m = jnp.where(col_mask, col, m)
        if dm_p is not None:
            dcol = jnp.sum(jnp.where(col_mask, dm_p.astype(F32), 0.0), axis=1, keepdims=True)
            e_acc = jnp.where(p_loc == t, 0.0, e) if acc_strict else e
            acc = acc + dcol * bt * e_acc
        return m, acc

    m, acc = lax.fori_loop(0, s, diag, (m, acc))
    return m, acc


def _rows(i, s):
    return pl.ds(i * s, s)


# ----------------------------------------------------------------------------- packed sequences
# A segmented call passes ``seg`` [BH, T, 1] fp32: per row, the number of segment starts from
# the chunk's first row up to and including this row (0: the row belongs to the segment the
# entering state belongs to). Rows i, j share a segment iff their counts are equal; a row
# reads the entering state iff its count is 0 ("first"); it reaches the leaving state iff its
# count equals the chunk's last row's ("last"); the entering state survives the chunk iff the
# last row's count is 0 ("keep").


def seg_row(col):
    """``[C, 1] -> [1, C]`` by a masked max over a ``[C, C]`` broadcast (no in-kernel
    transpose: Mosaic GPU and some TPU layouts lack it)."""
    c = col.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (c, c), 0) == lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.max(jnp.where(eye, col, -jnp.inf), axis=0, keepdims=True)


def split_seg(refs, n_in, seg):
    """``(inputs, seg_ref or None, rest)`` of a kernel whose chunk inputs end with ``seg``."""
    if seg is None:
        return refs[:n_in], None, refs[n_in:]
    return refs[:n_in], refs[n_in], refs[n_in + 1 :]


def with_seg(ins, seg):
    """The chunk inputs of a parallel kernel, with ``seg`` appended when given."""
    return ins if seg is None else [*ins, seg]


def keep_rows(x, cond):
    """``x`` where ``cond`` (broadcast) else 0; ``cond`` None keeps everything."""
    return x if cond is None else jnp.where(cond, x.astype(F32), 0.0)


class ChunkSegments:
    """The packed-sequence masks of one chunk (all None without segments); see above.

    Read from ``seg_ref``, the chunk's ``[C, 1]`` block: ``first``, ``last`` [C, 1], ``keep``
    [1, 1], ``row`` [1, C] (the counts as a row), and per sub-block through :meth:`block`."""

    def __init__(self, seg_ref, s):
        self.on = seg_ref is not None
        self.s = s
        self.ref = seg_ref
        if not self.on:
            self.first = self.last = self.keep = self.row = None
            return
        col = seg_ref[...]
        c = col.shape[0]
        last_val = seg_ref[pl.ds(c - 1, 1), :]
        self.col = col
        self.first = col == 0.0  # [C, 1]
        self.last = col == last_val  # [C, 1]
        self.keep = last_val == 0.0  # [1, 1]
        self.last_val = last_val
        self.row = seg_row(col)  # [1, C]

    def block(self, i):
        """(same [s, C], first [s, 1], last [s, 1]) for sub-block ``i`` (None without)."""
        if not self.on:
            return None, None, None
        col = self.ref[_rows(i, self.s), :]
        return col == self.row, col == 0.0, col == self.last_val


def _params(cfg: Config, semantics, num_warps=4):
    """TPU: Mosaic params (grid semantics); GPU: Triton params, which also select the Triton
    lowering over Mosaic GPU (the default for ``pallas_call`` on GPU); CPU: none."""
    if cfg.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    if cfg.target == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
    return None


def _spec(block, index_map):
    return pl.BlockSpec(block, index_map)


def _par_call(cfg, kernel, name, chunk_ins, state_ins, outs, bv=None, tiled=()):
    """Grid (BH, N[, V/bv]): ``chunk_ins`` [BH, T, D] as [C, D] blocks, ``state_ins``
    [BH, N, V, K] as [V, K] blocks; ``outs`` ShapeDtypeStructs [BH, T, D]. With ``bv``, a third
    (parallel) grid axis tiles V: the chunk inputs and outputs at the indices in ``tiled``
    (``("in", i)`` / ``("out", i)``) are read / written as [C, bv] and the states as [bv, K]
    (fla's ``chunk_fwd_o`` grid (V/BV, N, B*H))."""
    c = cfg.chunk
    bh, t_len = chunk_ins[0].shape[:2]
    n = t_len // c
    nv = 1 if bv is None else state_ins[0].shape[2] // bv

    def chunk_spec(x, is_tiled):
        if is_tiled and bv is not None:
            return _spec((None, c, bv), lambda b, j, v: (b, j, v))
        return _spec((None, c, x.shape[-1]), lambda b, j, v: (b, j, 0))

    def state_spec(x):
        rows = x.shape[2] if bv is None else bv
        return _spec((None, None, rows, x.shape[3]), lambda b, j, v: (b, j, v, 0))

    in_specs = [chunk_spec(x, ("in", i) in tiled) for i, x in enumerate(chunk_ins)] + [
        state_spec(x) for x in state_ins
    ]
    out_specs = [chunk_spec(o, ("out", i) in tiled) for i, o in enumerate(outs)]
    return pl.pallas_call(
        kernel,
        grid=(bh, n, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=outs,
        # Untuned (no GPU measured): more warps when [C, 128] tiles and [128, 128] states
        # are live, as JAX's Triton attention does for head_dim > 64.
        compiler_params=_params(
            cfg,
            ("parallel", "parallel", "parallel"),
            num_warps=8 if max(x.shape[-1] for x in chunk_ins) > 64 else 4,
        ),
        interpret=cfg.interpret,
        name=name,
    )(*chunk_ins, *state_ins)
