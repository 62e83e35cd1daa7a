"""Mask patterns by name: ``"name[:args]"`` strings -> :class:`jattn.masks.Mask`.

``AttentionConfig.mask`` is a Mask or a pattern string (``"sliding_window:64"``,
``"chunked:16"``, ``"strided:4"``, ``"neighborhood:3"``, ``"window:4"``, ...), ANDed with
``causal()`` when ``causal=True`` (:func:`build_mask`). Every pattern name is also a mechanism
(softmax under that pattern, see :mod:`models.registry`). Grid patterns (``neighborhood``,
``window``) need ``AttentionConfig.grid_shape`` and keep ``num_prefix_tokens`` leading tokens
global (:func:`jattn.masks.with_prefix_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jattn import masks
from models.config import AttentionConfig

__all__ = ["PATTERNS", "register_pattern", "pattern_names", "parse_pattern", "build_mask"]

PatternFactory = Callable[[AttentionConfig, str | None], masks.Mask]
PATTERNS: dict[str, PatternFactory] = {}


def registrar(kind: str, table: dict[str, Any], name: str, *taken: dict[str, Any]):
    """Decorator that stores its function in ``table[name]``; ValueError if ``name`` is already
    in ``table`` or in any of `taken` (tables sharing the namespace). ``kind`` names the table in
    the message. Shared by the pattern and the mechanism registries."""

    def deco(fn):
        if name in table or any(name in t for t in taken):
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def register_pattern(name: str) -> Callable[[PatternFactory], PatternFactory]:
    """Decorator: ``fn(cfg, arg) -> Mask`` under ``name`` (used as ``"name:arg"``)."""
    return registrar("pattern", PATTERNS, name)


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


@register_pattern("full")
def _full(cfg, arg):
    return masks.full()


@register_pattern("causal")
def _causal(cfg, arg):
    return masks.causal()


def _register_int_pattern(name: str, n: int, constructor: Callable[..., masks.Mask]) -> None:
    """``"name:a[,b]"`` -> ``constructor(a[, b])``: a pattern of `n` int arguments."""
    register_pattern(name)(lambda cfg, arg: constructor(*_ints(arg, n, name)))


_register_int_pattern("sliding_window", 1, masks.sliding_window)
_register_int_pattern("local", 2, masks.local)
_register_int_pattern("chunked", 1, masks.chunked)
_register_int_pattern("prefix_lm", 1, masks.prefix_lm)


@register_pattern("strided")
def _strided(cfg, arg):
    """S2-Attention-style shards: head ``h`` sees keys ``j % stride == h % stride``."""
    (s,) = _ints(arg, 1, "strided")
    return masks.per_head([masks.strided(s, h % s) for h in range(cfg.num_heads)])


@register_pattern("neighborhood")
def _neighborhood(cfg, arg):
    """NATTEN neighborhood on ``grid_shape``: ``"neighborhood:kernel[,dilation]"``."""
    kernel, dilation = _ints(arg, 2, "neighborhood", (7, 1))
    grid = masks.neighborhood(_grid(cfg, "neighborhood"), kernel, dilation)
    return masks.with_prefix_tokens(grid, cfg.num_prefix_tokens)


@register_pattern("window")
def _window(cfg, arg):
    """Non-overlapping ``w x w`` windows on ``grid_shape``: ``"window:w"``."""
    (w,) = _ints(arg, 1, "window")
    grid = masks.grid_windows(_grid(cfg, "window"), w)
    return masks.with_prefix_tokens(grid, cfg.num_prefix_tokens)


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
