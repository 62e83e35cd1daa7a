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
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_map as block_map_lib
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
    "full",
    "from_array",
    "per_head",
    "segment_block_map",
]


def _floordiv(a, b: int):
    """Floor division by a positive constant from ``lax.div``/``lax.rem`` (truncating) with a
    sign fix-up: ``jnp.floor_divide`` lowers through ``sign``, which Mosaic cannot lower for a
    TPU target from a CPU host."""
    if b == 1:
        return a
    a = jnp.asarray(a)
    b_arr = jnp.asarray(b, a.dtype)
    quot = jax.lax.div(a, b_arr)
    return jnp.where((jax.lax.rem(a, b_arr) != 0) & (a < 0), quot - 1, quot)


def _mod(a, b: int):
    """``a mod b`` (non-negative for positive ``b``), consistent with :func:`_floordiv`."""
    return a - _floordiv(a, b) * b


class Mask:
    """Base class. Subclasses are frozen dataclasses implementing ``_visible``."""

    # --- predicate -----------------------------------------------------------------------------
    def _visible(self, q, k, h, q_len: int, kv_len: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _block_bounds(self, q0, q1, k0, k1, q_len: int, kv_len: int):
        """(is_empty, is_full) for blocks with index ranges [q0, q1] x [k0, k1] (inclusive).

        Returns None when the mask has no closed form; the caller then evaluates the predicate.
        Arrays broadcast as ``q0[:, None]`` against ``k0[None, :]``. Claims must be exact.
        """
        return None

    @property
    def num_heads(self) -> int | None:
        """Number of heads for per-head masks, else None (the same for every head)."""
        return None

    def visible(self, q_idx, kv_idx, head=0, *, q_len: int, kv_len: int):
        """Bool array: may query ``q_idx`` see key ``kv_idx`` (indices broadcast)."""
        return self._visible(q_idx, kv_idx, head, q_len, kv_len)

    def index_fn(self, q_len: int, kv_len: int):
        """``f(q_idx, kv_idx, head) -> bool`` including the sequence bounds, for kernels."""

        def fn(q_idx, kv_idx, head=0):
            inside = (q_idx < q_len) & (kv_idx < kv_len)
            return inside & self._visible(q_idx, kv_idx, head, q_len, kv_len)

        return fn

    # --- combinators ---------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        _check_mask(other, "other")
        return _And(self, other)

    def __or__(self, other: Mask) -> Mask:
        _check_mask(other, "other")
        return _Or(self, other)

    def __invert__(self) -> Mask:
        return _Not(self)

    # --- dense and block views -----------------------------------------------------------------
    def dense(self, q_len: int, kv_len: int):
        """Bool ``[Tq, Tk]`` (or ``[H, Tq, Tk]`` for per-head masks)."""
        q_len, kv_len = _check_len(q_len, "q_len"), _check_len(kv_len, "kv_len")
        q = jnp.arange(q_len, dtype=jnp.int32)[:, None]
        k = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
        h = self.num_heads
        if h is None:
            return jnp.broadcast_to(self._visible(q, k, 0, q_len, kv_len), (q_len, kv_len))
        hh = jnp.arange(h, dtype=jnp.int32)[:, None, None]
        return jnp.broadcast_to(self._visible(q[None], k[None], hh, q_len, kv_len),
                                (h, q_len, kv_len))

    def block_map(self, q_len: int, kv_len: int, block_q: int, block_kv: int):
        """int8 ``[nq, nk]`` (``[H, nq, nk]`` per-head): 0 empty, 1 partial, 2 full."""
        q_len, kv_len = _check_len(q_len, "q_len"), _check_len(kv_len, "kv_len")
        block_q, block_kv = _check_len(block_q, "block_q"), _check_len(block_kv, "block_kv")
        nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
        # Every input here is a Python int, so evaluate op by op now, even inside `jit`, and
        # embed the result as a constant. Traced, XLA:CPU (jaxlib 0.10.2) mis-folds the fused
        # expression: causal().block_map(9, 3, 2, 2) came out [.., [1, 0]] instead of [1, 1],
        # claiming a visible block empty.
        with jax.ensure_compile_time_eval():
            q0 = jnp.arange(nq, dtype=jnp.int32)[:, None] * block_q
            k0 = jnp.arange(nk, dtype=jnp.int32)[None, :] * block_kv
            q1 = jnp.minimum(q0 + block_q, q_len) - 1
            k1 = jnp.minimum(k0 + block_kv, kv_len) - 1
            empty, full = self._bounds_or_eval(q0, q1, k0, k1, q_len, kv_len, block_q, block_kv)
            # Blocks that run past the sequence end contain invisible padding: never "full".
            padded = (q0 + block_q > q_len) | (k0 + block_kv > kv_len)
            return block_map_lib.classify(empty, full & ~padded)

    def _bounds_or_eval(self, q0, q1, k0, k1, q_len, kv_len, block_q, block_kv):
        bounds = self._block_bounds(q0, q1, k0, k1, q_len, kv_len)
        if bounds is not None:
            return bounds
        return _evaluate_blocks(self, q_len, kv_len, block_q, block_kv)


def _evaluate_blocks(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int):
    """Exact (empty, full) per block by evaluating the predicate one query block at a time."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    heads = mask.num_heads
    hh = 0 if heads is None else jnp.arange(heads, dtype=jnp.int32)[:, None, None]
    k = jnp.arange(nk * block_kv, dtype=jnp.int32)[None, :]
    if heads is not None:
        k = k[None]

    def one_block(i):
        q = i * block_q + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        if heads is not None:
            q = q[None]
        vis = mask._visible(q, k, hh, q_len, kv_len) & (q < q_len) & (k < kv_len)
        shape = (heads,) if heads is not None else ()
        vis = jnp.broadcast_to(vis, shape + (block_q, nk * block_kv))
        vis = vis.reshape(shape + (block_q, nk, block_kv))
        return jnp.any(vis, axis=(-3, -1)), jnp.all(vis, axis=(-3, -1))

    anyv, allv = jax.lax.map(one_block, jnp.arange(nq, dtype=jnp.int32))
    if heads is not None:  # [nq, H, nk] -> [H, nq, nk]
        anyv, allv = jnp.moveaxis(anyv, 0, 1), jnp.moveaxis(allv, 0, 1)
    return ~anyv, allv


def _check_mask(m, name):
    if not isinstance(m, Mask):
        raise TypeError(f"{name} must be a jattn.masks.Mask, got {type(m).__name__}")


def _check_len(n, name):
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(n)


def _check_nonneg(n, name):
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _num_heads(*masks: Mask) -> int | None:
    hs = {m.num_heads for m in masks if m.num_heads is not None}
    if len(hs) > 1:
        raise ValueError(f"per-head masks disagree on the number of heads: {sorted(hs)}")
    return hs.pop() if hs else None


# ------------------------------------------------------------------------------------------------
# Combinators. Block claims compose soundly (AND is empty if either side is, full if both are;
# OR the reverse) but not always exactly: a block that only the union makes full, or only the
# intersection makes empty, is claimed partial, which kernels handle correctly.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Binary(Mask):
    """``a OP b`` for the elementwise bool op ``_op``; block claims combine with ``_claims``."""

    a: Mask
    b: Mask

    def __post_init__(self):
        _num_heads(self.a, self.b)

    @property
    def num_heads(self):
        return _num_heads(self.a, self.b)

    @staticmethod
    def _op(x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _claims(ea, fa, eb, fb):  # pragma: no cover - abstract
        raise NotImplementedError

    def _visible(self, q, k, h, q_len, kv_len):
        return self._op(self.a._visible(q, k, h, q_len, kv_len),
                        self.b._visible(q, k, h, q_len, kv_len))

    def _bounds_or_eval(self, q0, q1, k0, k1, q_len, kv_len, bq, bk):
        ea, fa = self.a._bounds_or_eval(q0, q1, k0, k1, q_len, kv_len, bq, bk)
        eb, fb = self.b._bounds_or_eval(q0, q1, k0, k1, q_len, kv_len, bq, bk)
        return self._claims(ea, fa, eb, fb)


@dataclasses.dataclass(frozen=True)
class _And(_Binary):
    _op = staticmethod(operator.and_)

    @staticmethod
    def _claims(ea, fa, eb, fb):  # empty if either side is, full if both are
        return ea | eb, fa & fb


@dataclasses.dataclass(frozen=True)
class _Or(_Binary):
    _op = staticmethod(operator.or_)

    @staticmethod
    def _claims(ea, fa, eb, fb):  # empty if both sides are, full if either is
        return ea & eb, fa | fb


@dataclasses.dataclass(frozen=True)
class _Not(Mask):
    a: Mask

    @property
    def num_heads(self):
        return self.a.num_heads

    def _visible(self, q, k, h, q_len, kv_len):
        return ~self.a._visible(q, k, h, q_len, kv_len)

    def _bounds_or_eval(self, q0, q1, k0, k1, q_len, kv_len, bq, bk):
        e, f = self.a._bounds_or_eval(q0, q1, k0, k1, q_len, kv_len, bq, bk)
        return f, e


# ------------------------------------------------------------------------------------------------
# Structured masks with closed-form block maps.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Full(Mask):
    def _visible(self, q, k, h, q_len, kv_len):
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        return jnp.zeros(shape, bool), jnp.ones(shape, bool)


@dataclasses.dataclass(frozen=True)
class _Local(Mask):
    """``i' - left <= j <= i' + right`` with ``i' = i + Tk - Tq``; None = unbounded side."""

    left: int | None
    right: int | None

    def _visible(self, q, k, h, q_len, kv_len):
        qa = q + (kv_len - q_len)
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
        if self.left is not None:
            ok = ok & (k >= qa - self.left)
        if self.right is not None:
            ok = ok & (k <= qa + self.right)
        return ok

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        off = kv_len - q_len
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.zeros(shape, bool)
        full = jnp.ones(shape, bool)
        if self.left is not None:
            empty = empty | (k1 < q0 + off - self.left)
            full = full & (k0 >= q1 + off - self.left)
        if self.right is not None:
            empty = empty | (k0 > q1 + off + self.right)
            full = full & (k1 <= q0 + off + self.right)
        return empty, full


@dataclasses.dataclass(frozen=True)
class _Chunked(Mask):
    size: int

    def _visible(self, q, k, h, q_len, kv_len):
        return _floordiv(q + (kv_len - q_len), self.size) == _floordiv(k, self.size)

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        off, s = kv_len - q_len, self.size
        cq0, cq1 = _floordiv(q0 + off, s), _floordiv(q1 + off, s)
        ck0, ck1 = _floordiv(k0, s), _floordiv(k1, s)
        empty = (cq1 < ck0) | (ck1 < cq0)
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
        return empty, full


@dataclasses.dataclass(frozen=True)
class _KeyPrefix(Mask):
    """``j < length``: keys of a fixed prefix."""

    length: int

    def _visible(self, q, k, h, q_len, kv_len):
        return jnp.broadcast_to(k < self.length, jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)))

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        return (jnp.broadcast_to(k0 >= self.length, shape),
                jnp.broadcast_to(k1 < self.length, shape))


