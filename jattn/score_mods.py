"""Programmable attention scores: ``jattn.attention(..., score_mod=f)``.

A score_mod is FlexAttention's idea (Dong et al., "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", 2024) in JAX: ``f(s, b, h, q_idx, kv_idx) -> s'`` is
elementwise jnp code written as if on scalars (fp32 ``s``; int32 batch index ``b``, query head
``h``, query position ``q_idx`` and key position ``kv_idx``; in practice arrays that broadcast
against a score tile). It runs after ``s = scale * q.k (+ bias)`` and before the soft-cap, the
mask and the normalizer. It may close over arrays (a per-head table, gate cumsums): they are
hoisted into explicit operands with :func:`jax.closure_convert` and receive gradients in every
implementation, accumulated in a fixed order (the same bits every run).

The blocked ``"xla"`` path evaluates ``f`` per tile with the tile's global indices, so the
``[Tq, Tk]`` bias never exists; ``bias=`` with a dense array costs ``O(Tq Tk)`` memory instead.
Its backward takes each tile's VJP of ``f`` and sums the captured arrays' cotangents over tiles
in the loops' fixed order. Within a tile, the cotangent of a gather (``table[bucket, h]``) is
XLA's scatter-add: deterministic on CPU and TPU; on GPU, indices repeated within a tile (T5
buckets) may be summed with atomics unless XLA runs with ``--xla_gpu_deterministic_ops=true``.
Per-head and per-position gathers (ALiBi slopes, FoX cumsums) have unique indices per tile.

The Pallas kernel takes captured arrays as kernel operands (``jattn._pallas_dispatch``): the
library's score_mods declare how each array is indexed (:class:`KernelForm`): per query
position, per key position (sliced per block by BlockSpecs) or a small per-head table (passed
whole); an arbitrary closure over small arrays passes them whole. Their gradients are reduced
from per-program partials the backward kernels write, summed outside the kernel in a fixed
order (no atomics): the same bits every run.

Library (each returns a score_mod; compose them with :func:`compose`):

* :func:`alibi` (Press et al. 2022), :func:`relative_bias` (T5; Raffel et al. 2020),
  :func:`forgetting` (FoX; Lin et al. 2025), :func:`soft_cap` (Gemma 2), :func:`tanh_cap`
  (per-head, learnable cap).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["alibi", "relative_bias", "t5_bucket", "forgetting", "soft_cap", "tanh_cap",
           "compose", "check", "KernelForm", "KERNEL_AXES"]

ScoreMod = Callable[..., jax.Array]


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name
    return fn


KERNEL_AXES = ("q", "kv", "whole")


@dataclasses.dataclass(frozen=True, eq=False)
class KernelForm:
    """How the Pallas kernel evaluates a score_mod whose captured arrays are kernel operands.

    ``operands[n]`` is a float array ``[Bx, Hx, L]`` (``Bx`` in {1, B}, ``Hx`` in {1, Hq}: per
    batch / per query head, or shared) and ``axes[n]`` says what ``L`` indexes:

    * ``"q"``: the query position (``L = Tq``); each program gets its query block as ``[bq, 1]``.
    * ``"kv"``: the key position (``L = Tk``); the key block as ``[1, bk]``.
    * ``"whole"``: a small table (``L`` entries, e.g. T5's buckets); each entry as a ``[1, 1]``
      array (a tuple of ``L``), so the function needs no gather (Mosaic and Triton have none).

    ``fn(s, b, h, q_idx, kv_idx, *blocks) -> s'`` on a ``[bq, bk]`` tile (scalar ``b``, ``h``;
    ``[bq, bk]`` positions) must equal the score_mod it is attached to (``mod.kernel_form``).
    """

    fn: Callable
    operands: tuple
    axes: tuple

    def __post_init__(self):
        if len(self.operands) != len(self.axes) or any(a not in KERNEL_AXES for a in self.axes):
            raise ValueError(f"KernelForm axes must be one of {KERNEL_AXES} per operand, got "
                             f"{self.axes} for {len(self.operands)} operands")


def _with_kernel_form(mod, fn, operands, axes):
    mod.kernel_form = KernelForm(fn, tuple(operands), tuple(axes))
    return mod


def _head_rows(x):
    """``[..., Hq]`` -> ``[1, Hq, L]`` (per-head rows of a small table)."""
    return jnp.moveaxis(jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1]), -1, 0)[None]


def check(score_mod: ScoreMod) -> ScoreMod:
    """Trace ``score_mod`` once on scalar inputs (``jax.eval_shape``) and return it.

    Raises TypeError naming the function if it is not callable, fails when traced on scalars
    (``s: float32[]``, indices ``int32[]``; e.g. Python control flow on a value, or a reduction
    over an axis), or returns anything but one floating scalar.
    """
    if not callable(score_mod):
        raise TypeError(f"score_mod must be a callable score_mod(s, b, h, q_idx, kv_idx), got "
                        f"{type(score_mod).__name__}")
    name = _name(score_mod)
    args = (jnp.zeros((), jnp.float32),) + tuple(jnp.zeros((), jnp.int32) for _ in range(4))
    try:
        out = jax.eval_shape(score_mod, *args)
    except Exception as e:  # noqa: BLE001 - re-raised with the function's name and the contract
        raise TypeError(
            f"score_mod {name} failed when traced on scalar inputs (s: float32[], b, h, q_idx, "
            f"kv_idx: int32[]); it must be elementwise jnp code: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or not jnp.issubdtype(
            out.dtype, jnp.floating):
        got = (f"{out.dtype}{list(out.shape)}" if isinstance(out, jax.ShapeDtypeStruct)
               else type(out).__name__)
        raise TypeError(f"score_mod {name} must return one floating scalar per score (an "
                        f"elementwise function of s: float32[]), got {got}")
    return score_mod


# Primitives that mix scores across positions: a score_mod applying one to (something computed
# from) ``s`` is not elementwise, and would silently depend on the tiling in the blocked paths.
_NOT_ELEMENTWISE = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
    "sort", "top_k", "dot_general", "conv_general_dilated", "transpose", "rev", "gather",
    "dynamic_slice", "slice", "pad", "concatenate", "reduce_window_sum", "reduce_window_max",
    "reduce_window_min", "reduce_window", "fft", "scatter", "scatter-add", "scatter_add",
    "dynamic_update_slice", "squeeze", "reshape",
})


def _mixing_primitive(jaxpr, tainted) -> str | None:
    """The first non-elementwise primitive applied to a value derived from ``tainted`` vars."""
    tainted = set(tainted)
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not hasattr(v, "val")]  # skip literals
        hit = [v in tainted for v in ins]
        if not any(hit):
            continue
        name = eqn.primitive.name
        # gathers from a captured table indexed by something computed from s are fine: only
        # the gathered operand (the first input) must not be a score
        if name in _NOT_ELEMENTWISE and (name not in ("gather", "dynamic_slice") or hit[0]):
            if not (name in ("reshape", "squeeze") and _same_size(eqn)):
                return name
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            sub = eqn.params.get(key)
            if sub is None:
                continue
            sub = getattr(sub, "jaxpr", sub)
            inner = [w for v, w in zip(eqn.invars, sub.invars, strict=False)
                     if not hasattr(v, "val") and v in tainted]
            found = _mixing_primitive(sub, inner)
            if found is not None:
                return found
        tainted.update(eqn.outvars)
    return None


def _same_size(eqn) -> bool:
    """A reshape/squeeze only adding or removing unit axes (e.g. ``s[None]``) is elementwise."""
    shape_in = [d for d in eqn.invars[0].aval.shape if d != 1]
    shape_out = [d for d in eqn.outvars[0].aval.shape if d != 1]
    return shape_in == shape_out


def check_elementwise(fn, s, *args) -> None:
    """TypeError naming ``fn`` if it mixes scores across positions (a reduction, a sort, a
    matmul, a shift/slice of ``s``...) when applied to the score tile ``s``."""
    jaxpr = jax.make_jaxpr(fn)(s, *args).jaxpr
    found = _mixing_primitive(jaxpr, jaxpr.invars[:1])
    if found is not None:
        raise TypeError(f"score_mod {_name(fn)} must be elementwise in s, but it applies "
                        f"{found!r} to the scores")


def alibi(slopes) -> ScoreMod:
    """ALiBi (Press et al., "Train Short, Test Long", 2022): ``s' = s - m_h (i - j)``.

    ``slopes``: float ``[Hq]`` (``jattn.position.alibi_slopes(Hq)`` for the paper's; may be
    learnable: it receives gradients). Under a causal mask this equals
    ``bias=jattn.position.alibi_bias(Hq, T, T)`` without the ``[H, T, T]`` array.
    """
    slopes = jnp.asarray(slopes)
    if slopes.ndim != 1 or not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(f"slopes must be a float array [Hq], got {slopes.dtype}{slopes.shape}")

    def mod(s, b, h, q_idx, kv_idx):
        return s - slopes[h].astype(jnp.float32) * (q_idx - kv_idx).astype(jnp.float32)

    def kernel(s, b, h, q_idx, kv_idx, slope):  # slope: this head's entry, [1, 1]
        return s - slope[0] * (q_idx - kv_idx).astype(jnp.float32)

    return _with_kernel_form(_named(mod, "alibi"), kernel, [_head_rows(slopes[None])],
                             ["whole"])


def t5_bucket(relative_position, num_buckets: int, max_distance: int, bidirectional: bool):
    """T5's relative-position bucket (Raffel et al. 2020, ``_relative_position_bucket``).

    ``relative_position = kv_idx - q_idx`` (int). With ``bidirectional``, half the buckets hold
    keys after the query. Of the remaining ``n`` buckets, distances below ``n // 2`` get one
    bucket each, larger ones are binned logarithmically up to ``max_distance`` (then clipped).
    """
    n = -relative_position
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log of max(n, 1): n = 0 takes the exact branch; avoid log(0) -> int cast of -inf.
    ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


def relative_bias(table, num_buckets: int, max_distance: int, bidirectional: bool) -> ScoreMod:
    """T5 relative position bias: ``s' = s + table[bucket(j - i), h]`` (:func:`t5_bucket`).

    ``table``: float ``[num_buckets, Hq]`` (learnable: it receives gradients).
    """
    table = jnp.asarray(table)
    if table.ndim != 2 or table.shape[0] != num_buckets or not jnp.issubdtype(
            table.dtype, jnp.floating):
        raise ValueError(f"table must be a float array [num_buckets={num_buckets}, Hq], got "
                         f"{table.dtype}{table.shape}")
    min_buckets = 4 if bidirectional else 2
    if num_buckets < min_buckets or max_distance <= num_buckets // (4 if bidirectional else 2):
        raise ValueError(f"need num_buckets >= {min_buckets} and max_distance > the exact "
                         f"range, got num_buckets={num_buckets}, max_distance={max_distance}")

    def mod(s, b, h, q_idx, kv_idx):
        bucket = t5_bucket(kv_idx - q_idx, num_buckets, max_distance, bidirectional)
        return s + table[bucket, h].astype(jnp.float32)

    def kernel(s, b, h, q_idx, kv_idx, row):  # row: this head's buckets, num_buckets x [1, 1]
        bucket = t5_bucket(kv_idx - q_idx, num_buckets, max_distance, bidirectional)
        for n, entry in enumerate(row):  # one-hot select: no gather in the kernel
            s = s + jnp.where(bucket == n, entry, 0.0)
        return s

    return _with_kernel_form(_named(mod, "relative_bias"), kernel, [_head_rows(table)],
                             ["whole"])


def forgetting(log_f) -> ScoreMod:
    """Forgetting attention (FoX; Lin et al., "Forgetting Transformer", ICLR 2025).

    ``s'_ij = s_ij + c_i - c_j`` with ``c = cumsum_t log f_t`` per (batch, head), i.e. the score
    decays by ``prod_{j < t <= i} f_t``. ``log_f``: float ``[B, T, Hq]`` (``log sigmoid`` of a
    data-dependent gate; receives gradients), with ``T = Tq = Tk``. Use with a causal mask.
    """
    log_f = jnp.asarray(log_f)
    if log_f.ndim != 3 or not jnp.issubdtype(log_f.dtype, jnp.floating):
        raise ValueError(f"log_f must be a float array [B, T, Hq], got {log_f.dtype}"
                         f"{log_f.shape}")
    c = jnp.cumsum(log_f.astype(jnp.float32), axis=1)

    def mod(s, b, h, q_idx, kv_idx):
        return s + (c[b, q_idx, h] - c[b, kv_idx, h])

    def kernel(s, b, h, q_idx, kv_idx, c_q, c_kv):  # [bq, 1] and [1, bk] blocks of c
        return s + (c_q - c_kv)

    c_bht = c.transpose(0, 2, 1)  # [B, Hq, T]: sliced per query block and per key block
    return _with_kernel_form(_named(mod, "forgetting"), kernel, [c_bht, c_bht], ["q", "kv"])


def soft_cap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2): ``s' = c tanh(s / c)``, equal to ``logits_soft_cap=c``."""
    cap = float(cap)
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a finite positive float, got {cap}")

    def mod(s, b, h, q_idx, kv_idx):
        return cap * jnp.tanh(s / cap)

    return _named(mod, "soft_cap")


