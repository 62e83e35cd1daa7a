"""The attention configuration, the core interface every mechanism implements, masks by name.

An attention block (:class:`models.attention.AttentionBlock`) projects ``x [B, T, D]`` to
``q [B, T, Hq, Dh]``, ``k, v [B, T, Hkv, Dh]`` and hands them to a *core*: an ``nnx.Module``
chosen by name from the registry in :mod:`models.mechanisms`. A core maps
:class:`CoreInputs` to per-head outputs ``o [B, T, Hq, Dh]``; the block applies the output
projection. Cores come in two kinds, which decide what decoding keeps:

* :class:`SoftmaxCore` (``kind = "softmax"``): a key/value cache ``[B, L, Hkv, Dh]``, either the
  full context or a StreamingLLM sink + recent-window ring buffer.
* :class:`RecurrentCore` (``kind = "recurrent"``): a fixed-size state ``[B, H, K, V]`` (fp32).

Masks: ``AttentionConfig.mask`` is a :class:`jattn.masks.Mask` or a pattern string
``"name[:args]"`` from :data:`PATTERNS` (``"sliding_window:64"``, ``"chunked:16"``,
``"strided:4"``, ``"neighborhood:3"``, ``"window:4"``, ...), ANDed with ``causal()`` when
``causal=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn import masks
from models.validation import is_concrete

__all__ = [
    "AttentionConfig",
    "CoreInputs",
    "Core",
    "SoftmaxCore",
    "RecurrentCore",
    "PATTERNS",
    "register_pattern",
    "pattern_names",
    "build_mask",
    "CachePolicy",
    "check_cache_index",
]

POSITIONS = ("none", "rope", "alibi")
CACHE_POLICIES = ("full", "streaming")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How softmax layers keep past keys/values while decoding (static, hashable).

    * ``"full"``: every token up to ``max_len`` (exact).
    * ``"streaming"``: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
      Attention Sinks", 2024): the first ``sink_tokens`` tokens plus the last ``window`` tokens,
      in a ring buffer of ``sink_tokens + window`` slots; memory and time per step are constant.
    """

    kind: str = "full"
    sink_tokens: int = 4
    window: int = 256

    def __post_init__(self):
        if self.kind not in CACHE_POLICIES:
            raise ValueError(f"policy kind must be one of {CACHE_POLICIES}, got {self.kind!r}")
        if self.sink_tokens < 0 or self.window <= 0:
            raise ValueError(f"need sink_tokens >= 0 and window > 0, got {self.sink_tokens}, "
                             f"{self.window}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static configuration of one attention block (hashable).

    Attributes:
      d_model: model width ``D``.
      num_heads: query heads ``Hq``.
      num_kv_heads: key/value heads ``Hkv`` (GQA/MQA; default ``Hq``); ``Hq % Hkv == 0``.
      head_dim: ``Dh`` (default ``D // Hq``).
      mechanism: registry name (see :func:`models.mechanisms.mechanism_names`), optionally with
        an argument after a colon: ``"linear:elu1"``, ``"sliding_window:64"``.
      mask: extra pattern (a ``jattn.masks.Mask`` or a :data:`PATTERNS` string), ANDed in.
      causal: AND ``masks.causal()`` (decoders) or not (ViT).
      position: ``"rope"``, ``"alibi"`` or ``"none"`` (learned absolute positions live in the
        model's embedding). Applied by softmax-family cores; recurrent cores ignore it (their
        decay carries position).
      rope_base, rope_fraction: RoPE base and rotated fraction of ``Dh`` (partial RoPE).
      qk_norm: RMSNorm over ``Dh`` on q and k (per head, shared scale; Dehghani et al. 2023).
      use_bias: biases on the q/k/v/o projections.
      scale: score scale, default ``1 / sqrt(Dh)``.
      logits_soft_cap: ``c tanh(s / c)`` soft-capping (softmax family).
      implementation: ``jattn.attention`` implementation (None, "reference", "xla", "pallas").
      linear_implementation: ``jattn.linear`` implementation (None, "reference", "chunk", ...).
      chunk_size: chunk size of chunkwise-parallel linear attention.
      grid_shape: token grid for vision masks (``(H/p, W/p)``), excluding prefix tokens.
      num_prefix_tokens: leading tokens (class token) that see and are seen by every token
        under a grid mask.
      window: sliding-window size of ``"based"``'s softmax branch.
      feature_dim: projected q/k width of ``"based"``'s Taylor branch (Arora et al. use 16).
      sink_init: initial sink logit of ``"sinks"``.
      clip_gamma, clip_zeta: clipped softmax stretch ``clip((zeta - gamma) p + gamma, 0, 1)``.
      moh_top_k: routed heads kept per token by ``"moh"`` (default: half the routed heads).
      moh_shared_heads: always-active heads of ``"moh"``.
      gate_low_rank: rank of the low-rank gate projections of ``"gla"`` and ``"kda"``.
      gla_temperature: GLA's ``tau`` in ``g = logsigmoid(.) / tau`` (16 in Yang et al.).
      dtype: compute dtype (parameters stay fp32).
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mechanism: str = "softmax"
    mask: Any = None
    causal: bool = True
    position: str = "none"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    qk_norm: bool = False
    use_bias: bool = False
    scale: float | None = None
    logits_soft_cap: float | None = None
    implementation: str | None = None
    linear_implementation: str | None = None
    chunk_size: int = 64
    grid_shape: tuple[int, ...] | None = None
    num_prefix_tokens: int = 0
    window: int = 64
    feature_dim: int = 16
    sink_init: float = 0.0
    clip_gamma: float = -0.03
    clip_zeta: float = 1.0
    moh_top_k: int | None = None
    moh_shared_heads: int = 0
    gate_low_rank: int = 16
    gla_temperature: float = 16.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("d_model", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_kv_heads is not None and (
                not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0
                or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads}, "
                             f"got {self.num_kv_heads!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads="
                             f"{self.num_heads}; pass head_dim explicitly")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ValueError(f"mechanism must be a non-empty str, got {self.mechanism!r}")
        if self.grid_shape is not None:
            object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def mechanism_name(self) -> str:
        return self.mechanism.split(":", 1)[0]

    @property
    def mechanism_arg(self) -> str | None:
        parts = self.mechanism.split(":", 1)
        return parts[1] if len(parts) > 1 else None


class CoreInputs(NamedTuple):
    """What a core sees. ``q [B, T, Hq, Dh]``, ``k, v [B, T, Hkv, Dh]`` are projected (and
    QK-normed) but not rotated; ``x [B, T, D]`` is the block input (for data-dependent gates);
    ``positions`` ``[T]`` or ``[B, T]`` are absolute positions."""

    x: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    positions: jax.Array


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, T, Hkv, D] -> [B, T, Hq, D]`` (kv head ``h // G`` serves query head ``h``)."""
    g = num_heads // x.shape[2]
    return x if g == 1 else jnp.repeat(x, g, axis=2)


class Core(nnx.Module):
    """Base class of attention cores. Subclasses implement ``__call__``, ``init_cache``,
    ``decode``.

    ``__call__(inp, intermediates=None) -> o [B, T, Hq, Dh]``: the full-sequence form. When
    ``intermediates`` is a dict, the core adds analysis tensors to it (e.g.
    ``"attention_weights" [B, Hq, T, T]``).

    ``decode(inp, cache, index, policy) -> (o, cache)``: ``inp`` holds ``Tq`` new tokens at absolute
    positions ``index .. index + Tq - 1`` (``index`` a traced int scalar); all previous tokens
    are summarized by ``cache``.
    """

    kind: str = "softmax"

    def __init__(self, cfg: AttentionConfig, mask: masks.Mask | None):
        self.cfg = cfg
        self.mask = mask

    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        raise NotImplementedError

    def decode(self, inp: CoreInputs, cache: dict, index: jax.Array, policy: CachePolicy):
        raise NotImplementedError


class SoftmaxCore(Core):
    """Softmax-family core on ``jattn.attention``: ``o = normalize(scale q k^T + bias) v``.

    Subclasses customize ``normalizer``/``sinks`` or override :meth:`attend` and
    :meth:`weights`, and may post-process with :meth:`finish` (e.g. output gates). The KV cache
    and StreamingLLM policy come for free.
    """

    kind = "softmax"
    normalizer: str = "softmax"

    def sinks(self) -> jax.Array | None:
        return None

    # --- the mechanism --------------------------------------------------------------------------
    def attend(self, q, k, v, *, mask, bias) -> jax.Array:
        """``o [B, Tq, Hq, Dh]`` from rotated ``q``, ``k`` (``mask``: Mask or bool array)."""
        cfg = self.cfg
        return jattn.attention(q, k, v, mask=mask, bias=bias, scale=cfg.scale,
                               normalizer=self.normalizer, sinks=self.sinks(),
                               logits_soft_cap=cfg.logits_soft_cap,
                               implementation=cfg.implementation)

    def weights(self, q, k, *, mask, bias) -> jax.Array:
        """Attention weights ``[B, Hq, Tq, Tk]`` (fp32) for analysis."""
        cfg = self.cfg
        return jattn.attention_weights(q, k, mask=mask, bias=bias, scale=cfg.scale,
                                       normalizer=self.normalizer, sinks=self.sinks(),
                                       logits_soft_cap=cfg.logits_soft_cap)

    def finish(self, inp: CoreInputs, o: jax.Array, intermediates: dict | None) -> jax.Array:
        """Post-process head outputs ``o [B, T, Hq, Dh]`` (identity by default)."""
        return o

    # --- positions ------------------------------------------------------------------------------
    def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        if self.cfg.position != "rope":
            return x
        return jattn.position.rope(x, positions, base=self.cfg.rope_base,
                                   fraction=self.cfg.rope_fraction)

    def alibi(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | None:
        """ALiBi bias ``[1, Hq, Tq, Tk]`` from position vectors, or None."""
        if self.cfg.position != "alibi":
            return None
        slopes = jattn.position.alibi_slopes(self.cfg.num_heads)
        dist = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
        return (-slopes[:, None, None] * dist[None])[None]

    # --- full sequence --------------------------------------------------------------------------
    def __call__(self, inp: CoreInputs, intermediates: dict | None = None) -> jax.Array:
        t = inp.q.shape[1]
        q, k = self.rope(inp.q, inp.positions), self.rope(inp.k, inp.positions)
        bias = None
        if self.cfg.position == "alibi":
            bias = jattn.position.alibi_bias(self.cfg.num_heads, t, t)[None]
        o = self.attend(q, k, inp.v, mask=self.mask, bias=bias)
        if intermediates is not None:
            intermediates["attention_weights"] = self.weights(q, k, mask=self.mask, bias=bias)
        return self.finish(inp, o, intermediates)

    # --- decoding -------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        """``{"k", "v": [B, L, Hkv, Dh], "pos": [L] int32}``; ``L = max_len`` for ``"full"``,
        ``sink_tokens + window`` for ``"streaming"`` (``pos`` = absolute position per slot,
        -1 = empty)."""
        size = max_len if policy.kind == "full" else policy.sink_tokens + policy.window
        shape = (batch, size, self.cfg.kv_heads, self.cfg.dh)
        return {"k": jnp.zeros(shape, self.cfg.dtype), "v": jnp.zeros(shape, self.cfg.dtype),
                "pos": jnp.full((size,), -1, jnp.int32)}

    def decode(self, inp: CoreInputs, cache: dict, index: jax.Array, policy: CachePolicy):
        """Full policy: write the ``Tq`` new keys/values at slots ``index .. index + Tq - 1``
        and attend over the cache.

        ``dynamic_update_slice`` clamps its start, so a step past the cache would silently
        overwrite the last slots. A concrete ``index`` outside ``[0, L - Tq]`` raises a
        ValueError (:func:`check_cache_index`); a traced one leaves the cache unchanged and
        returns NaN outputs (so NaN logits), which costs a ``Tq``-slot read and a select.
        """
        if policy.kind == "streaming":
            return self._decode_streaming(inp, cache, index, policy)
        tq = inp.q.shape[1]
        size = cache["k"].shape[1]
        if tq > size:  # static: raise even under jit
            raise ValueError(f"{tq} new tokens do not fit the KV cache of {size} slots")
        check_cache_index(index, tq, size)
        index = jnp.asarray(index, jnp.int32)
        overflow = (index < 0) | (index + tq > size)
        q_pos = index + jnp.arange(tq, dtype=jnp.int32)
        q, k = self.rope(inp.q, q_pos), self.rope(inp.k, q_pos)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, index, zero, zero)
        k_cache = _write_unless(overflow, cache["k"], k, start)
        v_cache = _write_unless(overflow, cache["v"], inp.v, start)
        pos = _write_unless(overflow, cache["pos"], q_pos, (index,))
        k_pos = jnp.arange(size, dtype=jnp.int32)
        vis = (k_pos[None, :] <= q_pos[:, None]) & (pos[None, :] >= 0)
        vis = vis[None, None] & self._pattern(q_pos, k_pos)
        o = self.attend(q, k_cache, v_cache, mask=vis, bias=self.alibi(q_pos, k_pos))
        o = self.finish(inp, o, None)
        o = jnp.where(overflow, jnp.asarray(jnp.nan, o.dtype), o)
        return o, {**cache, "k": k_cache, "v": v_cache, "pos": pos}

    def _pattern(self, q_pos, k_pos):
        """``[1, H|1, Tq, Tk]`` visibility of the configured mask at absolute positions."""
        if self.mask is None:
            return jnp.ones((1, 1, 1, 1), bool)
        n = 1 << 30  # absolute positions: Tq = Tk, so the end-alignment offset is zero
        h = self.mask.num_heads
        qq, kk = q_pos[:, None], k_pos[None, :]
        if h is None:
            return self.mask.visible(qq, kk, 0, q_len=n, kv_len=n)[None, None]
        hh = jnp.arange(h, dtype=jnp.int32)[:, None, None]
        return self.mask.visible(qq[None], kk[None], hh, q_len=n, kv_len=n)[None]

    def _decode_streaming(self, inp: CoreInputs, cache: dict, index: jax.Array,
                          policy: CachePolicy):
        """StreamingLLM (Xiao et al., 2024): keep ``sink`` first tokens + the last ``window``.

        Keys are cached before RoPE and rotated at their position *within the cache* (sinks at
        ``0..sink-1``, the recent window contiguous after them), as in the paper. One token per
        call.
        """
        if inp.q.shape[1] != 1:
            raise ValueError("streaming cache decodes one token per call (prefill token by token)")
        if is_concrete(index) and int(index) < 0:
            raise ValueError(f"decode index={int(index)} must be >= 0")
        n_sink, window = policy.sink_tokens, policy.window
        p = jnp.asarray(index, jnp.int32)
        slot = jnp.where(p < n_sink, p, n_sink + (p - n_sink) % window)
        zero = jnp.zeros((), jnp.int32)
        k_cache = jax.lax.dynamic_update_slice(
            cache["k"], inp.k.astype(cache["k"].dtype), (zero, slot, zero, zero))
        v_cache = jax.lax.dynamic_update_slice(
            cache["v"], inp.v.astype(cache["v"].dtype), (zero, slot, zero, zero))
        pos = jax.lax.dynamic_update_slice(cache["pos"], p[None], (slot,))
        offset = jnp.maximum(0, p - window + 1 - n_sink)
        k_pos = jnp.where(pos < n_sink, pos, pos - offset)
        q_pos = (p - offset)[None]
        q = self.rope(inp.q, q_pos)
        k = self.rope(k_cache, k_pos)
        vis = (pos >= 0)[None, None, None, :]
        o = self.attend(q, k, v_cache, mask=vis, bias=self.alibi(q_pos, k_pos))
        o = self.finish(inp, o, None)
        o = jnp.where(p < 0, jnp.asarray(jnp.nan, o.dtype), o)  # a traced negative index
        return o, {**cache, "k": k_cache, "v": v_cache, "pos": pos}


def check_cache_index(index: Any, tq: int, size: int, what: str | None = None) -> None:
    """For a concrete ``index``: raise unless the full KV cache of ``size`` slots holds the
    ``tq`` new tokens at ``index .. index + tq - 1``. ``what`` overrides the description of
    the new tokens in the message. Traced indices are not checked."""
    if not is_concrete(index):
        return
    i = int(index)
    if i < 0:
        raise ValueError(f"decode index={i} must be >= 0")
    if i + tq > size:
        what = what or f"decode index={i} with {tq} new token(s)"
        raise ValueError(f"{what} needs slots up to {i + tq - 1}, past the KV cache of {size} "
                         f"slots; size it for the whole sequence with "
                         f"init_cache(batch, max_len >= {i + tq})")


def _write_unless(skip: jax.Array, buf: jax.Array, new: jax.Array, start: tuple) -> jax.Array:
    """``dynamic_update_slice(buf, new, start)``, or ``buf`` unchanged when ``skip`` (a traced
    out-of-range start, which the update would clamp). Only the ``new``-sized slice is read."""
    new = new.astype(buf.dtype)
    old = jax.lax.dynamic_slice(buf, start, new.shape)
    return jax.lax.dynamic_update_slice(buf, jnp.where(skip, old, new), start)


class RecurrentCore(Core):
    """Linear / recurrent core: a fixed-size state ``[B, H, K, V]`` (fp32) per layer.

    Subclasses implement :meth:`recur`: ``(inp, initial_state) -> (o, final_state)`` using a
    ``jattn.linear`` function with ``initial_state``/``output_final_state``, which serves the
    full sequence, the prefill and each decoding step alike.
    """

    kind = "recurrent"

    def state_shape(self) -> tuple[int, int, int]:
        """``(H, K, V)`` of the recurrent state."""
        return (self.cfg.num_heads, self.cfg.dh, self.cfg.dh)

    def recur(self, inp: CoreInputs, state: jax.Array | None, want_state: bool):
        raise NotImplementedError

    def __call__(self, inp: CoreInputs, intermediates: dict | None = None) -> jax.Array:
        o, _ = self.recur(inp, None, False)
        return o

    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        return {"state": jnp.zeros((batch,) + self.state_shape(), jnp.float32)}

    def decode(self, inp: CoreInputs, cache: dict, index: jax.Array, policy: CachePolicy):
        o, state = self.recur(inp, cache["state"], True)
        return o, {**cache, "state": state.astype(jnp.float32)}


# ------------------------------------------------------------------------------------------------
# Mask patterns by name.
# ------------------------------------------------------------------------------------------------
PatternFactory = Callable[[AttentionConfig, str | None], masks.Mask]
PATTERNS: dict[str, PatternFactory] = {}


def register_pattern(name: str) -> Callable[[PatternFactory], PatternFactory]:
    """Decorator: ``fn(cfg, arg) -> Mask`` under ``name`` (used as ``"name:arg"``)."""

    def deco(fn):
        if name in PATTERNS:
            raise ValueError(f"pattern {name!r} is already registered")
        PATTERNS[name] = fn
        return fn

    return deco


def pattern_names() -> list[str]:
    return sorted(PATTERNS)


def _ints(arg: str | None, n: int, name: str, defaults: tuple[int, ...] = ()) -> tuple[int, ...]:
    parts = [] if not arg else arg.split(",")
    vals = [int(p) for p in parts] + list(defaults[len(parts):])
    if len(vals) != n:
        raise ValueError(f"pattern {name!r} needs {n} int argument(s) like '{name}:"
                         f"{','.join(['8'] * n)}', got {arg!r}")
    return tuple(vals)


def _grid(cfg: AttentionConfig, name: str) -> tuple[int, ...]:
    if cfg.grid_shape is None:
        raise ValueError(f"pattern {name!r} needs AttentionConfig.grid_shape (the token grid)")
    return cfg.grid_shape


@dataclasses.dataclass(frozen=True)
class _GridWindows(masks.Mask):
    """Non-overlapping windows on a row-major grid (Swin/ViTDet-style window attention)."""

    shape: tuple[int, ...]
    size: tuple[int, ...]

    def _visible(self, q, k, h, q_len, kv_len):
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
        q_rest, k_rest = q, k
        for n, w in zip(reversed(self.shape), reversed(self.size), strict=True):
            ok = ok & ((q_rest % n) // w == (k_rest % n) // w)
            q_rest, k_rest = q_rest // n, k_rest // n
        return ok


@dataclasses.dataclass(frozen=True)
class _WithPrefix(masks.Mask):
    """``inner`` on tokens after ``n`` prefix tokens; prefix tokens see and are seen by all."""

    inner: masks.Mask
    n: int

    @property
    def num_heads(self):
        return self.inner.num_heads

    def _visible(self, q, k, h, q_len, kv_len):
        inner = self.inner._visible(jnp.maximum(q - self.n, 0), jnp.maximum(k - self.n, 0), h,
                                    q_len - self.n, kv_len - self.n)
        return (q < self.n) | (k < self.n) | inner


def _maybe_prefix(cfg: AttentionConfig, m: masks.Mask) -> masks.Mask:
    return _WithPrefix(m, cfg.num_prefix_tokens) if cfg.num_prefix_tokens else m


@register_pattern("full")
def _full(cfg, arg):
    return masks.full()


@register_pattern("causal")
def _causal(cfg, arg):
    return masks.causal()


@register_pattern("sliding_window")
def _sliding(cfg, arg):
    (w,) = _ints(arg, 1, "sliding_window")
    return masks.sliding_window(w)


@register_pattern("local")
def _local(cfg, arg):
    left, right = _ints(arg, 2, "local")
    return masks.local(left, right)


@register_pattern("chunked")
def _chunked(cfg, arg):
    (c,) = _ints(arg, 1, "chunked")
    return masks.chunked(c)


@register_pattern("prefix_lm")
def _prefix_lm(cfg, arg):
    (p,) = _ints(arg, 1, "prefix_lm")
    return masks.prefix_lm(p)


@register_pattern("strided")
def _strided(cfg, arg):
    """S2-Attention-style shards: head ``h`` sees keys ``j % stride == h % stride``."""
    (s,) = _ints(arg, 1, "strided")
    return masks.per_head([masks.strided(s, h % s) for h in range(cfg.num_heads)])


@register_pattern("neighborhood")
def _neighborhood(cfg, arg):
    """NATTEN neighborhood on ``grid_shape``: ``"neighborhood:kernel[,dilation]"``."""
    kernel, dilation = _ints(arg, 2, "neighborhood", (7, 1))
    return _maybe_prefix(cfg, masks.neighborhood(_grid(cfg, "neighborhood"), kernel, dilation))


@register_pattern("window")
def _window(cfg, arg):
    """Non-overlapping ``w x w`` windows on ``grid_shape``: ``"window:w"``."""
    (w,) = _ints(arg, 1, "window")
    shape = _grid(cfg, "window")
    return _maybe_prefix(cfg, _GridWindows(shape, (w,) * len(shape)))


def parse_pattern(cfg: AttentionConfig, spec: Any) -> masks.Mask | None:
    """A ``Mask`` from a Mask, None, or a pattern string ``"name[:args]"``."""
    if spec is None or isinstance(spec, masks.Mask):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"mask must be a jattn.masks.Mask, a pattern string or None, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in PATTERNS:
        raise ValueError(f"unknown mask pattern {name!r}; registered: {pattern_names()}")
    return PATTERNS[name](cfg, arg or None)


def build_mask(cfg: AttentionConfig, *extra: Any) -> masks.Mask | None:
    """``causal() & cfg.mask & extra...`` (None = everything visible)."""
    parts = [parse_pattern(cfg, cfg.mask)] + [parse_pattern(cfg, e) for e in extra]
    parts = [p for p in parts if p is not None]
    if cfg.causal:
        parts.insert(0, masks.causal())
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def default_scale(cfg: AttentionConfig) -> float:
    return cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(cfg.dh)
