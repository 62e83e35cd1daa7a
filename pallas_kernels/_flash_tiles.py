"""Backend-neutral tile math of the flash kernels (private; see ``_flash_kernels``): the
static ``Config``, logits with score_mod / soft-cap, the visibility of a tile, the online-softmax
update, the backward tile and the block-list helpers shared by the TPU and GPU drivers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Softpick's eps (Zuhri et al. 2025), equal to ``jattn.normalizers.SOFTPICK_EPS`` (a test checks;
# pallas_kernels does not import jattn).
SOFTPICK_EPS = 1e-6
NORMALIZERS = ("softmax", "softpick")
LANES, SUBLANES = 128, 8
_NT = (((1,), (1,)), ((), ()))
_SQ = getattr(pl, "squeezed", None)  # squeezed block dim (None in older JAX)
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one flash call (hashable: custom_vjp nondiff argument)."""

    backend: str  # "tpu" | "cuda"
    interpret: bool
    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    block_q: int
    block_kv: int
    nq: int
    nk: int
    width: int  # forward / dq list width (TPU grid extent)
    width_t: int  # dk/dv list width
    map_batch: int  # 1 or B: leading dims of the block lists
    map_heads: int  # 1 or Hq
    scale: float
    soft_cap: float | None
    mask_fn: Callable | None
    has_sinks: bool
    has_segments: bool
    # score_mod(s, b, h, q_idx, kv_idx, *blocks), applied to the scaled logits before the
    # soft-cap; scalars b, h and [bq, bk] iota indices; one block per operand (see mod_axes).
    score_mod: Callable | None = None
    # Per score_mod operand: "q" (block [bq, 1]), "kv" ([1, bk]), "whole" (a small per-(b, h)
    # table, handed over as mod_lens[n] entries of [1, 1]) or "const" (the whole array).
    mod_axes: tuple = ()
    mod_lens: tuple = ()
    # "softmax" or "softpick" (row stats: see _fwd_update / _finalize)
    normalizer: str = "softmax"

    @property
    def softpick(self) -> bool:
        return self.normalizer == "softpick"

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_pad(self) -> int:
        return self.nq * self.block_q

    @property
    def kv_pad(self) -> int:
        return self.nk * self.block_kv


# ------------------------------------------------------------------------------------------
# Tile math shared by both drivers.
# ------------------------------------------------------------------------------------------
def _apply_mod(s, cfg: Config, pos, blocks):
    """``score_mod(s, b, h, q_idx, kv_idx, *blocks)`` on the tile (identity without one)."""
    if cfg.score_mod is None:
        return s
    b, h, q0, k0 = pos
    shape = (cfg.block_q, cfg.block_kv)
    # clamp padding rows/columns into the sequence, as the xla path does
    qi = jnp.minimum(q0 + lax.broadcasted_iota(jnp.int32, shape, 0), cfg.q_len - 1)
    ki = jnp.minimum(k0 + lax.broadcasted_iota(jnp.int32, shape, 1), cfg.kv_len - 1)
    return cfg.score_mod(s, b, h, qi, ki, *blocks).astype(f32)


def _logits(q, k, cfg: Config, pos, blocks=()):
    """``s = cap(score_mod(scale * q k^T))`` in fp32 and ``ds / d(scale q k^T)`` (None if 1).

    ``pos = (b, h, q0, k0)``: the tile's batch, query head and first row/column (score_mod);
    ``blocks``: the score_mod operands' blocks (see :func:`split_blocks`).
    """
    s = lax.dot_general(q, k, _NT, preferred_element_type=f32) * cfg.scale
    grad = None
    if cfg.score_mod is not None:
        # elementwise in s, so the JVP with a tangent of ones is the derivative
        s, grad = jax.jvp(lambda x: _apply_mod(x, cfg, pos, blocks), (s,), (jnp.ones_like(s),))
    if cfg.soft_cap is None:
        return s, grad
    t = jnp.tanh(s * (1.0 / cfg.soft_cap))
    cap_grad = 1.0 - t * t
    return t * cfg.soft_cap, cap_grad if grad is None else cap_grad * grad


def _cap(s, cfg: Config):
    return s if cfg.soft_cap is None else jnp.tanh(s * (1.0 / cfg.soft_cap)) * cfg.soft_cap


