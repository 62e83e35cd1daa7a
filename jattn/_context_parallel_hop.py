"""One device, one hop of context-parallel attention (:mod:`jattn.context_parallel`): the
blocked kernel on local queries against visiting K/V with the mask at global positions, forward
and backward, and the log-sum-exp merge of the hops' partial results.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn import _blocked
from jattn._common import Spec, split_heads
from jattn._context_parallel_layout import _block_ids, _Plan
from jattn.masks import Mask
from pallas_kernels import block_map as block_map_lib

F32 = jnp.float32


# ------------------------------------------------------------------------------------------------
# One device, one hop: the blocked kernel at global positions.
# ------------------------------------------------------------------------------------------------
class _AtPositions(Mask):
    """The user's mask evaluated at global token positions of a device's local tokens.

    Local index ``i`` of a side with chunk ids ``chunks`` (traced) and chunk length ``c`` sits at
    global position ``chunks[i // c] * c + i % c``. Holds traced chunk ids, so it is built inside
    the traced computation and never hashed (the kernel receives it in a Spec it does not hash).
    """

    def __init__(self, base: Mask | None, q_chunks, kv_chunks, q_chunk: int, kv_chunk: int,
                 q_len: int, kv_len: int):
        self.base, self.q_chunks, self.kv_chunks = base, q_chunks, kv_chunks
        self.q_chunk, self.kv_chunk, self.q_len, self.kv_len = q_chunk, kv_chunk, q_len, kv_len

    @property
    def num_heads(self):
        return None if self.base is None else self.base.num_heads

    @staticmethod
    def _global(idx, chunks, c: int):
        which = jnp.clip(idx // c, 0, chunks.shape[0] - 1)
        return jnp.take(chunks, which) * c + idx % c

    def _visible(self, q, k, h, q_len, kv_len):
        qg = self._global(q, self.q_chunks, self.q_chunk)
        kg = self._global(k, self.kv_chunks, self.kv_chunk)
        if self.base is None:
            return jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
        return self.base._visible(qg, kg, h, self.q_len, self.kv_len)


class _Hop(NamedTuple):
    spec: Spec  # local spec with an _AtPositions mask
    entries: jax.Array  # compacted block lists (pallas_kernels.block_map.compact)
    counts: jax.Array


def _hop(plan: _Plan, gmap, q_chunks, kv_chunks, seg_q, seg_k, q_len: int, kv_len: int) -> _Hop:
    """Local spec and block table for local queries (chunks ``q_chunks``) against K/V
    (chunks ``kv_chunks``); ``q_len``/``kv_len`` are the local lengths."""
    g = plan.spec
    mask = _AtPositions(g.mask, q_chunks, kv_chunks, plan.q_chunk, plan.kv_chunk,
                        g.q_len, g.kv_len)
    spec = g._replace(mask=mask, q_len=q_len, kv_len=kv_len, has_sinks=False)
    rows = _block_ids(q_chunks, plan.q_chunk, plan.block_q)
    cols = _block_ids(kv_chunks, plan.kv_chunk, plan.block_kv)
    table = jnp.take(jnp.take(gmap, rows, axis=0), cols, axis=1)
    if seg_q is not None:  # AND with the documents' block map, one map over the batch
        seg = block_map_lib.segment_block_map(seg_q, seg_k, plan.block_q, plan.block_kv)
        table = block_map_lib.collapse(block_map_lib.intersect(table[None], seg), (0,))
    # The hop's table depends on the device index (traced): compacted with jnp on device.
    entries, counts = block_map_lib.compact_traced(table.astype(jnp.int8), table.shape[-1])
    return _Hop(spec, entries, counts)


def _hop_forward(plan: _Plan, hop: _Hop, q, k, v, seg_q, seg_k):
    """``(out fp32 [B, tq, Hq, Dv], stat [B, Hq, tq])`` of one hop, or the identity of the merge
    when the hop's block table is empty (then nothing is computed)."""
    b, tq, hq, _ = q.shape
    norm = plan.spec.normalizer

    def compute(_):
        return _blocked._forward(hop.spec, plan.block_q, plan.block_kv, q, k, v, None, None,
                                 None, seg_q, seg_k, hop.entries, hop.counts)[:2]

    def skip(_):
        empty_stat = -jnp.inf if norm.softmax else 0.0
        return (jnp.zeros((b, tq, hq, v.shape[-1]), F32), jnp.full((b, hq, tq), empty_stat, F32))

    return lax.cond(jnp.any(hop.counts > 0), compute, skip, None)


def _max_and_log_sum(plan: _Plan, stat):
    """The blocked backward's ``(m, log_l)`` rows from the merged global lse: ``m = lse``,
    ``log_l = 0`` (``m = +inf`` where a row sees nothing, so its weights recompute to 0). Only the
    merged lse crosses the ring, so the recompute is ``exp(s - lse)``: exact except for rows whose
    logits are so large that ``lse`` rounds ``log l`` away (the single-device path keeps them)."""
    if not plan.spec.normalizer.softmax:
        return None
    rows = split_heads(stat.astype(F32), plan.spec.num_kv_heads, plan.spec.group)
    return jnp.where(rows == -jnp.inf, jnp.inf, rows), jnp.zeros_like(rows)


def _hop_backward(plan: _Plan, hop: _Hop, q, k, v, seg_q, seg_k, out, stat, d_out, d_stat):
    """``(dq, dk, dv)`` (fp32) of one hop given the GLOBAL ``out`` and row statistic."""

    def compute(_):
        # fp32 operands so the kernel returns fp32 gradients: hops add up without rounding
        # to q's dtype in between (a transient fp32 copy of the local shards).
        q32, k32, v32 = (x.astype(F32) for x in (q, k, v))
        res = (q32, k32, v32, None, None, None, seg_q, seg_k, hop.entries, hop.counts,
               out, stat, _max_and_log_sum(plan, stat))
        return _blocked._core_bwd(hop.spec, plan.block_q, plan.block_kv, res,
                                  (d_out, d_stat))[:3]

    def skip(_):
        return (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))

    return lax.cond(jnp.any(hop.counts > 0), compute, skip, None)