@dataclasses.dataclass(frozen=True)
class _Strided(Mask):
    stride: int
    offset: int

    def _visible(self, q, k, h, q_len, kv_len):
        vis = _mod(k, self.stride) == self.offset
        return jnp.broadcast_to(vis, jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)))

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        # Keys j in [k0, k1] with j % stride == offset exist iff the first such j >= k0 is <= k1.
        s, o = self.stride, self.offset
        first = k0 + _mod(o - _mod(k0, s), s)
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.broadcast_to(first > k1, shape)
        full = jnp.broadcast_to((s == 1) | ((k0 == k1) & (first == k0)), shape)
        return empty, full


@dataclasses.dataclass(frozen=True, eq=False)
class _FromArray(Mask):
    """A fixed bool ``[Tq, Tk]`` or ``[H, Tq, Tk]`` array. Hashed by identity of the array."""

    array: object

    def __eq__(self, other):
        return isinstance(other, _FromArray) and other.array is self.array

    def __hash__(self):
        return id(self.array)

    @property
    def num_heads(self):
        return self.array.shape[0] if self.array.ndim == 3 else None

    def _visible(self, q, k, h, q_len, kv_len):
        arr = jnp.asarray(self.array)
        if arr.shape[-2:] != (q_len, kv_len):
            raise ValueError(
                f"from_array mask has shape {tuple(arr.shape)}; expected [..., {q_len}, {kv_len}]"
                " ([Tq, Tk] or [H, Tq, Tk]) for this call"
            )
        qc = jnp.clip(q, 0, q_len - 1)
        kc = jnp.clip(k, 0, kv_len - 1)
        if arr.ndim == 3:
            return arr[h, qc, kc]
        return arr[qc, kc]


