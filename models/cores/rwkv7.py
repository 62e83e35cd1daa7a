"""RWKV-7 "Goose" time mixing (simplified) as an attention core on
:func:`jattn.linear.dplr_delta_rule`: the diagonal-plus-low-rank transition, token shift, LoRA
decay / in-context-learning-rate / gate, bonus term and output gate (what is simplified is in the
class docstring)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
import jattn.linear
from models.config import AttentionConfig
from models.cores.recurrent import _RecurrentBase, linear_kwargs
from models.layers import Dense
from models.registry import register_mechanism
from models.sharding import param


class _LoRA(nnx.Module):
    """``x -> act(x W_down) W_up (+ b)``, ``W_down [D, r]``, ``W_up [r, H, K]`` (RWKV-7's LoRAs)."""

    def __init__(self, cfg: AttentionConfig, rank: int, act, bias: bool, *, rngs: nnx.Rngs):
        self.act = act
        self.down = Dense((cfg.d_model,), (rank,), ("embed",), (None,), rngs=rngs)
        self.up = Dense((rank,), (cfg.num_heads, cfg.dh), (None,), ("heads", "kv"),
                        use_bias=bias, init_scale=0.1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.act(self.down(x))).astype(jnp.float32)


@register_mechanism("rwkv7")
class RWKV7(_RecurrentBase):
    """RWKV-7 "Goose" time mixing (Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State
    Evolution", 2025), simplified, on :func:`jattn.linear.dplr_delta_rule`.

    With ``xx = x_{t-1} - x_t`` (token shift; the cache keeps the last token) and learned mixes
    ``x_* = x + xx * mu_*``: decay ``w = exp(-0.606531 sigmoid(w_0 + tanh(x_w W_1) W_2))``
    (per channel), in-context learning rate ``a = sigmoid(a_0 + x_a A_1 A_2)``,
    ``kappa_hat = l2norm(k * k_k)``, ``k~ = k * (1 + (a - 1) * k_a)``; the state follows

        S_t = (diag(w_t) - (a_t * kappa_hat_t)^T kappa_hat_t) S_{t-1} + k~_t^T v_t

    (RWKV's ``wkv [V, K]`` transposed: DPLR with ``a = -a_t * kappa_hat``, ``b = kappa_hat``),
    ``o_t = r_t S_t`` (``r`` = the block's query, no ``1/sqrt(K)``), per-head RMSNorm, plus
    the bonus ``sum(r_t * k~_t * r_k) v_t``, times the output gate
    ``sigmoid(x_g G_1) G_2``. Implemented: token shift for the decay / ICL / gate inputs, the
    LoRA decay, ICL rate, key normalization and key-rate coupling, bonus, output gate.
    Omitted: token shift of r/k/v (the block projects them from ``x``), the value residual
    across layers, GroupNorm (RMSNorm here), the channel-mix block. Option
    ``rwkv7_lora_rank``.
    """

    out_gate = False
    context_parallel = False  # jattn.linear.dplr_delta_rule takes no context_axis

    @dataclasses.dataclass(frozen=True)
    class Options:
        rwkv7_lora_rank: int = 16  # rank of the decay / ICL / gate LoRAs

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        r, h, dh = self.opts.rwkv7_lora_rank, cfg.num_heads, cfg.dh
        zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
        self.mix = param(rngs, nnx.initializers.constant(0.5), (3, cfg.d_model), (None, "embed"))
        self.decay = _LoRA(cfg, r, jnp.tanh, True, rngs=rngs)
        self.icl = _LoRA(cfg, r, lambda x: x, True, rngs=rngs)
        self.gate = _LoRA(cfg, r, jax.nn.sigmoid, False, rngs=rngs)
        self.k_k = param(rngs, nnx.initializers.constant(0.85), (h, dh), ("heads", "kv"))
        self.k_a = param(rngs, ones, (h, dh), ("heads", "kv"))
        self.r_k = param(rngs, zeros, (h, dh), ("heads", "kv"))

    def init_cache(self, batch, max_len, policy):
        return {**super().init_cache(batch, max_len, policy),
                "x_prev": jnp.zeros((batch, self.cfg.d_model), jnp.float32)}

    def state_size(self, seq_len):
        return super().state_size(seq_len) + self.cfg.d_model  # the state and the token shift

    def decode(self, inp, cache, index, policy):
        o, state = self._time_mix(inp, cache["state"], True, cache["x_prev"])
        return o, {**cache, "state": state.astype(jnp.float32),
                   "x_prev": inp.x[:, -1].astype(jnp.float32)}

    def recur(self, inp, state, want_state):
        return self._time_mix(inp, state, want_state, None)

    def _time_mix(self, inp, state, want_state, x_prev):
        x = inp.x
        first = jnp.zeros_like(x[:, :1]) if x_prev is None else x_prev[:, None].astype(x.dtype)
        xx = jnp.concatenate([first, x[:, :-1]], axis=1) - x
        mix = self.mix[...].astype(x.dtype)
        x_w, x_a, x_g = (x + xx * mix[i] for i in range(3))
        r, k, v = self.heads(inp)
        r, k, v = (t.astype(jnp.float32) for t in (r, k, v))
        g = -0.606531 * jax.nn.sigmoid(self.decay(x_w))  # log of RWKV-7's decay w
        a = jax.nn.sigmoid(self.icl(x_a))
        kappa = jattn.linear.l2norm(k * self.k_k[...])
        k = k * (1 + (a - 1) * self.k_a[...])
        kw = linear_kwargs(self.cfg)
        kw.update(scale=1.0 if self.cfg.scale is None else self.cfg.scale)
        if kw["implementation"] == "pallas":
            kw["implementation"] = None  # no DPLR kernel: None falls back to the chunk form
        o, final = jattn.linear.dplr_delta_rule(r, k, v, -a * kappa, kappa, g=g,
                                                initial_state=state,
                                                output_final_state=want_state, **kw)
        o = self.out(x, o)
        bonus = jnp.sum(r * k * self.r_k[...], axis=-1, keepdims=True) * v
        return ((o + bonus) * self.gate(x_g)).astype(inp.v.dtype), final