class _Acc(NamedTuple):
    # out: fp32 [B, tq, Hq, Dv], normalized (softmax), a sum (sigmoid), un-normalized (relu);
    # stat: [B, Hq, tq], the lse (softmax), zeros (sigmoid), the visible-key count (relu).
    out: jax.Array
    stat: jax.Array


def _merge(norm, acc: _Acc, out, stat) -> _Acc:
    """Fold one hop's ``(out, stat)`` into the running accumulator."""
    if norm.softmax:
        m = jnp.maximum(acc.stat, stat)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        wa, wb = jnp.exp(acc.stat - m_safe), jnp.exp(stat - m_safe)
        total = wa + wb
        lse = jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
        col = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B, Hq, tq] -> [B, tq, Hq, 1]
        inv = 1.0 / jnp.where(total > 0, total, 1.0)
        return _Acc(acc.out * col(wa * inv) + out * col(wb * inv), lse)
    if norm.divide_by_count:  # un-normalize this hop's rows, add the counts
        return _Acc(acc.out + out * jnp.swapaxes(jnp.maximum(stat, 1.0), 1, 2)[..., None],
                    acc.stat + stat)
    return _Acc(acc.out + out, acc.stat)


def _finish(norm, acc: _Acc):
    if norm.divide_by_count:
        return acc.out / jnp.swapaxes(jnp.maximum(acc.stat, 1.0), 1, 2)[..., None], acc.stat
    return acc.out, acc.stat


def _empty_acc(norm, q, v) -> _Acc:
    b, tq, hq, _ = q.shape
    stat = jnp.full((b, hq, tq), -jnp.inf if norm.softmax else 0.0, F32)
    return _Acc(jnp.zeros((b, tq, hq, v.shape[-1]), F32), stat)
