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

Modules: the layout and static plan in :mod:`jattn._context_parallel_layout`, one hop and the
merge in :mod:`jattn._context_parallel_hop`; the ring, the all-gather and the entry point here.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jattn._context_parallel_hop import (
    F32,
    _empty_acc,
    _finish,
    _hop,
    _hop_backward,
    _hop_forward,
    _merge,
)
from jattn._context_parallel_layout import (
    LAYOUTS,
    _device_chunks,
    _from_zigzag,
    _global_block_map,
    _make_plan,
    _Plan,
    _to_zigzag,
    hop_work,
    zigzag_indices,
    zigzag_permute,
    zigzag_unpermute,
)
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
    # jit: called eagerly, a partial-manual shard_map rejects its own out_specs (jax 0.10);
    # under an outer jit this one is inlined.
    out, stat = jax.jit(jax.shard_map(
        per_device, in_specs=(P(), seq, seq, seq, seg_spec, seg_spec), out_specs=(seq, seq2),
        axis_names=frozenset({axis}), check_vma=False))(gmap, q, k, v, seg_q, seg_k)
    if sinks is not None:  # the sink joins the denominator once: a final log-sum-exp merge
        sink = sinks.astype(F32)[None, :, None]
        lse = jnp.logaddexp(stat, sink)
        out = out * jnp.swapaxes(jnp.exp(stat - lse), 1, 2)[..., None]
        stat = lse
    out = out.astype(q.dtype)
    return (out, stat) if return_lse else out
