"""Hopper flash-attention forward through Pallas Mosaic GPU (wgmma, TMA, warp specialisation).

The structure follows FlashAttention-3 (Shah et al. 2024) as JAX's own
``pallas/ops/gpu/attention_mgpu.py`` writes it, extended to the block lists of ``flash.py``:

* one CTA per ``(query head, 128-row query block, batch)``; three warpgroups: two compute
  warpgroups (64 query rows each, ``wgmma`` for ``q k^T`` and ``p v`` with fp32 accumulators)
  and one memory warpgroup that streams the k/v blocks of the block's compacted list
  (``ents``: non-empty key blocks in increasing order) into a ring of ``STAGES`` shared-memory
  slots with TMA, gated by "loaded" / "consumed" barriers;
* a schedule barrier makes the two compute warpgroups ping-pong: one runs its softmax while
  the other's matmuls occupy the tensor cores;
* the online softmax runs in base 2 (``exp2`` of ``s * scale * log2 e``, FMA-friendly);
  partial blocks evaluate ``mask_fn`` and the key bound on iota indices, full blocks skip it;
* GQA reads k/v head ``h // (Hq // Hkv)`` in place (no copies); sinks start the row at
  ``m = sink, l = 1``;
* it writes the same row statistics as the Triton driver (``m`` natural units, ``+inf`` and
  ``log l = 0`` on rows that see nothing), so the existing Triton backward (``_flash_gpu``)
  serves as its VJP unchanged.

Scope: forward only; bf16/f16; ``D == Dv`` in {64, 128}; ``block_q == 128``;
``block_kv`` 64 or 128; no soft-cap, segment ids or score_mod (those calls keep the Triton
kernel). Opt-in until it has been compiled and measured on a Hopper card (issue 21): with
``PALLAS_KERNELS_MOSAIC_GPU=1`` it is selected at trace time on compute capability 9.x
(:func:`enabled`); without it every GPU call keeps the Triton kernel;
:func:`force` switches it on for cross-lowering from a CPU host (``jax.export(...,
platforms=("cuda",))`` yields a ``mosaic_gpu_v2`` custom call) and for Mosaic GPU's interpret
mode (``InterpretGPUParams``), which runs this kernel on CPU in tests: the barriers, TMA
copies, block lists, masking and softmax as compiled, but the two products as register dots
(0.10.2's interpreter has no ``run_state`` and no transposed wgmma operand) and no register
layout casts.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["applies", "enabled", "force", "unsupported_reason", "forward", "padded_forward"]

ROWS_PER_WG = 64  # wgmma's M per warpgroup
COMPUTE_WGS = 2
BLOCK_Q = ROWS_PER_WG * COMPUTE_WGS
STAGES = 2  # k/v shared-memory ring depth
M_INIT = -1e30  # finite "nothing seen yet" row max (base-2 units): alpha = exp2(0) = 1
M_MASKED = 2 * M_INIT  # masked logits: below every row max, so their weight is exp2(-1e30) = 0
LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: q k^T

_forced: bool | None = None


@contextlib.contextmanager
def force(on: bool = True):
    """Use (or with ``on=False`` never use) this kernel for ``backend="cuda"`` calls in scope,
    whatever the local device: for ``jax.export`` from a CPU host and for interpret-mode tests."""
    global _forced
    prev, _forced = _forced, bool(on)
    try:
        yield
    finally:
        _forced = prev


def _plgpu():
    """``jax.experimental.pallas.mosaic_gpu`` (imported lazily: TPU/CPU-only users never
    need it, and an older JAX without it keeps the Triton kernel)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def on_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def enabled() -> bool:
    """Whether ``backend="cuda"`` calls should try this kernel (forced, or on Hopper). Read
    at trace time: a function jitted before a change keeps its traced choice."""
    if _forced is not None:
        return _forced
    # opt-in: the kernel has never been compiled for a device (no GPU was lent when it was
    # written); a Mosaic compile failure on a real card would not fall back (issue 21)
    return os.environ.get("PALLAS_KERNELS_MOSAIC_GPU", "0") == "1" and on_hopper()


