"""Hybrid cores: one block with both a recurrent state and a KV cache.

=====================  ==========================================================================
based                  Taylor linear attention + sliding-window softmax (Arora et al. 2024)
=====================  ==========================================================================
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from models.cores.base import Core, repeat_kv
from models.cores.recurrent import Kernelized
from models.cores.softmax import SoftmaxCore
from models.kv_cache import CachePolicy
from models.layers import Dense
from models.patterns import build_mask
from models.registry import register_mechanism

__all__ = ["Based"]


@register_mechanism("based")
class Based(Core):
    """Based (Arora et al., "Simple linear attention language models balance the
    recall-throughput tradeoff", 2024), in one block: the sum of

    * Taylor linear attention on q, k projected to ``feature_dim`` (option, 16) per head,
      ``phi(q) . phi(k) = 1 + s + s^2 / 2`` (``jattn.linear.taylor``), normalized, and
    * sliding-window softmax attention (option ``window``, 64) on the block's q, k, v.

    (The paper interleaves the two as separate layers; here one block carries both branches,
    and a pure layer of either kind is ``"linear:taylor"`` / ``"sliding_window:W"``.) Decoding
    keeps the linear state and a KV cache for the window branch. Both branches run context
    parallel (``cfg.context_axis``; the window branch is a :class:`SoftmaxCore` with this cfg).
    """

    kind = "hybrid"
    context_parallel = True

    @dataclasses.dataclass(frozen=True)
    class Options:
        window: int = 64  # sliding window of the softmax branch
        feature_dim: int = 16  # projected q/k width of the Taylor branch (Arora et al.: 16)

    def __init__(self, cfg, mask, arg=None, *, rngs):
        if arg is not None:
            raise ValueError(f"mechanism 'based' takes no argument, got {arg!r}")
        super().__init__(cfg, mask)
        f = self.opts.feature_dim
        self.q_feat = Dense((cfg.d_model,), (cfg.num_heads, f), ("embed",), ("heads", None),
                            rngs=rngs)
        self.k_feat = Dense((cfg.d_model,), (cfg.num_heads, f), ("embed",), ("heads", None),
                            rngs=rngs)
        self.kernel = Kernelized("taylor", f, cfg.num_heads, rngs=rngs)
        w = self.opts.window
        self.window = SoftmaxCore(cfg, build_mask(cfg, f"sliding_window:{w}"), kv_window=w)

    def _linear(self, inp, state, want_state, context_axis=None):
        qf, kf = self.q_feat(inp.x), self.k_feat(inp.x)
        v = repeat_kv(inp.v, self.cfg.num_heads)
        return self.kernel(qf, kf, v, state, want_state, causal=self.cfg.causal, cfg=self.cfg,
                           context_axis=context_axis)

    def __call__(self, inp):
        lin, _ = self._linear(inp, None, False, self.cfg.context_axis)
        return lin + self.window(inp)  # the window core records its attention weights

    def init_cache(self, batch, max_len, policy):
        h, f = self.cfg.num_heads, self.opts.feature_dim
        nf = self.kernel.num_features(h, f)
        return {"kv": jnp.zeros((batch, h, nf, self.cfg.dh), jnp.float32),
                "z": jnp.zeros((batch, h, nf), jnp.float32),
                "window": self.window.init_cache(batch, max_len, policy)}

    def decode(self, inp, cache, index, policy: CachePolicy):
        lin, state = self._linear(inp, {"kv": cache["kv"], "z": cache["z"]}, True)
        win, wcache = self.window.decode(inp, cache["window"], index, policy)
        return lin + win, {**state, "window": wcache}

    def state_size(self, seq_len):
        """The Taylor branch's ``H F Dh + H F`` plus the window's ``2 min(window, T) Hkv Dh``."""
        h, d = self.cfg.num_heads, self.cfg.dh
        f = self.kernel.num_features(h, self.opts.feature_dim)
        return h * f * d + h * f + self.window.state_size(seq_len)
