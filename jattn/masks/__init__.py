"""Composable attention masks: predicates over (query index, key index[, head]).

A :class:`Mask` answers ``visible(q_idx, kv_idx, head, q_len, kv_len) -> bool`` for integer
index arrays that broadcast against each other. Masks are immutable, hashable and compared
structurally, so they can be static arguments of ``jax.jit`` and ``custom_vjp`` (building
``causal()`` twice does not recompile). They combine with ``&``, ``|`` and ``~``.

Two views are derived from the predicate:

* ``dense(q_len, kv_len)``: a bool ``[Tq, Tk]`` array (``[H, Tq, Tk]`` when per-head).
* ``block_map(q_len, kv_len, block_q, block_kv)``: int8 ``[nq, nk]`` (or ``[H, nq, nk]``)
  with ``0`` = empty, ``1`` = partial, ``2`` = full, over the grid padded up to whole blocks.
  Positions past ``q_len``/``kv_len`` are never visible, so a block that straddles the end of
  the sequence is at most partial. Empty and full are always exact claims (a kernel may skip an
  empty block and drop the mask on a full one); "partial" may be conservative. Structured masks
  compute it from interval arithmetic on block corners (O(nq * nk)); the rest evaluate the
  predicate one query block at a time (O(Tq * Tk) integer ops, O(block_q * Tk) memory). Both are
  plain ``jnp`` and jittable.

Query/key alignment when ``Tq != Tk``: the query at row ``i`` sits at key position
``i + Tk - Tq`` (end-aligned, as in decoding with a KV cache). ``causal``, ``local``,
``sliding_window``, ``chunked`` and ``prefix_lm`` use that aligned position.

Kernels receive plain arrays and functions: ``block_map`` and ``index_fn(q_len, kv_len)``, which
returns ``f(q_idx, kv_idx, head) -> bool`` built from ``jnp`` integer ops only (usable from
iota inside a Pallas kernel).

Layout: ``_base`` (the :class:`Mask` class, block-map views, ``&``/``|``/``~``), ``_sequence``
(1-D constructors), ``_grid`` (grid constructors),
``_long_context`` (A-shape, vertical-slash), ``_intmath`` (TPU-lowerable floor division);
block-map codes and segment block maps come from :mod:`pallas_kernels.block_map`.
"""


from jattn.masks._base import Mask, _evaluate_blocks  # noqa: F401 (kept at the old path)
from jattn.masks._grid import cross_shaped, grid_windows, neighborhood, with_prefix_tokens

# Integer helpers stay importable here for Mask subclasses elsewhere (TPU-lowerable division).
from jattn.masks._intmath import _floordiv, _mod  # noqa: F401
from jattn.masks._long_context import a_shape, vertical_slash
from jattn.masks._sequence import (
    causal,
    chunked,
    from_array,
    full,
    local,
    per_head,
    prefix_lm,
    sliding_window,
    strided,
)
from pallas_kernels.block_map import EMPTY, FULL, PARTIAL, segment_block_map

__all__ = [
    "Mask",
    "EMPTY",
    "PARTIAL",
    "FULL",
    "causal",
    "local",
    "sliding_window",
    "chunked",
    "prefix_lm",
    "strided",
    "neighborhood",
    "grid_windows",
    "with_prefix_tokens",
    "a_shape",
    "vertical_slash",
    "cross_shaped",
    "full",
    "from_array",
    "per_head",
    "segment_block_map",
]