def unsupported_reason(cfg, q, v) -> str | None:
    """Why this kernel cannot serve a flash call (None if it can). ``cfg`` is flash's Config."""
    d, dv = q.shape[-1], v.shape[-1]
    checks = (
        (cfg.backend == "cuda", "backend is not cuda"),
        (q.dtype in (jnp.bfloat16, jnp.float16), f"dtype {q.dtype} (needs bf16/f16)"),
        # D=256 would need a shallower ring to fit the 227 KiB of shared memory
        (d == dv and d in (64, 128), f"head dims D={d} Dv={dv} (need D == Dv in 64, 128)"),
        (cfg.block_q == BLOCK_Q, f"block_q={cfg.block_q} (needs {BLOCK_Q})"),
        (cfg.block_kv in (64, 128), f"block_kv={cfg.block_kv} (needs 64 or 128)"),
        (cfg.soft_cap is None, "logits_soft_cap"),
        (not cfg.has_segments, "segment_ids"),
        (cfg.score_mod is None, "score_mod"),
    )
    for ok, why in checks:
        if not ok:
            return why
    try:
        _plgpu()
    except ImportError as e:  # an older JAX
        return f"no Mosaic GPU: {e}"
    return None


def applies(cfg, q, v) -> bool:
    """The dispatch test of ``flash._forward``: enabled here and able to serve the call."""
    return enabled() and unsupported_reason(cfg, q, v) is None


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _pad_rows(x, size):
    return jnp.pad(x, [(0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)])


def padded_forward(cfg, ents, cnts, q, k, v, sinks):
    """:func:`forward` on unpadded ``q [B, Tq, Hq, D]``, ``k/v [B, Tk, Hkv, D]``; outputs cut
    back to ``Tq``. When chosen automatically (not :func:`force`), a failure to trace (e.g. a
    Mosaic GPU API that moved in another JAX) warns and returns None so that the caller keeps
    the Triton kernel; forced, it raises."""
    tq = q.shape[1]
    try:
        o, m, log_l = forward(cfg, ents, cnts, _pad_rows(q, cfg.q_pad), _pad_rows(k, cfg.kv_pad),
                              _pad_rows(v, cfg.kv_pad), sinks)
    except Exception as e:  # noqa: BLE001 - any trace-time failure: fall back, loudly
        if _forced:
            raise
        warnings.warn(f"Mosaic GPU flash forward unavailable ({type(e).__name__}: {e}); "
                      "using the Triton kernel", RuntimeWarning, stacklevel=3)
        return None
    return o[:, :tq], m[:, :, :tq], log_l[:, :, :tq]


