"""Linear-cost cores with softmax-like normalization: agent attention and Flowformer.

=================  ===============================================================================
agent              agent tokens (pooled queries) between two softmax attentions, plus a
                   depthwise conv of V (Han et al., ECCV 2024); non-causal only (ViT)
flowformer         flow attention: sigmoid features, conservation-normalized competition and
                   allocation (Wu et al., ICML 2022); causal (decoders) or not (ViT)
=================  ===============================================================================

Agent attention runs the full sequence only (the paper defines no causal form, so no decoding);
causal Flowformer decodes with a fixed-size state of prefix sums
(:class:`jattn.linear.FlowState`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.linear import FlowState, agent_attention, flow_attention, flow_attention_recurrent
from models.cores.base import Core, CoreInputs, repeat_kv
from models.registry import register_mechanism
from models.sharding import param

__all__ = ["Agent", "Flowformer"]


def _no_arg(cfg, arg) -> None:
    if arg is not None:
        raise ValueError(f"mechanism {cfg.mechanism_name!r} takes no argument, got {arg!r}")


class _NonCausal(Core):
    def init_cache(self, batch, max_len, policy):
        raise NotImplementedError(f"mechanism {self.cfg.mechanism_name!r} is non-causal here: "
                                  f"it has no decoding cache")

    def decode(self, inp, cache, index, policy):
        raise NotImplementedError(f"mechanism {self.cfg.mechanism_name!r} is non-causal here: "
                                  f"it does not decode")


@register_mechanism("agent")
class Agent(_NonCausal):
    """Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear
    Attention", ECCV 2024): ``O = softmax(Q A^T + B_2) softmax(A K^T + B_1) V + DWC(V)`` with
    agents ``A`` the queries average-pooled over tokens into ``num_agents`` bins
    (:func:`jattn.linear.agent_attention`).

    Options: ``num_agents`` (``n``; ``min(n, T)`` are used), ``agent_dwc`` (width of the
    depthwise convolution of ``V`` over tokens, added to the output; 0 = none; the paper's
    3x3 over the image grid, here 1-D over the token sequence), ``agent_bias_len`` (> 0:
    learned agent biases ``B_1 [H, n, L]``, ``B_2 [H, L, n]`` for up to ``L`` tokens, zero
    init; the paper factorizes them by image rows/columns, here one table per head).
    Non-causal only: a causal config raises.
    """

    has_causal_form = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        num_agents: int = 16
        agent_dwc: int = 3
        agent_bias_len: int = 0

    def __init__(self, cfg, mask, arg=None, *, rngs: nnx.Rngs):
        _no_arg(cfg, arg)
        if mask is not None:
            raise ValueError("mechanism 'agent': agent attention is non-causal and takes no "
                             "mask (its agents pool every query; the paper defines no causal "
                             "form); use it with causal=False and no mask pattern (e.g. a ViT)")
        super().__init__(cfg, mask)
        n, w, length = self.opts.num_agents, self.opts.agent_dwc, self.opts.agent_bias_len
        for name, value, low in (("num_agents", n, 1), ("agent_dwc", w, 0),
                                 ("agent_bias_len", length, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        h, hkv, dh = cfg.num_heads, cfg.kv_heads, cfg.dh
        self.dwc = (param(rngs, nnx.initializers.lecun_normal(), (w, hkv, dh),
                          (None, "heads", "kv")) if w else None)
        zeros, axes = nnx.initializers.zeros_init(), ("heads", None, None)
        self.bias_agg = param(rngs, zeros, (h, n, length), axes) if length else None
        self.bias_bcast = param(rngs, zeros, (h, length, n), axes) if length else None

    def _depthwise(self, v: jax.Array) -> jax.Array:
        """``sum_i w_i v_{t + i - (W-1)//2}`` over tokens (zero padded), per channel."""
        w = self.opts.agent_dwc
        left = (w - 1) // 2
        padded = jnp.pad(v.astype(jnp.float32), ((0, 0), (left, w - 1 - left), (0, 0), (0, 0)))
        t = v.shape[1]
        return sum(padded[:, i:i + t] * self.dwc[i] for i in range(w))

    def __call__(self, inp: CoreInputs) -> jax.Array:
        t = inp.q.shape[1]
        n = min(self.opts.num_agents, t)
        bias = None
        if self.bias_agg is not None:
            if t > self.opts.agent_bias_len:
                raise ValueError(f"mechanism 'agent': agent_bias_len="
                                 f"{self.opts.agent_bias_len} is shorter than the input (T={t})")
            bias = (self.bias_agg[:, :n, :t], self.bias_bcast[:, :t, :n])
        impl = "reference" if self.cfg.implementation == "reference" else None
        o = agent_attention(inp.q, inp.k, inp.v, num_agents=n, scale=self.cfg.scale,
                            agent_bias=bias, implementation=impl)
        if self.dwc is not None:
            conv = repeat_kv(self._depthwise(inp.v), self.cfg.num_heads)
            o = (o.astype(jnp.float32) + conv).astype(o.dtype)
        return o


@register_mechanism("flowformer")
class Flowformer(_NonCausal):
    """Flowformer (Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows",
    ICML 2022): :func:`jattn.linear.flow_attention` on the projected ``q, k, v``; causal when
    the block is (decoders), else the non-causal form. Option ``flow_clamp``: bound of the
    competition logits (1 in the paper's code). No positions (as the paper), no mask pattern.
    Causal decoding keeps a :class:`jattn.linear.FlowState` (``4 H K + H + H K V + 1`` floats).
    """

    kind = "recurrent"

    @dataclasses.dataclass(frozen=True)
    class Options:
        flow_clamp: float = 1.0

    def __init__(self, cfg, mask, arg=None, *, rngs: nnx.Rngs):
        _no_arg(cfg, arg)
        if cfg.mask is not None:
            raise ValueError("mechanism 'flowformer' takes no mask pattern (only causal or not)")
        super().__init__(cfg, mask)

    def __call__(self, inp: CoreInputs) -> jax.Array:
        impl = "reference" if self.cfg.linear_implementation == "reference" else None
        return flow_attention(inp.q, inp.k, inp.v, causal=self.cfg.causal,
                              clamp=self.opts.flow_clamp, implementation=impl)

    def init_cache(self, batch, max_len, policy):
        if not self.cfg.causal:
            return super().init_cache(batch, max_len, policy)
        h, dh = self.cfg.num_heads, self.cfg.dh
        return FlowState.zeros(batch, h, dh, dh)._asdict()

    def decode(self, inp, cache, index, policy):
        if not self.cfg.causal:
            return super().decode(inp, cache, index, policy)
        o, state = flow_attention_recurrent(inp.q, inp.k, inp.v, FlowState(**cache),
                                            clamp=self.opts.flow_clamp)
        return o, state._asdict()
