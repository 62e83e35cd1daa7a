"""The static configuration of one attention block (:class:`AttentionConfig`).

Only what every mechanism shares lives here: sizes, the mechanism name, the mask, positions,
projections, implementations and dtype. Options of one mechanism (a sink's initial logit,
MoH's top-k, GLA's temperature, ...) are declared by that mechanism's core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

__all__ = ["AttentionConfig", "POSITIONS", "SHARED_FIELDS", "CONTEXT_STRATEGIES"]

POSITIONS = ("none", "rope", "alibi")
CONTEXT_STRATEGIES = ("ring", "allgather")  # of jattn.context_parallel.attention



def check_context_fields(context_axis: Any, context_strategy: Any, owner: str = "") -> None:
    """Raise ValueError unless ``context_axis`` is None or a mesh axis name and
    ``context_strategy`` is one of `CONTEXT_STRATEGIES` (``owner`` prefixes the field names)."""
    prefix = f"{owner}." if owner else ""
    if context_axis is not None and (not isinstance(context_axis, str) or not context_axis):
        raise ValueError(f"{prefix}context_axis must be None or a mesh axis name (str), got "
                         f"{context_axis!r}")
    if context_strategy not in CONTEXT_STRATEGIES:
        raise ValueError(f"{prefix}context_strategy must be one of {CONTEXT_STRATEGIES}, got "
                         f"{context_strategy!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static configuration of one attention block (hashable).

    Attributes:
      d_model: model width ``D``.
      num_heads: query heads ``Hq``.
      num_kv_heads: key/value heads ``Hkv`` (GQA/MQA; default ``Hq``); ``Hq % Hkv == 0``.
      head_dim: ``Dh`` (default ``D // Hq``).
      mechanism: registry name (see :func:`models.registry.mechanism_names`), optionally with
        an argument after a colon: ``"linear:elu1"``, ``"sliding_window:64"``.
      mask: extra pattern (a ``jattn.masks.Mask`` or a :mod:`models.patterns` string), ANDed
        in.
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
      dtype: compute dtype (parameters stay fp32).
      context_axis: None, or the mesh axis (of the mesh set by ``jax.set_mesh``) that splits
        the sequence: context parallelism. Softmax-family cores call
        ``jattn.attention(..., context_axis=)`` and recurrent cores the ``jattn.linear``
        functions with it, on global ``[B, T, ...]`` arrays in natural token order; the result
        equals the unsplit block. Only the full-sequence call is split (decoding is not).
        Mechanisms that cannot run split (a core with ``context_parallel = False``, ALiBi's
        dense bias, a softmax ``implementation`` other than None / ``"xla"``) raise a
        ValueError when the block is built (:func:`models.registry.check_mechanism`).
      context_strategy: ``"ring"`` (K/V rotate over the axis, O(T / n) memory per device) or
        ``"allgather"`` (K/V gathered once) for softmax-family cores; recurrent cores always
        pass per-device state summaries (LASP-2).
      options: options of the mechanism's core as ``(name, value)`` pairs; each core declares
        its own in an ``Options`` dataclass (e.g. ``models.cores.softmax.MoH.Options``:
        ``moh_top_k``, ``moh_shared_heads``). They may also be passed as keywords:
        ``AttentionConfig(d_model=64, num_heads=4, mechanism="moh", moh_top_k=2)``. A name no
        registered core declares raises a ValueError when the block is built.
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
    dtype: Any = jnp.float32
    context_axis: str | None = None
    context_strategy: str = "ring"
    options: tuple[tuple[str, Any], ...] = ()

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
        check_context_fields(self.context_axis, self.context_strategy)
        if self.grid_shape is not None:
            object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        try:
            opts = dict(self.options)
        except (TypeError, ValueError):
            raise ValueError(f"options must be (name, value) pairs, got {self.options!r}") from None
        object.__setattr__(self, "options", tuple(sorted(opts.items())))  # one hashable order

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

    def options_for(self, options_type: type) -> dict[str, Any]:
        """The entries of :attr:`options` that the dataclass ``options_type`` declares."""
        declared = {f.name for f in dataclasses.fields(options_type)}
        return {k: v for k, v in self.options if k in declared}


SHARED_FIELDS = frozenset(f.name for f in dataclasses.fields(AttentionConfig))
_dataclass_init = AttentionConfig.__init__


def _init_with_option_keywords(self, *args, options=(), **kwargs):
    # Mechanism options may come as keywords (``moh_top_k=2``), as configs and
    # ``DecoderConfig.attention_options`` have always passed them; they join ``options``.
    extra = tuple((k, kwargs.pop(k)) for k in list(kwargs) if k not in SHARED_FIELDS)
    given = tuple(options.items()) if isinstance(options, Mapping) else tuple(options)
    _dataclass_init(self, *args, options=given + extra, **kwargs)


_init_with_option_keywords.__doc__ = _dataclass_init.__doc__
AttentionConfig.__init__ = _init_with_option_keywords
