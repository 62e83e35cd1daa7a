"""RWKV-7 "Goose" time mixing (Peng et al. 2025) as an attention core on
:func:`jattn.linear.dplr_delta_rule`: token shift, the diagonal-plus-low-rank transition with the
LoRA decay, in-context learning rate and key normalization/removal, per-head GroupNorm, bonus
term and output gate (what differs from the paper is in the class docstring)."""

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

GROUP_NORM_EPS = 64e-5  # RWKV-7's ln_x: GroupNorm(H groups, eps = 1e-5 * 8^2)


class _LoRA(nnx.Module):
    """``x -> act(x W_down) W_up (+ b)``, ``W_down [D, r]``, ``W_up [r, H, K]`` (RWKV-7's LoRAs)."""

    def __init__(self, cfg: AttentionConfig, rank: int, act, bias: bool, *, rngs: nnx.Rngs):
        self.act = act
        self.down = Dense((cfg.d_model,), (rank,), ("embed",), (None,), rngs=rngs)
        self.up = Dense((rank,), (cfg.num_heads, cfg.dh), (None,), ("heads", "kv"),
                        use_bias=bias, init_scale=0.1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.act(self.down(x))).astype(jnp.float32)


def _shift(x: jax.Array, prev: jax.Array | None) -> jax.Array:
    """``x_{t-1} - x_t`` along axis 1; ``prev`` (the token before ``x``, or zeros) at t = 0."""
    first = jnp.zeros_like(x[:, :1]) if prev is None else prev[:, None].astype(x.dtype)
    return jnp.concatenate([first, x[:, :-1]], axis=1) - x


def group_norm(o: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """Per-head LayerNorm of ``o [B, T, H, K]`` (RWKV's ``GroupNorm`` with ``H`` groups), fp32."""
    o = o.astype(jnp.float32)
    mean = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mean), axis=-1, keepdims=True)
    return (o - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS) * weight + bias


@register_mechanism("rwkv7")
class RWKV7(_RecurrentBase):
    """RWKV-7 "Goose" time mixing (Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State
    Evolution", 2025) on :func:`jattn.linear.dplr_delta_rule`.

    Token shift (the paper's lerp, ``xx = x_{t-1} - x_t``; the cache keeps the last token):
    ``x_* = x + xx * mu_*`` for the decay / ICL / gate inputs, and the same lerp on the
    projected ``r, k, v`` (``r = q + (q_{t-1} - q_t) * mu_r`` per head channel: the block owns
    the projections, so the lerp is applied after them; with ``mu`` constant over the model
    channels this is the paper's ``(x + xx * mu) W``). Then decay
    ``w = exp(-0.606531 sigmoid(w_0 + tanh(x_w W_1) W_2))`` (per channel; the paper's
    ``exp(-exp(-softplus(-z) - 0.5))``), in-context learning rate
    ``a = sigmoid(a_0 + x_a A_1 A_2)``, normalized removal key ``kappa_hat = l2norm(k * k_k)``,
    ``k~ = k * (1 + (a - 1) * k_a)``; the state follows

        S_t = (diag(w_t) - (a_t * kappa_hat_t)^T kappa_hat_t) S_{t-1} + k~_t^T v_t

    (RWKV's ``wkv [V, K]`` transposed: DPLR with ``a = -a_t * kappa_hat``, ``b = kappa_hat``),
    ``o_t = r_t S_t`` (no ``1/sqrt(K)``), per-head GroupNorm (LayerNorm with weight and bias,
    eps ``64e-5``), plus the bonus ``(r_t . (r_k * k~_t)) v_t``, times the output gate
    ``sigmoid(x_g G_1) G_2``. Omitted: the value residual across layers (``v`` mixed with the
    first layer's ``v``: the core sees one layer) and the channel-mix block (the decoder's MLP
    stands in). Option ``rwkv7_lora_rank``.
    """

    out_gate = False
    out_norm = False  # RWKV-7's own GroupNorm below
    context_parallel = False  # jattn.linear.dplr_delta_rule takes no context_axis

    @dataclasses.dataclass(frozen=True)
    class Options:
        rwkv7_lora_rank: int = 16  # rank of the decay / ICL / gate LoRAs

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        r, h, dh = self.opts.rwkv7_lora_rank, cfg.num_heads, cfg.dh
        zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
        half = nnx.initializers.constant(0.5)
        self.mix = param(rngs, half, (3, cfg.d_model), (None, "embed"))  # w, a, g inputs
        self.mix_rkv = param(rngs, half, (3, h, dh), (None, "heads", "kv"))  # r, k, v
        self.decay = _LoRA(cfg, r, jnp.tanh, True, rngs=rngs)
        self.icl = _LoRA(cfg, r, lambda x: x, True, rngs=rngs)
        self.gate = _LoRA(cfg, r, jax.nn.sigmoid, False, rngs=rngs)
        self.k_k = param(rngs, nnx.initializers.constant(0.85), (h, dh), ("heads", "kv"))
        self.k_a = param(rngs, ones, (h, dh), ("heads", "kv"))
        self.r_k = param(rngs, zeros, (h, dh), ("heads", "kv"))
        self.ln_w = param(rngs, ones, (h, dh), ("heads", "kv"))
        self.ln_b = param(rngs, zeros, (h, dh), ("heads", "kv"))

    def init_cache(self, batch, max_len, policy):
        h, dh = self.cfg.num_heads, self.cfg.dh
        return {**super().init_cache(batch, max_len, policy),
                "x_prev": jnp.zeros((batch, self.cfg.d_model), jnp.float32),
                "rkv_prev": jnp.zeros((batch, 3, h, dh), jnp.float32)}

    def state_size(self, seq_len):
        # the state and the token shift (the last x and the last projected r, k, v)
        return super().state_size(seq_len) + self.cfg.d_model + 3 * self.cfg.num_heads * self.cfg.dh

    def decode(self, inp, cache, index, policy):
        o, state, rkv_last = self._time_mix(inp, cache["state"], True, cache["x_prev"],
                                            cache["rkv_prev"])
        return o, {**cache, "state": state.astype(jnp.float32),
                   "x_prev": inp.x[:, -1].astype(jnp.float32), "rkv_prev": rkv_last}

    def recur(self, inp, state, want_state):
        o, final, _ = self._time_mix(inp, state, want_state, None, None)
        return o, final

    def _time_mix(self, inp, state, want_state, x_prev, rkv_prev):
        x = inp.x
        xx = _shift(x, x_prev)
        mix = self.mix[...].astype(x.dtype)
        x_w, x_a, x_g = (x + xx * mix[i] for i in range(3))
        rkv = [t.astype(jnp.float32) for t in self.heads(inp)]
        rkv_last = jnp.stack([t[:, -1] for t in rkv], axis=1)
        mix_rkv = self.mix_rkv[...]
        r, k, v = (t + _shift(t, None if rkv_prev is None else rkv_prev[:, i]) * mix_rkv[i]
                   for i, t in enumerate(rkv))
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
        o = group_norm(o, self.ln_w[...], self.ln_b[...])
        bonus = jnp.sum(r * k * self.r_k[...], axis=-1, keepdims=True) * v
        return ((o + bonus) * self.gate(x_g)).astype(inp.v.dtype), final, rkv_last
