"""The :class:`Mask` base class, its block-map views and the ``&``/``|``/``~`` algebra."""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_map as block_map_lib


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
