"""The mechanism registry: attention cores by name.

A config selects a mechanism with a string, ``AttentionConfig(mechanism="gla")``; names may take
an argument after a colon (``"linear:elu1"``) and every mask pattern of :mod:`models.patterns`
is also a mechanism (softmax under that pattern: ``"sliding_window:64"``, ``"neighborhood:3"``,
``"strided:4"``). Registering a new mechanism is one decorated class or function (here, in
:mod:`models.cores` or in user code)::

    @register_mechanism("softplus")
    class Softplus(SoftmaxCore):
        normalizer = "softplus"          # after jattn.normalizers.register("softplus", ...)

A registered factory is called as ``factory(cfg, mask, arg, rngs=rngs)`` and returns a
:class:`models.cores.base.Core`; ``mask`` is the block's mask (causal & configured pattern).
Softmax-family cores accept any mask; recurrent cores accept none. The built-in cores, with the
math and the paper of each: :mod:`models.cores.softmax`, :mod:`models.cores.variants`,
:mod:`models.cores.score_map` (mta, gpsa), :mod:`models.cores.recurrent`,
:mod:`models.cores.hybrid`; they register when :mod:`models.cores` loads (importing any of
``models`` loads it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from models.config import AttentionConfig
from models.cores.base import Core
from models.patterns import PATTERNS, build_mask, pattern_names, registrar

__all__ = [
    "MECHANISMS",
    "register_mechanism",
    "mechanism_names",
    "mechanism_kind",
    "option_names",
    "build_core",
    "check_mechanism",
    "check_context_parallel",
]

Factory = Callable[..., Core]
MECHANISMS: dict[str, Factory] = {}


def register_mechanism(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(cfg, mask, arg, *, rngs) -> Core`` (or a Core subclass)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"mechanism name must be a non-empty str without ':', got {name!r}")

    return registrar("mechanism", MECHANISMS, name, PATTERNS)


def mechanism_names() -> list[str]:
    """Registered mechanism names (each mask pattern name is also accepted, as softmax)."""
    return sorted(MECHANISMS)


def option_names() -> list[str]:
    """Every option a registered core declares (the names ``AttentionConfig.options`` takes)."""
    names = set()
    for factory in MECHANISMS.values():
        options = getattr(factory, "Options", None)
        if options is not None and dataclasses.is_dataclass(options):
            names.update(f.name for f in dataclasses.fields(options))
    return sorted(names)


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown attention mechanism {name!r}; registered: {mechanism_names()} "
                      f"(arguments after ':', e.g. 'linear:elu1'), or a mask pattern: "
                      f"{pattern_names()} (e.g. 'sliding_window:64')")


def check_mechanism(cfg: AttentionConfig) -> None:
    """Raise ValueError now (before any parameter is drawn) for an unknown name, a bad mask,
    an option no registered core declares, or a ``context_axis`` the core cannot serve."""
    name = cfg.mechanism_name
    if name not in MECHANISMS and name not in PATTERNS:
        raise _unknown(name)
    known = option_names()
    for option, _ in cfg.options:
        if option not in known:
            raise ValueError(f"unknown attention option {option!r}; the registered cores "
                             f"declare {known}")
    if name in PATTERNS:
        build_mask(cfg, cfg.mechanism)
    else:
        build_mask(cfg)
        if cfg.causal and not getattr(MECHANISMS[name], "has_causal_form", True):
            raise ValueError(f"mechanism {name!r} has no causal form (it is non-causal only); "
                             f"use it in a non-causal model (causal=False, e.g. a ViT)")
    if cfg.context_axis is not None:
        check_context_parallel(cfg)


def check_context_parallel(cfg: AttentionConfig) -> None:
    """Raise ValueError unless a block of ``cfg`` can run with ``cfg.context_axis`` set.

    The core must declare ``context_parallel = True`` (:class:`models.cores.base.Core`); a core
    that runs softmax attention also needs what ``jattn.attention(..., context_axis=)`` serves:
    no dense bias (ALiBi) and the blocked per-device kernel (``implementation`` None or
    ``"xla"``).
    """
    name, axis = cfg.mechanism_name, cfg.context_axis
    where = f"mechanism {cfg.mechanism!r} with context_axis={axis!r}"
    if name in PATTERNS:
        kind, splits = "softmax", True
    else:
        factory = MECHANISMS[name]
        kind = getattr(factory, "kind", "softmax")
        splits = bool(getattr(factory, "context_parallel", False))
    if not splits:
        split_ok = sorted(n for n, f in MECHANISMS.items() if getattr(f, "context_parallel", 0))
        raise ValueError(f"{where}: this mechanism cannot run context-parallel (its core does "
                         f"not split the sequence over a mesh axis); use one that can "
                         f"({split_ok} or a mask pattern) or context_axis=None")
    if kind in ("softmax", "hybrid"):
        if cfg.position == "alibi":
            raise ValueError(f"{where}: position='alibi' is a dense [T, T] bias, which context "
                             f"parallelism cannot split; use position='rope' or 'none'")
        if cfg.implementation not in (None, "xla"):
            raise ValueError(f"{where}: implementation={cfg.implementation!r} cannot run "
                             f"context-parallel (each device runs the blocked 'xla' kernel); "
                             f"use implementation=None or 'xla'")


def build_core(cfg: AttentionConfig, *, rngs: nnx.Rngs) -> Core:
    """The core for ``cfg.mechanism`` with the block mask ``causal & cfg.mask [& pattern]``."""
    name, arg = cfg.mechanism_name, cfg.mechanism_arg
    if name in MECHANISMS:
        return MECHANISMS[name](cfg, build_mask(cfg), arg, rngs=rngs)
    if name in PATTERNS:
        # models.cores.softmax registers its cores here, so it imports this module: import late
        from models.cores.softmax import SoftmaxCore

        window = int(arg) if name == "sliding_window" else None  # keys a query looks back
        return SoftmaxCore(cfg, build_mask(cfg, cfg.mechanism), kv_window=window)
    raise _unknown(name)


def mechanism_kind(mechanism: str) -> str:
    """``"softmax"``, ``"recurrent"`` or ``"hybrid"`` for a mechanism string."""
    name = mechanism.split(":", 1)[0]
    if name in PATTERNS:
        return "softmax"
    if name not in MECHANISMS:
        raise _unknown(name)
    return getattr(MECHANISMS[name], "kind", "softmax")
