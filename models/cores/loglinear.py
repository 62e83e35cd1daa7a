"""Log-linear attention cores (Guo et al. 2025, "Log-Linear Attention"): GLA and Mamba-2 with a
Fenwick-tree hierarchy of states, through :func:`jattn.linear.loglinear_gla`.

=====================  ==========================================================================
loglinear_gla          GLA's per-channel low-rank decay, log-linear over Fenwick levels
loglinear_mamba2       Mamba-2's scalar decay ``-exp(A_log) softplus(x W_a + dt_bias)``, ditto
=====================  ==========================================================================

Both weight level ``l`` of query ``t`` by ``lambda_t^l = softplus(x_t W_lambda + b)`` (per head
and level; ``b`` starts at ``log(e - 1)`` so that ``lambda = 1`` at init, where the core equals
its linear-attention parent), then per-head RMSNorm and ``swish(x W_r)`` as the other linear
cores. The projection has ``max_levels`` outputs per head: sequences up to
``2^(max_levels - 1)`` tokens. Decoding keeps the Fenwick stack ``[B, max_levels - 1, H, K, V]``
(:func:`jattn.linear.loglinear_gla_step`); no context parallelism.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import jattn.linear
from jattn.linear.loglinear import num_levels
from models.cores.base import CoreInputs
from models.cores.recurrent import GLA, _RecurrentBase, init_ssd_decay, ssd_log_decay
from models.kv_cache import CachePolicy
from models.layers import Dense
from models.registry import register_mechanism

__all__ = ["LogLinearGLA", "LogLinearMamba2"]

_SOFTPLUS_INV_1 = math.log(math.e - 1.0)


class _LogLinearMixin:
    """Level weights, the full-sequence call and Fenwick-stack decoding, over ``gates()["g"]``."""

    context_parallel = False

    def _init_levels(self, cfg, rngs):
        self.level_proj = Dense((cfg.d_model,), (cfg.num_heads, self.opts.max_levels),
                                ("embed",), ("heads", None), use_bias=True, rngs=rngs)

    def level_weights(self, x: jax.Array) -> jax.Array:
        return jax.nn.softplus(self.level_proj(x).astype(jnp.float32) + _SOFTPLUS_INV_1)

    def recur(self, inp, state, want_state, *, context_axis=None):
        if state is not None or want_state:
            raise NotImplementedError(f"{self.cfg.mechanism_name!r} carries a Fenwick stack of "
                                      "states, not one state: use decode()")
        t, max_levels = inp.q.shape[1], self.opts.max_levels
        if num_levels(t) > max_levels:
            raise ValueError(f"{self.cfg.mechanism_name!r} with max_levels={max_levels} handles "
                             f"sequences up to {2 ** (max_levels - 1)} tokens, got {t}")
        q, k, v = self.heads(inp)
        g = self.gates(inp)["g"]
        impl = self.cfg.linear_implementation
        o = jattn.linear.loglinear_gla(
            q, k, v, g, self.level_weights(inp.x), scale=self.cfg.scale,
            chunk_size=self.cfg.chunk_size,
            implementation="reference" if impl == "reference" else "chunk")
        return self.out(inp.x, o), None

    def state_shape(self):
        return (self.opts.max_levels - 1, self.cfg.num_heads, self.cfg.dh, self.cfg.dh)

    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        return {"levels": jnp.zeros((batch,) + self.state_shape(), jnp.float32)}

    def decode(self, inp: CoreInputs, cache: dict, index: jax.Array, policy: CachePolicy):
        q, k, v = self.heads(inp)
        g, lam = self.gates(inp)["g"], self.level_weights(inp.x)

        def step(levels, x):
            o, levels = jattn.linear.loglinear_gla_step(*x[:5], levels, x[5],
                                                        scale=self.cfg.scale or q.shape[-1] ** -0.5)
            return levels, o

        t = q.shape[1]
        xs = tuple(a.swapaxes(0, 1) for a in (q, k, v, g, lam)) + (index + jnp.arange(t),)
        levels, o = jax.lax.scan(step, cache["levels"].swapaxes(0, 1), xs)
        o = self.out(inp.x, o.swapaxes(0, 1).astype(inp.q.dtype))
        return o, {**cache, "levels": levels.swapaxes(0, 1)}


@register_mechanism("loglinear_gla")
class LogLinearGLA(_LogLinearMixin, GLA):
    """Log-linear GLA (Guo et al. 2025): :class:`models.cores.recurrent.GLA`'s per-channel
    decay ``g = logsigmoid(x W_1 W_2 + b) / tau``, outputs mixed over Fenwick levels with
    ``lambda = softplus(x W_lambda + b_lambda)``."""

    @dataclasses.dataclass(frozen=True)
    class Options(GLA.Options):
        max_levels: int = 20  # Fenwick levels projected: sequences up to 2^(max_levels - 1)

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        self._init_levels(cfg, rngs)


@register_mechanism("loglinear_mamba2")
class LogLinearMamba2(_LogLinearMixin, _RecurrentBase):
    """Log-linear Mamba-2 (Guo et al. 2025): SSD's scalar decay
    ``g_t = -exp(A_log_h) softplus(x_t W_a + dt_bias_h)`` with q, k, v as Mamba-2's C, B, X,
    outputs mixed over Fenwick levels with ``lambda = softplus(x W_lambda + b_lambda)``.
    Mamba-2's convolution and ``D`` skip are omitted (see the ``mamba2`` core, when present)."""

    @dataclasses.dataclass(frozen=True)
    class Options:
        max_levels: int = 20  # Fenwick levels projected: sequences up to 2^(max_levels - 1)

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        init_ssd_decay(self, cfg, rngs)
        self._init_levels(cfg, rngs)

    def gates(self, inp):
        return {"g": ssd_log_decay(self, inp.x)}
