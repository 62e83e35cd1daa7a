"""Block maps: which (query block, key block) tiles of an attention matrix need work.

A block map is an integer array ``[..., n_rows, n_cols]`` over the sequences padded up to whole
blocks, with :data:`EMPTY` (0: nothing visible, skip the tile), :data:`PARTIAL` (1: evaluate
the mask) and :data:`FULL` (2: everything visible, drop the mask). Empty and full are exact
claims; partial may be conservative. Padding is never visible, so a block that runs past the
end of a sequence is at most partial. This is splash attention's mask -> block info -> kernel
split (JAX's ``pallas/ops/tpu/splash_attention``): ``jattn.masks`` builds maps from mask
predicates, the ``"xla"`` blocked path and the Pallas flash kernels consume them through
:func:`compact`.

Builders here: :func:`classify` (from exact empty/full claims), :func:`segment_block_map`
(document masks from segment ids), :func:`dense_block_map` (explicit bool masks),
:func:`default_block_map`, :func:`normalize_block_map` (validate a user map for a kernel),
:func:`intersect` and :func:`collapse` (AND of several maps; one map for all batches/heads).

:func:`compact` turns each row into the sorted list of its non-empty columns (splash's
``data_next``). When the map is known at trace time (every ``jattn.masks`` mask: its block map
is computed from Python ints) the lists are built on the host with numpy and enter the
computation as constants. Built with ``jnp`` instead, XLA would constant-fold an ``argsort`` of
the whole map at compile time: 10-20 s for the ``512 x 512`` map of a 64K sequence (issue 21).
Traced (data-dependent) maps, e.g. from segment ids, take the ``jnp`` path.

Depends on jax and numpy only (``pallas_kernels`` never imports ``jattn``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "num_blocks", "concrete", "classify", "segment_block_map",
    "dense_block_map", "default_block_map", "normalize_block_map", "intersect", "collapse",
    "transpose", "static_width", "compact", "compact_host", "compact_traced",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

#: ``entry = column * KIND_RADIX + kind`` in compacted lists.
KIND_RADIX = 4


def num_blocks(length: int, block: int) -> int:
    """Blocks of size ``block`` covering ``length`` positions (the last one may be padded)."""
    return -(-length // block)


def concrete(x) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known at trace time, else None."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _xp(*arrays):
    """numpy when every array is concrete (compute on the host), else jax.numpy."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def classify(empty, full):
    """int8 block map from exact claims: EMPTY where ``empty``, else FULL where ``full``, else
    PARTIAL. Stays numpy for numpy inputs."""
    xp = _xp(empty, full)
    return xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int8)


def segment_block_map(seg_q, seg_k, block_q: int, block_kv: int):
    """int8 ``[B, nq, nk]`` block map of the document mask ``seg_q[b, i] == seg_k[b, j]``.

    ``seg_q [B, Tq]``, ``seg_k [B, Tk]`` integer ids. Exact claims from per-block id ranges
    (padding repeats the edge id, so it never widens a range): empty when the ranges of the two
    blocks do not intersect, full when both blocks hold one and the same id and no padding.
    """
    b, tq = seg_q.shape
    tk = seg_k.shape[1]
    nq, nk = num_blocks(tq, block_q), num_blocks(tk, block_kv)

    def ranges(seg, n, blk):
        pad = n * blk - seg.shape[1]
        s = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge").reshape(b, n, blk)
        return s.min(-1), s.max(-1)

    qlo, qhi = ranges(seg_q, nq, block_q)
    klo, khi = ranges(seg_k, nk, block_kv)
    empty = (qhi[:, :, None] < klo[:, None, :]) | (khi[:, None, :] < qlo[:, :, None])
    full = ((qlo == qhi)[:, :, None] & (klo == khi)[:, None, :]
            & (qlo[:, :, None] == klo[:, None, :]))
    # Blocks running past the sequence end hold padding: at most partial.
    q_whole = (jnp.arange(nq) < nq - 1) | (nq * block_q == tq)
    k_whole = (jnp.arange(nk) < nk - 1) | (nk * block_kv == tk)
    full = full & q_whole[None, :, None] & k_whole[None, None, :]
    return classify(empty, full)


def dense_block_map(dense, block_q: int, block_kv: int):
    """int8 ``[..., nq, nk]`` block map of an explicit bool mask ``[..., Tq, Tk]`` (exact;
    padding counts as invisible)."""
    tq, tk = dense.shape[-2:]
    nq, nk = num_blocks(tq, block_q), num_blocks(tk, block_kv)
    pad = [(0, 0)] * (dense.ndim - 2) + [(0, nq * block_q - tq), (0, nk * block_kv - tk)]
    d = jnp.pad(dense, pad).reshape(dense.shape[:-2] + (nq, block_q, nk, block_kv))
    return classify(~d.any(axis=(-3, -1)), d.all(axis=(-3, -1)))