def forward(cfg, ents, cnts, q, k, v, sinks):
    """q ``[B, Tq_pad, Hq, D]``, k/v ``[B, Tk_pad, Hkv, D]`` (padded to whole blocks) ->
    ``o [B, Tq_pad, Hq, D]``, ``m, log_l [B, Hq, Tq_pad]`` (fp32), as ``_flash_gpu.gpu_forward``.

    ``ents/cnts``: the compacted forward lists ``[Bm, Hm, nq, W]`` / ``[Bm, Hm, nq]``
    (``entry = column * 4 + kind``, kind 1 partial, 2 full).
    """
    plgpu = _plgpu()
    b, tq_pad, hq, d = q.shape
    tk_pad, bk = k.shape[1], cfg.block_kv
    dtype, group = q.dtype, cfg.group
    scale2 = cfg.scale * LOG2E  # logits in base-2 units
    ents = ents.astype(jnp.int32)
    cnts = cnts.astype(jnp.int32)
    sinks2 = sinks.astype(jnp.float32) * LOG2E

    def cast(x, layout):  # register layouts only mean something to the compiler
        return x if cfg.interpret else plgpu.layout_cast(x, layout)

    def iota(shape, dim):
        if cfg.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def kernel(ents_ref, cnts_ref, sinks_ref, q_ref, k_ref, v_ref, o_ref, m_ref, ll_ref,
               scoped):
        batch, head, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
        wg = lax.axis_index("wg")
        mb = batch if cfg.map_batch > 1 else 0
        mh = head if cfg.map_heads > 1 else 0
        count = cnts_ref[mb, mh, qi]
        (qo_smem2, k_smem, v_smem, m_smem2, ll_smem2), barriers, consumed, sched = scoped
        k_ready, v_ready, q_ready = barriers
        k_used, v_used = consumed

        def schedule():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            q_base = qi * BLOCK_Q + wg * ROWS_PER_WG
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, ROWS_PER_WG), head], qo_smem,
                                    q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            row = plgpu.Layout.WGMMA.reduce(1)
            if cfg.has_sinks:
                m_i = cast(jnp.full((ROWS_PER_WG,), sinks_ref[head], jnp.float32),
                                        row)
                l_i = cast(jnp.full((ROWS_PER_WG,), 1.0, jnp.float32), row)
            else:
                m_i = cast(jnp.full((ROWS_PER_WG,), M_INIT, jnp.float32), row)
                l_i = cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), row)
            acc = cast(jnp.full((ROWS_PER_WG, d), 0.0, jnp.float32),
                                    plgpu.Layout.WGMMA)

            @pl.when(count > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(schedule)

            def step(j, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(j, STAGES)
                entry = ents_ref[mb, mh, qi, j]
                k0 = lax.div(entry, 4) * bk

                def qk_product(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    schedule()
                    return acc_ref[...]

                if cfg.interpret:  # the interpreter's wgmma takes no transposed operand
                    s = lax.dot_general(qo_smem[...], k_smem.at[slot][...], _NT,
                                        preferred_element_type=jnp.float32)
                    schedule()
                else:
                    s = pl.run_scoped(qk_product, plgpu.ACC((ROWS_PER_WG, bk), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                s = s * scale2

                def masked(s):  # partial blocks only: full blocks skip the mask entirely
                    shape = (ROWS_PER_WG, bk)
                    qs = q_base + iota(shape, 0)
                    ks = k0 + iota(shape, 1)
                    vis = ks < cfg.kv_len
                    if cfg.mask_fn is not None:
                        vis = vis & cfg.mask_fn(qs, ks, head)
                    return jnp.where(vis, s, M_MASKED)

                s = lax.cond(lax.rem(entry, 4) == 1, masked, lambda s: s, s)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                # m_new >= M_INIT > M_MASKED + 2^100: masked keys get exactly exp2(-huge) = 0
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done: the other warpgroup may multiply
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(sched)

                def wait_next_k():
                    nxt = j + 1

                    @pl.when(nxt < count)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, STAGES)])

                if cfg.interpret:  # no run_state in the interpreter: a plain product and add
                    acc = acc + jnp.dot(p16, v_smem.at[slot][...],
                                        preferred_element_type=jnp.float32)
                    wait_next_k()
                else:
                    def pv_product(acc_ref):  # wgmma into the running accumulator
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()

                    acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, count, step, (acc, m_i, l_i))
            pl.when(wg == 0)(schedule)

            empty = l_i == 0.0
            l_safe = jnp.where(empty, 1.0, l_i)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            m_smem2.at[wg][...] = jnp.where(empty, jnp.inf, m_i * (1.0 / LOG2E))
            ll_smem2.at[wg][...] = jnp.log(l_safe)
            plgpu.commit_smem()
            rows = pl.ds(q_base, ROWS_PER_WG)
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, rows, head])
            plgpu.copy_smem_to_gmem(m_smem2.at[wg], m_ref.at[batch, head, rows])
            plgpu.copy_smem_to_gmem(ll_smem2.at[wg], ll_ref.at[batch, head, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, group)

            def load(j, slot):
                cols = (batch, pl.ds(lax.div(ents_ref[mb, mh, qi, j], 4) * bk, bk), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_ready.at[slot])

            for i in range(STAGES):
                pl.when(i < count)(lambda i=i: load(i, i))

            @pl.loop(0, jnp.maximum(count - STAGES, 0))
            def _(j):
                slot = lax.rem(j, STAGES)
                plgpu.barrier_wait(k_used.at[slot])
                plgpu.barrier_wait(v_used.at[slot])
                load(j + STAGES, slot)

            # Drain: observe the consumption of the last loads too, so no barrier phase is
            # left pending when the CTA's barriers go out of scope (the interpreter checks).
            @pl.loop(jnp.maximum(count - STAGES, 0), count)
            def _(j):
                plgpu.barrier_wait(k_used.at[lax.rem(j, STAGES)])
                plgpu.barrier_wait(v_used.at[lax.rem(j, STAGES)])

    def entry(ents_ref, cnts_ref, sinks_ref, q_ref, k_ref, v_ref, o_ref, m_ref, ll_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), dtype, transforms=tiled),
            plgpu.SMEM((STAGES, bk, d), dtype, transforms=tiled),
            plgpu.SMEM((STAGES, bk, d), dtype, transforms=tiled),
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
        )
        pl.run_scoped(
            lambda *scoped: kernel(ents_ref, cnts_ref, sinks_ref, q_ref, k_ref, v_ref, o_ref,
                                   m_ref, ll_ref, scoped),
            smem,
            (plgpu.Barrier(num_barriers=STAGES), plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=STAGES),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    if tq_pad % BLOCK_Q or tk_pad % bk:
        raise ValueError(f"padded lengths Tq={tq_pad}, Tk={tk_pad} must be multiples of "
                         f"{BLOCK_Q} and block_kv={bk}")
    stats = jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)
    o, m, log_l = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), stats, stats),
        grid=(hq, tq_pad // BLOCK_Q, b),
        grid_names=("heads", "q", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(cfg.interpret),
    )(ents, cnts, sinks2, q, k, v)
    return o, m, log_l
