"""The attention block: projections, QK-norm, positions, and a core chosen by name.

``y = W_O core(x W_Q, x W_K, x W_V)`` with ``W_Q [D, Hq, Dh]``, ``W_K, W_V [D, Hkv, Dh]``,
``W_O [Hq, Dh, D]`` (logical axes ``("embed", "heads", "kv")``), optional RMSNorm on q and k,
RoPE or ALiBi applied inside softmax-family cores. The core comes from
:mod:`models.registry` by ``AttentionConfig.mechanism``::

    block = AttentionBlock(AttentionConfig(d_model=64, num_heads=4, mechanism="gated",
                                           position="rope"), rngs=nnx.Rngs(0))
    y = block(x)                                   # [B, T, D]
    y, inter = models.capture_intermediates(block, x)  # + attention weights, values

Decoding: ``cache = block.init_cache(B, max_len)``, then
``y, cache = block.decode(x_new, cache, index)`` for ``x_new [B, Tq, D]`` at absolute positions
``index .. index + Tq - 1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import AttentionConfig
from models.cores.base import CoreInputs
from models.intermediates import record
from models.kv_cache import CachePolicy
from models.layers import Dense, RMSNorm
from models.registry import build_core, check_mechanism

__all__ = ["AttentionBlock"]


class AttentionBlock(nnx.Module):
    """Multi-head attention with a pluggable core (see the module docstring)."""

    def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs, out_init_scale: float = 1.0):
        check_mechanism(cfg)
        self.cfg = cfg
        d, hq, hkv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dh
        self.q_proj = Dense((d,), (hq, dh), ("embed",), ("heads", "kv"), use_bias=cfg.use_bias,
                            rngs=rngs)
        self.k_proj = Dense((d,), (hkv, dh), ("embed",), ("heads", "kv"), use_bias=cfg.use_bias,
                            rngs=rngs)
        self.v_proj = Dense((d,), (hkv, dh), ("embed",), ("heads", "kv"), use_bias=cfg.use_bias,
                            rngs=rngs)
        self.o_proj = Dense((hq, dh), (d,), ("heads", "kv"), ("embed",), use_bias=cfg.use_bias,
                            init_scale=out_init_scale, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, axis_name="kv", rngs=rngs)
            self.k_norm = RMSNorm(dh, axis_name="kv", rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.core = build_core(cfg, rngs=rngs)

    @property
    def kind(self) -> str:
        """``"softmax"`` (KV cache), ``"recurrent"`` (state) or ``"hybrid"`` (both)."""
        return self.core.kind

    def _inputs(self, x: jax.Array, positions: jax.Array) -> CoreInputs:
        if x.ndim != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"x must have shape [B, T, D={self.cfg.d_model}], got {x.shape}")
        x = x.astype(self.cfg.dtype)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return CoreInputs(x, q, k, v, positions)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None) -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``; ``positions`` ``[T]`` / ``[B, T]`` (default
        ``arange(T)``). Records ``values [B, T, Hkv, Dh]`` and ``value_norms [B, T, Hkv]`` (and
        the core its own, e.g. ``attention_weights [B, Hq, T, T]``) for
        :func:`models.capture_intermediates`."""
        if positions is None:
            positions = jnp.arange(x.shape[1], dtype=jnp.int32)
        inp = self._inputs(x, positions)
        o = self.core(inp)
        record(self, "values", inp.v)
        record(self, "value_norms", lambda: jnp.linalg.norm(inp.v.astype(jnp.float32), axis=-1))
        return self.o_proj(o)

    def init_cache(self, batch: int, max_len: int,
                   policy: CachePolicy = CachePolicy()) -> dict:  # noqa: B008
        """Decoding cache of this block (KV cache or recurrent state, by the core's kind)."""
        return self.core.init_cache(batch, max_len, policy)

    def decode(self, x: jax.Array, cache: dict, index: jax.Array,
               policy: CachePolicy = CachePolicy()) -> tuple[jax.Array, dict]:  # noqa: B008
        """``x [B, Tq, D]`` at positions ``index + arange(Tq)`` -> ``(y [B, Tq, D], cache)``."""
        index = jnp.asarray(index, jnp.int32)
        positions = index + jnp.arange(x.shape[1], dtype=jnp.int32)
        o, cache = self.core.decode(self._inputs(x, positions), cache, index, policy)
        return self.o_proj(o), cache