def default_block_map(q_len: int, kv_len: int, block_q: int, block_kv: int,
                      masked: bool) -> np.ndarray:
    """int32 ``[1, nq, nk]``: all partial when a mask function is given, else full except key
    blocks that run past ``kv_len`` (whose padded keys the kernel must mask)."""
    nq, nk = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
    bm = np.full((1, nq, nk), PARTIAL if masked else FULL, np.int32)
    if kv_len % block_kv:
        bm[..., -1] = PARTIAL
    return bm


def normalize_block_map(block_map, num_heads: int, nq: int, nk: int, kv_len: int,
                        block_kv: int):
    """Validate a user block map and return int32 ``[Hm, nq, nk]`` (Hm in {1, num_heads}).

    Key blocks that straddle the end of the sequence are demoted from full to partial so
    their padded keys are always masked. Stays numpy when the input is concrete.
    """
    arr = concrete(block_map)
    xp = np if arr is not None else jnp
    arr = arr if arr is not None else jnp.asarray(block_map)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (nq, nk) or arr.shape[0] not in (1, num_heads):
        raise ValueError(
            f"block_map must have shape [nq, nk] = [{nq}, {nk}] or [Hq, nq, nk] = "
            f"[{num_heads}, {nq}, {nk}] for these block sizes, got {tuple(np.shape(block_map))}"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TypeError(f"block_map must be an integer array (0/1/2), got dtype {arr.dtype}")
    arr = arr.astype(xp.int32)
    if kv_len % block_kv:
        last = xp.minimum(arr[..., -1:], PARTIAL)
        arr = xp.concatenate([arr[..., :-1], last], axis=-1)
    return arr


def intersect(*maps):
    """Block map of the AND of several masks: the elementwise min of their codes (broadcast).

    Sound, not always exact: two partial blocks may AND to an empty one. numpy when every map
    is concrete (None entries are skipped).
    """
    maps = [m if (c := concrete(m)) is None else c for m in maps if m is not None]
    xp = _xp(*maps)
    return functools.reduce(xp.minimum, maps)


def collapse(block_map, axes: tuple[int, ...]):
    """One map for all entries along ``axes`` (e.g. batch and heads): a block is empty only
    when empty in every entry and full only when full in every one, else partial."""
    return classify(block_map.max(axis=axes) == EMPTY, block_map.min(axis=axes) == FULL)


def transpose(block_map):
    """Swap the row and column axes (per key block, the query blocks); numpy stays numpy."""
    return _xp(block_map).swapaxes(block_map, -1, -2)


def static_width(block_map) -> int:
    """Largest number of non-empty blocks in a row (>= 1), or the full width if traced."""
    arr = concrete(block_map)
    if arr is None:
        return int(block_map.shape[-1])
    return max(1, int((arr > 0).sum(-1).max(initial=0)))


def compact(block_map, width: int | None = None):
    """Compacted lists for each row of ``block_map [..., n_rows, n_cols]``.

    Returns ``(entries [..., n_rows, width] int32, counts [..., n_rows] int32)`` with
    ``entries = column * 4 + kind``: each row holds its non-empty columns in increasing
    order, then copies of the last one with kind 0 (column 0 for an all-empty row), so a TPU
    index map that follows the list asks for the same block again (no DMA) and the kernel
    skips the step; GPU kernels and the XLA path loop exactly ``count`` times. ``width``
    (default :func:`static_width`) must be at least the largest count.

    A concrete map is compacted on the host (numpy arrays out: constants, nothing for XLA to
    fold); a traced one with ``jnp`` (a stable argsort per row).
    """
    width = static_width(block_map) if width is None else int(width)
    arr = concrete(block_map)
    if arr is not None:
        return compact_host(arr, width)
    return compact_traced(block_map, width)


def _lists(xp, bm, order, width):
    """Shared tail of both compactions: given the stable order (non-empty columns first)."""
    n = bm.shape[-1]
    nz = bm > 0
    counts = nz.sum(-1).astype(xp.int32)
    kind = xp.take_along_axis(bm, order, axis=-1)
    valid = xp.arange(n, dtype=xp.int32) < counts[..., None]
    last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = xp.where(valid, order, last)
    kind = xp.where(valid, kind, EMPTY)
    entries = (idx * KIND_RADIX + kind).astype(xp.int32)
    return entries[..., :width], counts


def compact_host(block_map, width: int):
    """:func:`compact` of a concrete map, in numpy."""
    bm = np.asarray(block_map, np.int32)
    order = np.argsort(bm <= 0, axis=-1, kind="stable").astype(np.int32)
    return _lists(np, bm, order, width)


def compact_traced(block_map, width: int):
    """:func:`compact` with ``jnp`` ops (for maps known only at run time)."""
    bm = jnp.asarray(block_map, jnp.int32)
    order = jnp.argsort(bm <= 0, axis=-1, stable=True).astype(jnp.int32)
    return _lists(jnp, bm, order, width)