def tanh_cap(caps) -> ScoreMod:
    """Per-head (learnable) soft-cap: ``s' = c_h tanh(s / c_h)``.

    ``caps``: a positive float scalar or ``[Hq]`` array (receives gradients).
    """
    caps = jnp.asarray(caps)
    if caps.ndim > 1 or not jnp.issubdtype(caps.dtype, jnp.floating):
        raise ValueError(f"caps must be a float scalar or [Hq] array, got {caps.dtype}"
                         f"{caps.shape}")

    def mod(s, b, h, q_idx, kv_idx):
        c = (caps[h] if caps.ndim else caps).astype(jnp.float32)
        return c * jnp.tanh(s / c)

    def kernel(s, b, h, q_idx, kv_idx, cap):
        return cap[0] * jnp.tanh(s / cap[0])

    rows = _head_rows(caps[None]) if caps.ndim else jnp.asarray(caps, jnp.float32).reshape(1, 1, 1)
    return _with_kernel_form(_named(mod, "tanh_cap"), kernel, [rows], ["whole"])


def compose(*mods: ScoreMod) -> ScoreMod:
    """``compose(f, g)(s, ...) = g(f(s, ...), ...)``: applied left to right."""
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(f"compose: argument {i} must be a score_mod, got {type(m).__name__}")

    def mod(s, b, h, q_idx, kv_idx):
        for m in mods:
            s = m(s, b, h, q_idx, kv_idx)
        return s

    mod = _named(mod, "compose(" + ", ".join(_name(m) for m in mods) + ")")
    forms = [getattr(m, "kernel_form", None) for m in mods]
    if all(f is None for f in forms):
        return mod
    # Concatenate the members' operands; members without a kernel form run as they are (the
    # Pallas glue passes whatever they still capture whole, or refuses it).
    counts = [0 if f is None else len(f.operands) for f in forms]

    def kernel(s, b, h, q_idx, kv_idx, *blocks):
        start = 0
        for m, f, n in zip(mods, forms, counts, strict=True):
            own = blocks[start:start + n]
            start += n
            s = m(s, b, h, q_idx, kv_idx) if f is None else f.fn(s, b, h, q_idx, kv_idx, *own)
        return s

    return _with_kernel_form(mod, kernel, [x for f in forms if f for x in f.operands],
                             [a for f in forms if f for a in f.axes])