@dataclasses.dataclass(frozen=True)
class _PerHead(Mask):
    masks: tuple[Mask, ...]

    @property
    def num_heads(self):
        return len(self.masks)

    def _visible(self, q, k, h, q_len, kv_len):
        out = self.masks[0]._visible(q, k, h, q_len, kv_len)
        for i, m in enumerate(self.masks[1:], start=1):
            out = jnp.where(h == i, m._visible(q, k, h, q_len, kv_len), out)
        return out

    def _bounds_or_eval(self, q0, q1, k0, k1, q_len, kv_len, bq, bk):
        parts = [m._bounds_or_eval(q0, q1, k0, k1, q_len, kv_len, bq, bk) for m in self.masks]
        shape = jnp.broadcast_shapes(q0.shape, k0.shape)
        empty = jnp.stack([jnp.broadcast_to(e, shape) for e, _ in parts])
        full = jnp.stack([jnp.broadcast_to(f, shape) for _, f in parts])
        return empty, full


@dataclasses.dataclass(frozen=True)
class _Neighborhood(Mask):
    """NATTEN / GNA neighborhoods on a row-major grid (see :func:`neighborhood`)."""

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]

    def _visible(self, q, k, h, q_len, kv_len):
        n_tokens = math.prod(self.shape)
        if q_len != n_tokens or kv_len != n_tokens:
            raise ValueError(
                f"neighborhood mask over grid {self.shape} needs q_len = kv_len = {n_tokens}, "
                f"got q_len={q_len}, kv_len={kv_len}"
            )
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
        q_rest, k_rest = q, k
        # Unflatten row-major: last axis varies fastest.
        for ax in reversed(range(len(self.shape))):
            n = self.shape[ax]
            qx, kx = _mod(q_rest, n), _mod(k_rest, n)
            q_rest, k_rest = _floordiv(q_rest, n), _floordiv(k_rest, n)
            ok = ok & _axis_window(qx, kx, n, self.kernel_size[ax], self.dilation[ax],
                                   self.stride[ax], self.causal[ax])
        return ok


