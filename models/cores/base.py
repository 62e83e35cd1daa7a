"""The interface every attention core implements.

An attention block (:class:`models.attention.AttentionBlock`) projects ``x [B, T, D]`` to
``q [B, T, Hq, Dh]``, ``k, v [B, T, Hkv, Dh]`` and hands them to a *core*: an ``nnx.Module``
chosen by name from :mod:`models.registry`. A core maps :class:`CoreInputs` to per-head outputs
``o [B, T, Hq, Dh]``; the block applies the output projection. ``Core.kind`` says what decoding
keeps: ``"softmax"`` a KV cache (:mod:`models.kv_cache`), ``"recurrent"`` a fixed-size state
``[B, H, K, V]`` (fp32), ``"hybrid"`` both.

Intermediates (analysis tensors): a core records them where it computes them, with
:func:`models.intermediates.record` (``nnx.Module.sow`` of an ``nnx.Intermediate``, active only
under ``nnx.capture``), never through a dict argument::

    record(self, "attention_weights", lambda: self.weights(q, k, mask=..., bias=...))
    record(self, "gate", g)   # an array already computed: pass it directly

A callable is evaluated only while capturing, so a plain forward pays nothing. Callers collect
with :func:`models.capture_intermediates` ``(model, *args)``, which merges every record under a
model's ``layers[i]`` into ``inter["layers"][i]`` (names must be unique within a layer).
Porting a core written for the old dict: drop the ``intermediates`` parameter of ``__call__``
(and of ``SoftmaxCore.finish``, now ``finish(inp, o)``) and turn each
``intermediates[name] = x`` into ``record(self, name, x)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jattn import masks
from models.config import AttentionConfig
from models.kv_cache import CachePolicy

__all__ = ["AuxLoss", "CoreInputs", "Core", "NoOptions", "repeat_kv"]


class AuxLoss(nnx.Variable):
    """An auxiliary training loss a core recomputes on each forward (e.g. MoH load balance).

    Read inside the same trace as the forward: ``model.aux_loss()`` sums them.
    """


class CoreInputs(NamedTuple):
    """What a core sees. ``q [B, T, Hq, Dh]``, ``k, v [B, T, Hkv, Dh]`` are projected (and
    QK-normed) but not rotated; ``x [B, T, D]`` is the block input (for data-dependent gates);
    ``positions`` ``[T]`` or ``[B, T]`` are absolute positions."""

    x: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    positions: jax.Array


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a core that takes none beyond :class:`AttentionConfig`'s shared fields."""


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, T, Hkv, D] -> [B, T, Hq, D]`` (kv head ``h // G`` serves query head ``h``)."""
    g = num_heads // x.shape[2]
    return x if g == 1 else jnp.repeat(x, g, axis=2)


class Core(nnx.Module):
    """Base class of attention cores. Subclasses implement ``__call__``, ``init_cache``,
    ``decode``, and declare their own options (``Options``, a frozen dataclass whose fields
    are read from :attr:`AttentionConfig.options` into ``self.opts``).

    ``__call__(inp) -> o [B, T, Hq, Dh]``: the full-sequence form; it may record analysis
    tensors (e.g. ``"attention_weights" [B, Hq, T, T]``; see the module docstring).

    ``decode(inp, cache, index, policy) -> (o, cache)``: ``inp`` holds ``Tq`` new tokens at absolute
    positions ``index .. index + Tq - 1`` (``index`` a traced int scalar); all previous tokens
    are summarized by ``cache``.

    ``state_size(seq_len)``: floats per sequence that decoding keeps after ``seq_len`` tokens.

    ``has_causal_form``: False for a non-causal-only core (agent attention): a causal
    ``AttentionConfig`` (a decoder's) is refused by :func:`models.registry.check_mechanism`.

    ``context_parallel``: True when ``__call__`` honours ``cfg.context_axis`` (the sequence
    split over that mesh axis, same result); :func:`models.registry.check_mechanism` refuses a
    ``context_axis`` for a core that leaves it False (the default, so a new core opts in).
    """

    kind: ClassVar[str] = "softmax"
    Options: ClassVar[type] = NoOptions
    context_parallel: ClassVar[bool] = False
    has_causal_form: ClassVar[bool] = True

    def __init__(self, cfg: AttentionConfig, mask: masks.Mask | None):
        self.cfg = cfg
        self.mask = mask
        self.opts = self.Options(**cfg.options_for(self.Options))

    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        raise NotImplementedError

    def decode(self, inp: CoreInputs, cache: dict, index: jax.Array, policy: CachePolicy):
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:
        """Floats of the decoding cache for one sequence of ``seq_len`` tokens (by default the
        float leaves of ``init_cache(1, seq_len)``, evaluated abstractly)."""
        cache = jax.eval_shape(lambda: self.init_cache(1, seq_len, CachePolicy()))
        return _float_count(cache)


def _float_count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)
                   if jnp.issubdtype(x.dtype, jnp.floating)))
