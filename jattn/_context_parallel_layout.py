"""Context-parallel layout and plan (:mod:`jattn.context_parallel`): which global chunks each
device holds (zigzag / contiguous), the zigzag permutations (outside and inside ``shard_map``),
the static per-call plan (chunk and tile sizes, the global block map) and :func:`hop_work`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn import masks as masks_lib
from jattn._common import Spec
from jattn.masks import Mask

LAYOUTS = ("zigzag", "contiguous")
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