@dataclasses.dataclass(frozen=True)
class _GridWindows(Mask):
    """Non-overlapping windows on a row-major grid (see :func:`grid_windows`)."""

    shape: tuple[int, ...]
    size: tuple[int, ...]

    def _visible(self, q, k, h, q_len, kv_len):
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
        q_rest, k_rest = q, k
        for n, w in zip(reversed(self.shape), reversed(self.size), strict=True):
            same = _floordiv(_mod(q_rest, n), w) == _floordiv(_mod(k_rest, n), w)
            ok = ok & same
            q_rest, k_rest = _floordiv(q_rest, n), _floordiv(k_rest, n)
        return ok


@dataclasses.dataclass(frozen=True)
class _WithPrefixTokens(Mask):
    """``inner`` on the tokens after ``n`` prefix tokens (see :func:`with_prefix_tokens`)."""

    inner: Mask
    n: int

    @property
    def num_heads(self):
        return self.inner.num_heads

    def _visible(self, q, k, h, q_len, kv_len):
        inner = self.inner._visible(jnp.maximum(q - self.n, 0), jnp.maximum(k - self.n, 0), h,
                                    q_len - self.n, kv_len - self.n)
        return (q < self.n) | (k < self.n) | inner


def _axis_window(qx, kx, n: int, kernel: int, dilation: int, stride: int, is_causal: bool):
    """Is key coordinate ``kx`` inside query coordinate ``qx``'s window along one axis.

    Coordinates split into ``dilation`` groups by ``x % dilation``; a query sees only keys of
    its own group. Within a group of ``m`` positions the query's index is ``qi = qx // d``.
    With ``stride > 1`` the window is that of the stride group's leader, the centre of
    ``[s * (qi // s), s * (qi // s) + s - 1]`` clipped to the group (GNA). Non-causal windows
    are ``[start, start + kernel)`` with ``start = clip(qi - kernel // 2, 0, m - kernel)``, so
    every query sees exactly ``kernel`` keys; causal windows are ``[qi - kernel + 1, qi]``
    intersected with the group (the query itself, never its leader, bounds what it may see).
    """
    d = dilation
    gq, gk = _mod(qx, d), _mod(kx, d)
    qi, ki = _floordiv(qx, d), _floordiv(kx, d)
    m = _floordiv(n - gq + d - 1, d)  # positions in this dilation group
    lead = qi
    if stride > 1:
        lead = jnp.minimum(_floordiv(qi, stride) * stride + (stride - 1) // 2, m - 1)
    if is_causal:
        lo = lead - kernel + 1
        hi = jnp.minimum(lead, qi)
    else:
        lo = jnp.clip(lead - kernel // 2, 0, m - kernel)
        hi = lo + kernel - 1
    return (gq == gk) & (ki >= lo) & (ki <= hi)


# ------------------------------------------------------------------------------------------------
# Public constructors.
# ------------------------------------------------------------------------------------------------
def full() -> Mask:
    """Every key visible to every query."""
    return _Full()


def causal() -> Mask:
    """``j <= i + Tk - Tq`` (end-aligned causal)."""
    return _Local(None, 0)


def local(left: int | None, right: int | None) -> Mask:
    """``i' - left <= j <= i' + right`` (``None`` leaves that side unbounded)."""
    left = None if left is None else _check_nonneg(left, "left")
    right = None if right is None else _check_nonneg(right, "right")
    return _Local(left, right)


def sliding_window(size: int) -> Mask:
    """``causal() & local(size - 1, 0)``: each query sees itself and ``size - 1`` keys before."""
    size = _check_len(size, "size")
    return _Local(size - 1, 0)


def chunked(size: int) -> Mask:
    """``i' // size == j // size`` (block-diagonal chunks of ``size`` tokens)."""
    return _Chunked(_check_len(size, "size"))


def prefix_lm(prefix_len: int) -> Mask:
    """``j < prefix_len or j <= i'``: bidirectional prefix, causal after it."""
    return _KeyPrefix(_check_nonneg(prefix_len, "prefix_len")) | causal()


def strided(stride: int, offset: int = 0) -> Mask:
    """``j % stride == offset`` (S2-Attention-style shard; combine per head with per_head)."""
    stride = _check_len(stride, "stride")
    offset = _check_nonneg(offset, "offset")
    if offset >= stride:
        raise ValueError(f"offset must be in [0, stride={stride}), got {offset}")
    return _Strided(stride, offset)


def from_array(mask) -> Mask:
    """A fixed bool array ``[Tq, Tk]`` or ``[H, Tq, Tk]`` (True = visible)."""
    arr = mask if isinstance(mask, jax.Array) else np.asarray(mask)
    if arr.dtype != bool:
        raise TypeError(f"mask must be a bool array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"mask must have shape [Tq, Tk] or [H, Tq, Tk], got {tuple(arr.shape)}")
    return _FromArray(arr)


def per_head(masks: Sequence[Mask]) -> Mask:
    """Head ``h`` uses ``masks[h]``; ``dense`` and ``block_map`` gain a leading head axis."""
    masks = tuple(masks)
    if not masks:
        raise ValueError("per_head needs at least one mask")
    for i, m in enumerate(masks):
        _check_mask(m, f"masks[{i}]")
        if m.num_heads is not None:
            raise ValueError(f"masks[{i}] is already per-head; per_head takes shared masks")
    return _PerHead(masks)


def _per_axis(value, ndim: int, name: str, check):
    vals = tuple(value) if isinstance(value, Sequence) else (value,) * ndim
    if len(vals) != ndim:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    return tuple(check(v, name) for v in vals)


def neighborhood(shape, kernel_size, dilation=1, stride=1, causal=False) -> Mask:
    """Neighborhood attention (NATTEN; GNA with ``stride``) on a row-major grid.

    Tokens are the cells of a grid of ``shape`` (1-D, 2-D or 3-D) flattened row-major, so the
    sequence length must be ``prod(shape)``. A query sees a key iff on every axis the key lies
    in the query's window: ``kernel_size`` positions of the query's dilation group, clamped
    at the borders so each query sees exactly ``kernel_size`` keys per axis; ``stride`` makes
    queries of a stride group share their leader's window; ``causal`` (per axis) keeps only keys
    at or before the query. Hassani et al., "Neighborhood Attention Transformer" (2023),
    "Dilated Neighborhood Attention Transformer" (2022), "Generalized Neighborhood Attention"
    (2025).
    """
    shape = tuple(shape) if isinstance(shape, Sequence) else (shape,)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape must have 1 to 3 axes, got {shape!r}")
    shape = tuple(_check_len(s, "shape") for s in shape)
    nd = len(shape)
    kernel = _per_axis(kernel_size, nd, "kernel_size", _check_len)
    dil = _per_axis(dilation, nd, "dilation", _check_len)
    strd = _per_axis(stride, nd, "stride", _check_len)
    caus = tuple(bool(c) for c in (causal if isinstance(causal, Sequence) else (causal,) * nd))
    if len(caus) != nd:
        raise ValueError(f"causal must be a bool or a tuple of {nd} bools, got {causal!r}")
    for ax in range(nd):
        if kernel[ax] * dil[ax] > shape[ax]:
            raise ValueError(
                f"kernel_size * dilation on axis {ax} is {kernel[ax]} * {dil[ax]} = "
                f"{kernel[ax] * dil[ax]}, larger than the axis length shape[{ax}] = {shape[ax]}"
            )
        if strd[ax] > kernel[ax]:
            raise ValueError(f"stride[{ax}] = {strd[ax]} must not exceed kernel_size[{ax}]")
    return _Neighborhood(shape, kernel, dil, strd, caus)


def grid_windows(shape, window_size) -> Mask:
    """Non-overlapping window attention on a row-major grid (Swin / ViTDet-style windows).

    Tokens are the cells of a grid of ``shape`` (1-D, 2-D or 3-D) flattened row-major, so the
    sequence length is ``prod(shape)``. The grid is cut into windows of ``window_size`` cells per
    axis (an int or one per axis; a last, smaller window where it does not divide the axis); a
    query at grid coordinate ``x`` sees key ``y`` iff ``x_a // w_a == y_a // w_a`` on every axis
    ``a``. Liu et al., "Swin Transformer" (2021); Li et al., "Exploring Plain Vision Transformer
    Backbones for Object Detection" (ViTDet, 2022). Block maps are exact (evaluated).
    """
    shape = tuple(shape) if isinstance(shape, Sequence) else (shape,)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape must have 1 to 3 axes, got {shape!r}")
    shape = tuple(_check_len(s, "shape") for s in shape)
    size = _per_axis(window_size, len(shape), "window_size", _check_len)
    return _GridWindows(shape, size)


def with_prefix_tokens(mask: Mask, num_tokens: int) -> Mask:
    """``mask`` on the tokens after ``num_tokens`` prefix tokens, which see and are seen by all.

    For a grid mask (:func:`neighborhood`, :func:`grid_windows`) behind a ViT's class token (or
    register tokens): query ``i`` sees key ``j`` iff ``i < n`` or ``j < n`` or
    ``mask(i - n, j - n)`` on sequences shortened by ``n``. ``num_tokens = 0`` returns ``mask``.
    Block maps are exact (evaluated).
    """
    _check_mask(mask, "mask")
    n = _check_nonneg(num_tokens, "num_tokens")
    return mask if n == 0 else _WithPrefixTokens(mask, n)
