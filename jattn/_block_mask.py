"""Run-time (data-dependent) block sparsity: ``jattn.attention(..., block_mask=bm)``.

``bm`` is bool (or 0/1 int) ``[B, Hq, nq, nk]`` at the block sizes
:func:`attention_block_sizes` documents for the implementation that runs: query block ``i``
of head ``h`` in batch ``b`` may see key block ``j`` only if ``bm[b, h, i, j]``. It is ANDed
with every other mask (mask object, bool mask, segment ids) and may be traced: a new map does
not recompile. Every implementation skips the empty blocks (the reference applies the dense
expansion ``bm[b, h, i // block_q, j // block_kv]`` as a mask).
"""

from __future__ import annotations

import jax.numpy as jnp

from jattn import _dispatch

__all__ = ["attention_block_sizes", "check", "expand", "selection_mask"]


def attention_block_sizes(q_len: int, kv_len: int,
                          implementation: str | None = None) -> tuple[int, int]:
    """``(block_q, block_kv)`` at which ``jattn.attention`` reads a ``block_mask``.

    ``"reference"`` and ``"xla"`` use the blocked path's tiles (512, clamped to the sequence);
    ``"pallas"`` the flash kernel's (128, clamped to a power of two >= 8/16 for short
    sequences); ``None`` those of the implementation ``None`` picks: the kernel's on GPU/TPU,
    else the xla ones. A call that falls back from the kernel keeps the kernel's sizes (the
    blocked path runs at any tile size), so a map made for ``None`` is always valid.
    """
    from jattn import _blocked, _pallas_dispatch  # noqa: PLC0415 (import cycle)

    for name, n in (("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if implementation not in (None, "reference", "xla", "pallas"):
        raise ValueError("implementation must be None, 'reference', 'xla' or 'pallas', got "
                         f"{implementation!r}")
    if implementation == "pallas" or (implementation is None and _dispatch.on_accelerator()):
        return _pallas_dispatch.kernel_block_sizes(q_len, kv_len)
    return _blocked.default_block_sizes(q_len, kv_len)


def check(block_mask, b: int, hq: int, tq: int, tk: int, block_q: int, block_kv: int):
    """Validate ``block_mask`` and return it as bool ``[B|1, Hq|1, nq, nk]``."""
    nq, nk = max(1, -(-tq // block_q)), max(1, -(-tk // block_kv))
    want = (f"[B={b}, Hq={hq}, nq={nq}, nk={nk}] (blocks of {block_q} x {block_kv}: "
            "jattn.attention_block_sizes)")
    if not (hasattr(block_mask, "shape") and hasattr(block_mask, "dtype")):
        raise TypeError(f"block_mask must be a bool or int array {want}, got "
                        f"{type(block_mask).__name__}")
    bm = jnp.asarray(block_mask)
    if not (bm.dtype == jnp.bool_ or jnp.issubdtype(bm.dtype, jnp.integer)):
        raise TypeError(f"block_mask must be a bool or int array {want}, got dtype {bm.dtype}")
    if bm.ndim != 4 or bm.shape[2:] != (nq, nk) or bm.shape[0] not in (1, b) \
            or bm.shape[1] not in (1, hq):
        raise ValueError(f"block_mask must have shape {want}, got {tuple(bm.shape)}")
    return bm != 0 if bm.dtype != jnp.bool_ else bm


def with_dense(dense, block_mask, tq: int, tk: int, block_q: int, block_kv: int):
    """``dense & expand(block_mask)`` (``dense`` may be None): the reference's view of it."""
    full = expand(block_mask, tq, tk, block_q, block_kv)
    return full if dense is None else dense & full


def expand(block_mask, tq: int, tk: int, block_q: int, block_kv: int):
    """Dense bool ``[B|1, Hq|1, Tq, Tk]``: ``block_mask[b, h, i // block_q, j // block_kv]``."""
    rows = jnp.arange(tq) // block_q
    cols = jnp.arange(tk) // block_kv
    return block_mask[:, :, rows][:, :, :, cols]


def selection_mask(indices, valid, kv_len: int):
    """Dense bool ``[..., S]`` of a selection ``indices, valid [..., k]``: True at the valid
    selected entries (for tokens, ``[B, T, S]``, the reference form
    ``jattn.attention(q, k, v, mask=selection_mask(...)[:, None])``).

    A scatter: ``O(... S)`` memory. (A one-hot ``[..., k, S]`` reduced over ``k`` needs
    ``k`` times more: 137 GB for DSA's 2048 of 8192 tokens.) ``indices`` are distinct along
    the last axis (as ``lax.top_k`` returns them)."""
    lead = indices.shape[:-1]
    idx = indices.reshape(-1, indices.shape[-1])
    ok = jnp.broadcast_to(valid, indices.shape).reshape(idx.shape)
    rows = jnp.arange(idx.shape[0])[:, None]
    out = jnp.zeros((idx.shape[0], kv_len), bool).at[rows, idx].set(ok)
    return out.reshape(lead + (kv_len,))
