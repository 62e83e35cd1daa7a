"""The Mamba-2 layer as a core (Dao & Gu 2024, "Transformers are SSMs"): mechanism ``"mamba2"``.

The block's projections play Mamba-2's in-projection: ``q, k, v`` are ``C, B, X`` (``k, v``
expanded to all heads as Mamba-2's groups); the core adds the rest of the layer:

1. a short causal depthwise convolution (width ``conv_width`` = 4, with bias) over the
   channels of ``[C, B, X]``, then SiLU;
2. ``dt = softplus(x W_dt + dt_bias)`` per head (``dt_bias`` so that ``dt ~ logU(1e-3, 0.1)``),
   ``A = -exp(A_log)`` (``A ~ U(1, 16)``);
3. SSD: ``S_t = exp(A dt_t) S_{t-1} + B_t^T (dt_t X_t)``, ``y_t = C_t S_t`` through
   :func:`jattn.linear.gla` with the scalar gate ``g = A dt`` (scale 1);
4. the ``D`` skip ``y + D_h X``, then the gated RMSNorm ``RMSNorm(y * silu(x W_z)) * w``
   (per head; Mamba-2's ``norm_before_gate=False``); the block applies the out-projection.

Decoding carries the SSM state and the last ``conv_width - 1`` convolution inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import jattn.linear
from models.cores.base import CoreInputs, repeat_kv
from models.cores.recurrent import (
    RecurrentCore,
    _a_log_init,
    _dt_bias_init,
    linear_kwargs,
    ssd_decay,
)
from models.cores.short_conv import ConvCarry, ShortConv
from models.layers import Dense
from models.registry import register_mechanism
from models.sharding import param

__all__ = ["Mamba2"]


@register_mechanism("mamba2")
class Mamba2(ConvCarry, RecurrentCore):
    """Mamba-2 layer (module docstring): conv + SiLU on ``[C, B, X]``, softplus ``dt``,
    ``A_log``, SSD via ``jattn.linear.gla`` (scalar gate), ``D`` skip, gated RMSNorm."""

    @dataclasses.dataclass(frozen=True)
    class Options:
        conv_width: int = 4  # the short causal depthwise convolution

    def __init__(self, cfg, mask, arg=None, *, rngs: nnx.Rngs):
        if arg is not None or cfg.mask is not None:
            raise ValueError(f"mechanism 'mamba2' takes no argument and no mask pattern, got "
                             f"arg={arg!r}, mask={cfg.mask!r}")
        super().__init__(cfg, mask)
        h, hkv, dh = cfg.num_heads, cfg.kv_heads, cfg.dh
        # one depthwise conv over the concatenated [C, B, X] channels (Mamba-2's xBC conv)
        self.conv = ShortConv(self.opts.conv_width, ((h + 2 * hkv) * dh,), (None,), bias=True,
                              rngs=rngs)
        self.dt_proj = Dense((cfg.d_model,), (h,), ("embed",), ("heads",), rngs=rngs)
        self.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",))
        self.a_log = param(rngs, _a_log_init, (h,), ("heads",))
        self.d_skip = param(rngs, nnx.initializers.ones_init(), (h,), ("heads",))
        self.z_proj = Dense((cfg.d_model,), (h, dh), ("embed",), ("heads", "kv"), rngs=rngs)
        self.norm = param(rngs, nnx.initializers.ones_init(), (dh,), ("kv",))

    def layer(self, inp: CoreInputs, state, past, want_state, context_axis=None):
        b, t = inp.q.shape[:2]
        h, dh = self.cfg.num_heads, self.cfg.dh
        hkv = inp.k.shape[2]
        u = jnp.concatenate([inp.q.reshape(b, t, -1), inp.k.reshape(b, t, -1),
                             inp.v.reshape(b, t, -1)], axis=-1)
        c, new_past = self.conv(u, past)
        cq, ck, cv = jnp.split(c, [h * dh, (h + hkv) * dh], axis=-1)
        C = cq.reshape(b, t, h, dh)
        B = repeat_kv(ck.reshape(b, t, hkv, dh), h)
        X = repeat_kv(cv.reshape(b, t, hkv, dh), h)
        dt, g = ssd_decay(self.a_log, self.dt_bias, self.dt_proj(inp.x))  # [B, T, H]
        kw = {**linear_kwargs(self.cfg), "scale": 1.0}
        y, final = jattn.linear.gla(C, B, X * dt[..., None], g, initial_state=state,
                                    output_final_state=want_state, **kw)
        y = y + self.d_skip[...][:, None] * X
        y = y * jax.nn.silu(self.z_proj(inp.x).astype(jnp.float32))
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * self.norm[...]
        return y.astype(inp.q.dtype), final, new_past

    def conv_past(self, batch):
        return self.conv.zero_past(batch)