# ------------------------------------------------------------------------------------------
# score_mod operands: blocks in, per-program gradient partials out.
# ------------------------------------------------------------------------------------------
def _entries(vec, n: int):
    """The first ``n`` entries of a ``[1, L]`` row as ``[1, 1]`` arrays (one-hot sums: neither
    Mosaic nor Triton lowers a gather or a value slice)."""
    iota = lax.broadcasted_iota(jnp.int32, vec.shape, 1)
    return tuple(jnp.sum(jnp.where(iota == i, vec, 0.0), axis=1, keepdims=True)
                 for i in range(n))


def _row(entries, width: int):
    """``[1, width]`` row holding ``entries`` (``[1, 1]`` each) first, zeros after."""
    iota = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    row = jnp.zeros((1, width), f32)
    for i, e in enumerate(entries):
        row = row + jnp.where(iota == i, e, 0.0)
    return row


def mod_specs(cfg: Config, ops, spec: Callable) -> list:
    """BlockSpecs of the score_mod operands, for either backend's grid: a ``const`` operand
    comes whole to every program; any other, ``x [Bx, Hx, L]`` (``Bx``, ``Hx`` 1 when shared
    over batch / heads), gets the backend's ``spec(x, axis, Bx, Hx)``."""
    return [pl.BlockSpec(x.shape, lambda *_, nd=x.ndim: (0,) * nd) if a == "const"
            else spec(x, a, x.shape[0], x.shape[1])
            for x, a in zip(ops, cfg.mod_axes, strict=True)]


def split_blocks(cfg: Config, loaded):
    """The score_mod's blocks from the loaded operand values (``q``: ``[bq, 1]``, ``kv``:
    ``[1, bk]``, ``whole``: a ``[1, L_pad]`` row, ``const``: the array)."""
    return tuple(_entries(x, n) if a == "whole" else x
                 for x, a, n in zip(loaded, cfg.mod_axes, cfg.mod_lens, strict=True))


def wanted(cfg: Config, pass_: str) -> tuple[int, ...]:
    """Operands whose gradient partials a backward pass writes: the dq pass (one program per
    query block) those indexed by query or not by position, the dk/dv pass those by key."""
    axes = ("kv",) if pass_ == "dkv" else ("q", "whole", "const")
    return tuple(n for n, a in enumerate(cfg.mod_axes) if a in axes)


def grad_value(cfg: Config, n: int, d, width: int):
    """Operand ``n``'s gradient block in its loaded layout (``whole``: back to a row)."""
    return _row(d, width) if cfg.mod_axes[n] == "whole" else d


def _visible(cfg: Config, q0, k0, head, q_seg, k_seg):
    """Bool ``[bq, bk]`` of visible pairs in the tile at rows ``q0``, columns ``k0``."""
    shape = (cfg.block_q, cfg.block_kv)
    qi = q0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    ki = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = ki < cfg.kv_len
    if cfg.mask_fn is not None:
        vis = vis & cfg.mask_fn(qi, ki, head)
    if q_seg is not None:
        vis = vis & (q_seg == k_seg)
    return vis


def initial_max(cfg: Config) -> float:
    """The running max ``m`` before any key (without sinks): softmax starts from the mask value,
    softpick from 0 (its ``m >= 0`` keeps ``e^{-m} <= 1``)."""
    return 0.0 if cfg.softpick else MASK_VALUE


def _fwd_update(q, k, v, m_prev, l_prev, acc_prev, vis, cfg: Config, pos, blocks=()):
    """One online step; ``m, l`` are ``[bq]``, ``acc`` is ``[bq, Dv]`` (fp32).

    softmax: ``l = sum e^{s - m}``, ``acc = sum e^{s - m} v``. softpick: ``e^s - 1 =
    e^m (e^{s - m} - e^{-m})`` with the running max ``m >= 0``, ``l = sum |e^{s-m} - e^{-m}|``,
    ``acc = sum relu(e^{s-m} - e^{-m}) v``; both rescale by ``e^{m_old - m_new}`` when ``m``
    grows (eps joins only at :func:`_finalize`, with the final ``m``). Masked entries add 0.
    """
    s, _ = _logits(q, k, cfg, pos, blocks)
    if vis is not None:
        s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    if cfg.softpick:
        p = p - jnp.exp(-m_new)[:, None]  # e^{-m} (e^s - 1)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    if cfg.softpick:
        l_new = alpha * l_prev + jnp.sum(jnp.abs(p), axis=1)
        p = jnp.maximum(p, 0.0)
    else:
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=f32)
    return m_new, l_new, alpha[:, None] * acc_prev + pv


