"""Masks over tokens of a row-major 1-3-D grid: neighborhoods (NATTEN/GNA), windows (Swin),
prefix tokens in front of a grid (ViT class/register tokens)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp

from jattn.masks._base import Mask, _check_len, _check_mask, _check_nonneg
from jattn.masks._intmath import _floordiv, _mod


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


@dataclasses.dataclass(frozen=True)
class _CrossShaped(Mask):
    """CSWin stripes on a row-major ``(rows, cols)`` grid (see :func:`cross_shaped`)."""

    grid: tuple[int, int]
    stripe_width: int
    horizontal: bool

    def _check(self, q_len, kv_len):
        n_tokens = self.grid[0] * self.grid[1]
        if q_len != n_tokens or kv_len != n_tokens:
            raise ValueError(
                f"cross_shaped mask over grid {self.grid} needs q_len = kv_len = {n_tokens}, "
                f"got q_len={q_len}, kv_len={kv_len}"
            )

    def _stripe(self, x):
        cols, w = self.grid[1], self.stripe_width
        # Horizontal stripes of w rows are runs of w * cols consecutive tokens.
        return _floordiv(x, w * cols) if self.horizontal else _floordiv(_mod(x, cols), w)

    def _visible(self, q, k, h, q_len, kv_len):
        self._check(q_len, kv_len)
        return self._stripe(q) == self._stripe(k)

    def _block_bounds(self, q0, q1, k0, k1, q_len, kv_len):
        self._check(q_len, kv_len)
        if not self.horizontal:
            return None  # column stripes wrap around rows: evaluated (exact)
        cq0, cq1, ck0, ck1 = (self._stripe(x) for x in (q0, q1, k0, k1))
        empty = (cq1 < ck0) | (ck1 < cq0)
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
        return empty, full


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


def cross_shaped(grid, stripe_width: int, orientation: str) -> Mask:
    """Cross-shaped window attention's stripes (CSWin Transformer) on a 2-D grid.

    Tokens are the cells of a ``grid = (rows, cols)`` flattened row-major (sequence length
    ``rows * cols``). ``orientation="horizontal"``: the grid is cut into stripes of
    ``stripe_width`` rows, and a query at ``(r, c)`` sees key ``(r', c')`` iff
    ``r // stripe_width == r' // stripe_width``; ``"vertical"``: stripes of ``stripe_width``
    columns, ``c // stripe_width == c' // stripe_width`` (a last, narrower stripe where the
    width does not divide the axis). CSWin gives half of the heads horizontal and half vertical
    stripes, which together form the cross: ``per_head([cross_shaped(g, w, "horizontal")] *
    (H // 2) + [cross_shaped(g, w, "vertical")] * (H // 2))``. Dong et al., "CSWin Transformer"
    (2022). Block maps are exact (closed form for horizontal stripes, evaluated for vertical).
    """
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise ValueError(f"grid must be (rows, cols), got {grid!r}")
    grid = (_check_len(grid[0], "grid"), _check_len(grid[1], "grid"))
    width = _check_len(stripe_width, "stripe_width")
    if orientation not in ("horizontal", "vertical"):
        raise ValueError(f"orientation must be 'horizontal' or 'vertical', got {orientation!r}")
    horizontal = orientation == "horizontal"
    axis_len = grid[0] if horizontal else grid[1]
    if width > axis_len:
        raise ValueError(f"stripe_width = {width} exceeds the grid's {axis_len} "
                         f"{'rows' if horizontal else 'columns'} (grid {grid})")
    return _CrossShaped(grid, width, horizontal)
