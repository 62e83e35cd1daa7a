"""Context-parallel softmax-family attention: the sequence split over one mesh axis.

``attention(q, k, v, axis="context", strategy="ring")`` takes global ``[B, T, H, D]`` arrays whose
``T`` is split over the mesh axis ``axis`` (``n`` devices) of the current mesh (``jax.set_mesh``)
and returns the same result as the unsplit call, forward and gradients, with O(T / n) memory per
device.

Strategies (Liu et al., "Ring Attention with Blockwise Transformers", 2023; Brandon et al.,
"Striped Attention", 2023; MaxText's load-balanced context parallelism):

* ``"ring"``: each device keeps its queries; the K/V shards travel around the ring with
  ``lax.ppermute`` (``n`` hops). Every hop runs the blocked flash kernel of :mod:`jattn._blocked`
  on (local queries, visiting K/V) with the mask evaluated at GLOBAL token positions, and the
  partial results are merged by log-sum-exp::

      lse = logaddexp(lse_a, lse_b),  o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse)

  (``sigmoid`` sums the partial outputs; ``relu`` sums un-normalized outputs and visible-key
  counts.) A hop whose block table is empty (a future shard under a causal or window mask, or
  another document) is skipped by ``lax.cond``: it costs nothing, not "computed and masked".
  The backward is a custom VJP, the ring run again: K/V travel with their gradient accumulators
  ``dK, dV`` and each hop recomputes its tiles from the saved global ``(o, lse)``, as in
  flash-attention's backward. Autodiff of the forward ring would save every hop's K/V shard, i.e.
  the whole K/V per device (O(T)); the custom VJP keeps O(T / n).
* ``"allgather"``: K/V all-gathered once along the axis (O(T) K/V per device), local queries
  attend to every key. Simple, one collective; good for short sequences and GQA with few KV heads.

Load balance (``layout="zigzag"``, the default): the sequence is cut into ``2n`` chunks and
device ``i`` holds chunks ``i`` and ``2n - 1 - i``, so under a causal mask every device does the
same work (contiguous shards give the last device ``~2n - 1`` times the first one's work).
:func:`attention` keeps natural token order for its callers by permuting inside (two
``ppermute``s of ``T / 2n`` tokens per tensor each way: q, k, v, segment ids in, output and lse
out; the same again in the backward). Models can permute once with :func:`zigzag_permute` at the
embedding and :func:`zigzag_unpermute` at the head and pass ``inputs_permuted=True``.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jattn import _blocked
from jattn import masks as masks_lib
from jattn._common import Spec, split_heads
from jattn.masks import Mask

__all__ = [
    "attention",
    "STRATEGIES",
    "LAYOUTS",
    "zigzag_indices",
    "zigzag_permute",
    "zigzag_unpermute",
    "hop_work",
]

STRATEGIES = ("ring", "allgather")
LAYOUTS = ("zigzag", "contiguous")
F32 = jnp.float32
_MAX_BLOCK = 512


# ------------------------------------------------------------------------------------------------
# Layouts: which global chunks each device holds.
# ------------------------------------------------------------------------------------------------
def _device_chunks(layout: str, n: int) -> np.ndarray:
    """int ``[n, c]``: the global chunk ids device ``i`` holds, in local order (``c`` = 2 or 1)."""
    if layout == "zigzag":
        return np.array([[i, 2 * n - 1 - i] for i in range(n)], np.int32)
    return np.arange(n, dtype=np.int32)[:, None]


def zigzag_indices(seq_len: int, num_shards: int) -> np.ndarray:
    """Token order of the zigzag layout: ``x[:, zigzag_indices(T, n)]`` puts chunks ``i`` and
    ``2n - 1 - i`` (of ``2n`` chunks of ``T / 2n`` tokens) next to each other, in shard ``i``."""
    if seq_len % (2 * num_shards):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2 * num_shards = "
                         f"{2 * num_shards} for the zigzag layout")
    c = seq_len // (2 * num_shards)
    chunks = _device_chunks("zigzag", num_shards).reshape(-1)
    return (chunks[:, None] * c + np.arange(c)[None, :]).reshape(-1).astype(np.int32)


def zigzag_permute(x, num_shards: int, axis: int = 1):
    """Natural token order -> zigzag layout along ``axis`` (e.g. once, at the embedding)."""
    return jnp.take(x, zigzag_indices(x.shape[axis], num_shards), axis=axis)


def zigzag_unpermute(x, num_shards: int, axis: int = 1):
    """Zigzag layout -> natural token order along ``axis`` (the inverse of zigzag_permute)."""
    inverse = np.argsort(zigzag_indices(x.shape[axis], num_shards))
    return jnp.take(x, inverse, axis=axis)


def _zigzag_dest(c: int, n: int) -> int:
    return c if c < n else 2 * n - 1 - c


def _to_zigzag(x, axis_name, n: int, seq_axis: int):
    """Inside shard_map: natural shards (chunks 2i, 2i+1) -> zigzag shards (chunks i, 2n-1-i).

    Each device holds one even and one odd chunk in both layouts, so this is two ppermutes.
    """
    even, odd = jnp.split(x, 2, axis=seq_axis)
    even = lax.ppermute(even, axis_name, [(i, _zigzag_dest(2 * i, n)) for i in range(n)])
    odd = lax.ppermute(odd, axis_name, [(i, _zigzag_dest(2 * i + 1, n)) for i in range(n)])
    first_is_even = lax.axis_index(axis_name) % 2 == 0
    return jnp.where(first_is_even, jnp.concatenate([even, odd], seq_axis),
                     jnp.concatenate([odd, even], seq_axis))


def _from_zigzag(x, axis_name, n: int, seq_axis: int):
    """Inverse of :func:`_to_zigzag`."""
    first, second = jnp.split(x, 2, axis=seq_axis)
    first_is_even = lax.axis_index(axis_name) % 2 == 0
    even = jnp.where(first_is_even, first, second)
    odd = jnp.where(first_is_even, second, first)
    even = lax.ppermute(even, axis_name, [(_zigzag_dest(2 * i, n), i) for i in range(n)])
    odd = lax.ppermute(odd, axis_name, [(_zigzag_dest(2 * i + 1, n), i) for i in range(n)])
    return jnp.concatenate([even, odd], seq_axis)


# ------------------------------------------------------------------------------------------------
# The static plan of one call.
# ------------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """Static (hashable) description of a context-parallel call."""

    spec: Spec  # the GLOBAL spec: q_len/kv_len are the global lengths, mask the user's mask
    axis: str
    n: int
    layout: str
    q_chunk: int  # tokens per chunk (a device holds len(chunks[i]) chunks)
    kv_chunk: int
    block_q: int
    block_kv: int


def _largest_divisor_at_most(x: int, cap: int) -> int:
    return max(d for d in range(1, min(x, cap) + 1) if x % d == 0)


def _global_block_map(plan: _Plan) -> np.ndarray:
    """int8 ``[NQ, NK]`` block map of the user's mask over the global sequence, reduced over
    heads (empty only if empty for every head, full only if full for every head)."""
    spec = plan.spec
    mask = spec.mask if spec.mask is not None else masks_lib.full()
    m = np.asarray(mask.block_map(spec.q_len, spec.kv_len, plan.block_q, plan.block_kv))
    if m.ndim == 3:
        hi, lo = m.max(0), m.min(0)
        m = np.where(hi == masks_lib.EMPTY, masks_lib.EMPTY,
                     np.where(lo == masks_lib.FULL, masks_lib.FULL, masks_lib.PARTIAL))
    return m.astype(np.int8)


def _block_ids(chunks, chunk: int, block: int):
    """Global block ids of a device's local blocks: chunks ``[c]`` -> ``[c * chunk / block]``."""
    per = chunk // block
    return (chunks[:, None] * per + jnp.arange(per, dtype=jnp.int32)[None, :]).reshape(-1)