def _finalize(m, l, acc, cfg: Config | None = None):
    """Output ``acc / l`` (0 where l = 0) and the backward's row stats ``m`` (+inf where
    l = 0) and ``log l`` (0 where l = 0).

    softpick: ``z = l + eps e^{-m}`` (the denominator ``sum |e^s - 1| + eps`` over ``e^m``),
    output ``acc / z`` and the stats ``(m, log z)``, so ``m + log z = log(sum |e^s - 1| + eps)``
    (a row that sees nothing: ``m = 0``, ``z = eps``, output 0).
    """
    if cfg is not None and cfg.softpick:
        z = l + SOFTPICK_EPS * jnp.exp(-m)
        return acc / z[:, None], m, jnp.log(z)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o = acc / l_safe[:, None]
    return o, jnp.where(empty, jnp.inf, m), jnp.log(l_safe)


def _bwd_tile(q, k, v, do, m, log_l, di, vis, cfg: Config, pos, blocks=()):
    """``p`` and ``ds = dL/ds`` (before ``scale``) of a tile; m, log_l, di are ``[bq]``."""
    p, ds, _ = bwd_tile_operands(q, k, v, do, m, log_l, di, vis, cfg, pos, blocks)
    return p, ds


def bwd_tile_operands(q, k, v, do, m, log_l, di, vis, cfg: Config, pos, blocks=(), want=()):
    """:func:`_bwd_tile` plus the cotangents of the score_mod blocks listed in ``want``."""
    if want:  # reverse mode through score_mod and cap, for the blocks' cotangents too
        def modded(s0, own):
            bl = list(blocks)
            for n, x in zip(want, own, strict=True):
                bl[n] = x
            return _cap(_apply_mod(s0, cfg, pos, bl), cfg)

        s0 = lax.dot_general(q, k, _NT, preferred_element_type=f32) * cfg.scale
        s, pull = jax.vjp(modded, s0, tuple(blocks[n] for n in want))
        grad = None
    else:
        s, grad = _logits(q, k, cfg, pos, blocks)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
    if cfg.softpick:
        p, ds = _softpick_p_ds(s, m, log_l, di, dp)
        if vis is not None:  # e^s of a masked entry may be inf: select, never multiply by 0
            p, ds = jnp.where(vis, p, 0.0), jnp.where(vis, ds, 0.0)
    else:
        p = jnp.exp((s - m[:, None]) - log_l[:, None])  # s - m first: exact for tied maxima
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        ds = p * (dp - di[:, None])
    if want:
        ds, dblocks = pull(ds)
        return p, ds, dblocks
    if grad is not None:
        ds = ds * grad
    return p, ds, ()


def _softpick_p_ds(s, m, log_z, di, dp):
    """Softpick's weights and ``dL/ds`` from the saved ``(m, log z)``, ``Z = e^m z``.

    ``p_j = relu(e^{s_j} - 1) / Z`` with ``Z = sum_k |e^{s_k} - 1| + eps``, so
    ``dp_j / ds_k = [j = k][s_k > 0] e^{s_k} / Z - p_j sign(s_k) e^{s_k} / Z`` and with
    ``sum_j p_j dp_j = di`` (= ``o . do``, minus the cotangent of ``log Z``)::

        ds_k = e^{s_k} / Z ([s_k > 0] dp_k - sign(s_k) di)

    ``e^{s}/Z = e^{(s - m) - log z}``. ``sign`` is spelled with ``where`` (Mosaic's ``sign``
    rule queries the TPU generation, which a CPU host cannot answer when cross-lowering).
    """
    m, log_z = m[:, None], log_z[:, None]
    e = jnp.exp((s - m) - log_z)
    p = jnp.maximum(e - jnp.exp(-m - log_z), 0.0)
    di = di[:, None]
    ds = e * jnp.where(s > 0, dp - di, jnp.where(s < 0, di, 0.0))
    return p, ds


def _mm(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=f32)


def _entry(e):
    """Unpack ``block * 4 + kind``."""
    return lax.div(e, 4), lax.rem(e, 4)


def _sel(idx, n):
    return idx if n > 1 else 0