def hop_work(mask: Mask | None, q_len: int, kv_len: int, num_shards: int, *,
             layout: str = "zigzag", block_q: int | None = None,
             block_kv: int | None = None) -> np.ndarray:
    """Visited (non-empty) tiles per device and ring hop, from the static block map.

    Returns int ``[n, n]``: entry ``[i, s]`` is the number of ``block_q x block_kv`` tiles device
    ``i`` computes at hop ``s`` (when it holds the K/V of device ``(i - s) mod n``); 0 means the
    hop is skipped. ``sum(axis=1)`` is each device's attention work (FLOPs up to a constant).
    """
    plan = _make_plan(_spec_for(mask, q_len, kv_len), "context", num_shards, layout,
                      block_q, block_kv)
    gmap = _global_block_map(plan) != masks_lib.EMPTY
    chunks = _device_chunks(layout, num_shards)
    work = np.zeros((num_shards, num_shards), np.int64)
    ids = lambda c, chunk, block: (c[:, None] * (chunk // block)
                                   + np.arange(chunk // block)[None, :]).reshape(-1)
    for i in range(num_shards):
        rows = ids(chunks[i], plan.q_chunk, plan.block_q)
        for s in range(num_shards):
            cols = ids(chunks[(i - s) % num_shards], plan.kv_chunk, plan.block_kv)
            work[i, s] = gmap[np.ix_(rows, cols)].sum()
    return work


def _spec_for(mask, q_len, kv_len) -> Spec:
    from jattn import normalizers

    return Spec(mask=mask, normalizer=normalizers.get("softmax"), scale=1.0, soft_cap=None,
                q_len=q_len, kv_len=kv_len, num_kv_heads=1, group=1, has_bias=False,
                has_dense_mask=False, has_segments=False, has_sinks=False)


def _make_plan(spec: Spec, axis: str, n: int, layout: str, block_q, block_kv) -> _Plan:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    per_device = 2 if layout == "zigzag" else 1
    for name, t in (("q", spec.q_len), ("k/v", spec.kv_len)):
        if t % (per_device * n):
            what = f"2 * {n} = {2 * n} (zigzag layout)" if per_device == 2 else f"{n}"
            raise ValueError(
                f"{name} sequence length {t} must be divisible by {what} for context "
                f"parallelism over axis {axis!r} of size {n}; pad the sequence to a multiple "
                f"of {per_device * n}" + (" or pass layout='contiguous'" if per_device == 2
                                          else ""))
    q_chunk, kv_chunk = spec.q_len // (per_device * n), spec.kv_len // (per_device * n)
    bq = block_q or _largest_divisor_at_most(q_chunk, _MAX_BLOCK)
    bk = block_kv or _largest_divisor_at_most(kv_chunk, _MAX_BLOCK)
    if q_chunk % bq or kv_chunk % bk:
        raise ValueError(f"block sizes ({bq}, {bk}) must divide the chunk lengths "
                         f"({q_chunk}, {kv_chunk})")
    return _Plan(spec, axis, n, layout, q_chunk, kv_chunk, bq, bk)


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
    table: jax.Array
    kv_ids: jax.Array
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
    if seg_q is not None:  # AND with the documents' block map, reduced over the batch
        seg = masks_lib.segment_block_map(seg_q, seg_k, plan.block_q, plan.block_kv)
        combined = jnp.minimum(table[None], seg)
        hi, lo = combined.max(0), combined.min(0)
        table = jnp.where(hi == masks_lib.EMPTY, masks_lib.EMPTY,
                          jnp.where(lo == masks_lib.FULL, masks_lib.FULL, masks_lib.PARTIAL))
    table = table.astype(jnp.int8)
    kv_ids = jnp.argsort(table == masks_lib.EMPTY, axis=1, stable=True).astype(jnp.int32)
    counts = jnp.sum(table != masks_lib.EMPTY, axis=1).astype(jnp.int32)
    return _Hop(spec, table, kv_ids, counts)


def _hop_forward(plan: _Plan, hop: _Hop, q, k, v, seg_q, seg_k):
    """``(out fp32 [B, tq, Hq, Dv], stat [B, Hq, tq])`` of one hop, or the identity of the merge
    when the hop's block table is empty (then nothing is computed)."""
    b, tq, hq, _ = q.shape
    norm = plan.spec.normalizer

    def compute(_):
        return _blocked._forward(hop.spec, plan.block_q, plan.block_kv, q, k, v, None, None,
                                 None, seg_q, seg_k, hop.table, hop.kv_ids, hop.counts)[:2]

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
        res = (q32, k32, v32, None, None, None, seg_q, seg_k, hop.table, hop.kv_ids, hop.counts,
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


# ------------------------------------------------------------------------------------------------
# Ring: forward and a ring backward (custom VJP), per device inside shard_map.
# ------------------------------------------------------------------------------------------------
def _chunks_of(plan: _Plan, device):
    return jnp.asarray(_device_chunks(plan.layout, plan.n))[device]


def _rotate(plan: _Plan, xs):
    """Send every array to the next device of the ring (device i receives from i - 1)."""
    perm = [(i, (i + 1) % plan.n) for i in range(plan.n)]
    return jax.tree.map(lambda x: None if x is None else lax.ppermute(x, plan.axis, perm), xs,
                        is_leaf=lambda x: x is None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan: _Plan, gmap, q, k, v, seg_q, seg_k):
    return _ring_fwd(plan, gmap, q, k, v, seg_q, seg_k)[0]


def _ring_fwd(plan: _Plan, gmap, q, k, v, seg_q, seg_k):
    norm = plan.spec.normalizer
    me = lax.axis_index(plan.axis)
    q_chunks = _chunks_of(plan, me)

    def step(s, kv, acc):
        k_s, v_s, seg_k_s = kv
        hop = _hop(plan, gmap, q_chunks, _chunks_of(plan, (me - s) % plan.n), seg_q, seg_k_s,
                   q.shape[1], k.shape[1])
        return _merge(norm, acc, *_hop_forward(plan, hop, q, k_s, v_s, seg_q, seg_k_s))

    def body(carry, s):
        kv, acc = carry
        # Send this shard on while computing with it: the collective does not depend on the
        # hop's compute, so the two overlap (async collectives on TPU/GPU).
        return (_rotate(plan, kv), step(s, kv, acc)), None

    kv, acc = (k, v, seg_k), _empty_acc(norm, q, v)
    (kv, acc), _ = lax.scan(body, (kv, acc), jnp.arange(plan.n - 1))
    acc = step(plan.n - 1, kv, acc)  # the last hop sends nothing
    out, stat = _finish(norm, acc)
    return (out, stat), (gmap, q, k, v, seg_q, seg_k, out, stat)


def _ring_bwd(plan: _Plan, res, cotangents):
    gmap, q, k, v, seg_q, seg_k, out, stat = res
    d_out, d_stat = cotangents
    d_out, d_stat = d_out.astype(F32), d_stat.astype(F32)
    me = lax.axis_index(plan.axis)
    q_chunks = _chunks_of(plan, me)

    def step(s, kv, dkv, dq):
        k_s, v_s, seg_k_s = kv
        hop = _hop(plan, gmap, q_chunks, _chunks_of(plan, (me - s) % plan.n), seg_q, seg_k_s,
                   q.shape[1], k.shape[1])
        ddq, ddk, ddv = _hop_backward(plan, hop, q, k_s, v_s, seg_q, seg_k_s, out, stat,
                                      d_out, d_stat)
        # The gradient accumulators travel with their K/V shard, one hop behind it.
        return _rotate(plan, (dkv[0] + ddk, dkv[1] + ddv)), dq + ddq

    def body(carry, s):
        kv, dkv, dq = carry
        dkv, dq = step(s, kv, dkv, dq)  # the K/V send below overlaps this compute
        return (_rotate(plan, kv), dkv, dq), None

    kv, dkv = (k, v, seg_k), (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    (kv, dkv, dq), _ = lax.scan(body, (kv, dkv, jnp.zeros(q.shape, F32)), jnp.arange(plan.n - 1))
    (dk, dv), dq = step(plan.n - 1, kv, dkv, dq)  # n sends bring every accumulator home
    return None, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ------------------------------------------------------------------------------------------------
# All-gather: one local call against the gathered K/V (custom VJP; autodiff does the gather).
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(plan: _Plan, gmap, q, k_all, v_all, seg_q, seg_k_all):
    return _gathered_fwd(plan, gmap, q, k_all, v_all, seg_q, seg_k_all)[0]


def _gathered_hop(plan: _Plan, gmap, q, k_all, seg_q, seg_k_all):
    me = lax.axis_index(plan.axis)
    kv_chunks = jnp.asarray(_device_chunks(plan.layout, plan.n).reshape(-1))
    return _hop(plan, gmap, _chunks_of(plan, me), kv_chunks, seg_q, seg_k_all, q.shape[1],
                k_all.shape[1])


def _gathered_fwd(plan: _Plan, gmap, q, k_all, v_all, seg_q, seg_k_all):
    hop = _gathered_hop(plan, gmap, q, k_all, seg_q, seg_k_all)
    out, stat = _hop_forward(plan, hop, q, k_all, v_all, seg_q, seg_k_all)
    return (out, stat), (gmap, q, k_all, v_all, seg_q, seg_k_all, out, stat)


def _gathered_bwd(plan: _Plan, res, cotangents):
    gmap, q, k_all, v_all, seg_q, seg_k_all, out, stat = res
    d_out, d_stat = (c.astype(F32) for c in cotangents)
    hop = _gathered_hop(plan, gmap, q, k_all, seg_q, seg_k_all)
    dq, dk, dv = _hop_backward(plan, hop, q, k_all, v_all, seg_q, seg_k_all, out, stat,
                               d_out, d_stat)
    return (None, dq.astype(q.dtype), dk.astype(k_all.dtype), dv.astype(v_all.dtype), None,
            None)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _allgather(plan: _Plan, gmap, q, k, v, seg_q, seg_k):
    gather = lambda x: None if x is None else lax.all_gather(x, plan.axis, axis=1, tiled=True)
    return _gathered(plan, gmap, q, gather(k), gather(v), seg_q, gather(seg_k))


# ------------------------------------------------------------------------------------------------
# Public entry point.
# ------------------------------------------------------------------------------------------------
def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh
    get_mesh = getattr(jax.sharding, "get_mesh", None)  # a concrete mesh set outside jit
    mesh = get_mesh() if get_mesh is not None else None
    return None if mesh is None or mesh.empty else mesh


def axis_size(axis) -> int:
    """Size of mesh axis ``axis`` of the current mesh (``jax.set_mesh``); ValueError if absent."""
    mesh = _current_mesh()
    if mesh is None:
        raise ValueError(f"context_axis={axis!r} needs a current mesh: call under "
                         "jax.set_mesh(mesh) with a mesh that has that axis")
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise ValueError(f"context_axis={axis!r} is not an axis of the current mesh; its axes "
                         f"are {tuple(mesh.axis_names)} (sizes {dict(mesh.shape)})")
    return int(mesh.shape[axis])


def attention(q, k, v, *, axis: str, strategy: str = "ring", layout: str = "zigzag",
              inputs_permuted: bool = False, mask=None, bias=None, scale=None,
              normalizer="softmax", sinks=None, logits_soft_cap=None, segment_ids=None,
              return_lse=False, implementation=None, block_q: int | None = None,
              block_kv: int | None = None):
    """Context-parallel :func:`jattn.attention`: ``T`` split over mesh axis ``axis``.

    Args:
      q: ``[B, Tq, Hq, Dk]``, k: ``[B, Tk, Hkv, Dk]``, v: ``[B, Tk, Hkv, Dv]``, global arrays
        (their ``T`` dimension is split over ``axis``; any other sharding is kept).
      axis: the mesh axis (of ``jax.sharding.get_abstract_mesh()``) that splits the sequence.
      strategy: ``"ring"`` (K/V rotate, O(T / n) memory) or ``"allgather"`` (K/V gathered).
      layout: ``"zigzag"`` (causal load balance; ``T`` divisible by ``2n``) or ``"contiguous"``
        (``T`` divisible by ``n``).
      inputs_permuted: the caller already holds q/k/v/segment ids in the layout's token order
        (:func:`zigzag_permute`); the output is then returned in that order too.
      mask, scale, normalizer, sinks, logits_soft_cap, segment_ids, return_lse: as in
        :func:`jattn.attention`. Any :class:`jattn.masks.Mask` works (it is evaluated at global
        positions); dense ``mask`` arrays and ``bias`` (``[Tq, Tk]`` per device) are refused.
      implementation: ``None`` or ``"xla"`` (the per-device kernel is the blocked xla path).
      block_q, block_kv: tile sizes (must divide the per-device chunk lengths).

    Returns:
      ``[B, Tq, Hq, Dv]`` sharded like q along ``T``, and ``lse [B, Hq, Tq]`` if requested.
    """
    # jattn.attention delegates here, so import its module lazily (``jattn.attention`` the
    # package attribute is the function, hence import_module).
    attention_lib = importlib.import_module("jattn.attention")

    if strategy not in STRATEGIES:
        raise ValueError(f"context_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if implementation not in (None, "xla"):
        raise NotImplementedError(
            f"context-parallel attention runs the blocked 'xla' kernel per device; "
            f"implementation={implementation!r} is not supported with context_axis")
    if bias is not None:
        raise ValueError("bias is not supported with context_axis (a dense [B, H, Tq, Tk] array "
                         "is not split along the sequence); use a jattn.masks.Mask for masking")
    if mask is not None and not isinstance(mask, Mask):
        raise ValueError("mask must be a jattn.masks.Mask (or None) with context_axis; a dense "
                         "bool array cannot be split along the sequence: wrap it with "
                         "jattn.masks.from_array")
    n = axis_size(axis)
    spec, _, sinks, _, seg_q, seg_k = attention_lib._prepare(
        q, k, v, mask=mask, bias=None, scale=scale, normalizer=normalizer, sinks=sinks,
        logits_soft_cap=logits_soft_cap, segment_ids=segment_ids, return_lse=return_lse,
        implementation=None)
    if spec.normalizer.rowwise is not None:  # neither an lse merge nor a sum across hops
        raise NotImplementedError(f"normalizer={spec.normalizer.name!r} is not supported with "
                                  "context_axis (softmax, sigmoid, relu are)")
    plan = _make_plan(spec._replace(has_sinks=False), axis, n, layout, block_q, block_kv)
    zigzag = layout == "zigzag" and not inputs_permuted
    # The mask's block map over the global sequence, a trace-time constant (evaluated out here:
    # inside the partially manual shard_map, compile-time evaluation trips over its sharding).
    gmap = jnp.asarray(_global_block_map(plan))

    def per_device(gmap, q, k, v, seg_q, seg_k):
        if zigzag:
            q, k, v = (_to_zigzag(x, axis, n, 1) for x in (q, k, v))
            seg_q, seg_k = (None if s is None else _to_zigzag(s, axis, n, 1)
                            for s in (seg_q, seg_k))
        run = _ring if strategy == "ring" else _allgather
        out, stat = run(plan, gmap, q, k, v, seg_q, seg_k)
        if zigzag:
            out, stat = _from_zigzag(out, axis, n, 1), _from_zigzag(stat, axis, n, 2)
        return out, stat

    seq, seq2 = P(None, axis), P(None, None, axis)
    seg_spec = None if seg_q is None else seq
    out, stat = jax.shard_map(
        per_device, in_specs=(P(), seq, seq, seq, seg_spec, seg_spec), out_specs=(seq, seq2),
        axis_names=frozenset({axis}), check_vma=False)(gmap, q, k, v, seg_q, seg_k)
    if sinks is not None:  # the sink joins the denominator once: a final log-sum-exp merge
        sink = sinks.astype(F32)[None, :, None]
        lse = jnp.logaddexp(stat, sink)
        out = out * jnp.swapaxes(jnp.exp(stat - lse), 1, 2)[..., None]
        stat = lse
    out = out.astype(q.dtype)
    return (out, stat) if return_lse else out
