"""Short causal depthwise convolutions over time, carried across decoding steps.

Mamba / Mamba-2 and the DeltaNet family (DeltaNet, Gated DeltaNet, KDA, DeltaProduct: fla's
``ShortConvolution``) pass their projections through a width-``W`` (usually 4) causal depthwise
convolution and SiLU before the recurrence:

    y_t[c] = silu(b[c] + sum_{i=0}^{W-1} w_i[c] u_{t-W+1+i}[c])        (u_s = 0 for s < 0)

It gives each token a little local context before it is written to the state, which is what
lets linear attention do associative recall (H3's "shift" SSM, Fu et al. 2023; the Zoology
study, Arora et al. 2024). Decoding carries the last ``W - 1`` inputs; the convolution runs in
fp32 on global arrays, so under context parallelism XLA fetches the ``W - 1`` token halo from
the neighbouring shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.kv_cache import CachePolicy
from models.sharding import param

__all__ = ["ShortConv", "ConvCarry", "check_conv_width"]


def check_conv_width(width, *, allow_zero: bool) -> int:
    """``width`` as a validated int (``conv_width`` option): >= 1, or >= 0 with ``allow_zero``."""
    low = 0 if allow_zero else 1
    if not isinstance(width, int) or isinstance(width, bool) or width < low:
        raise ValueError(f"conv_width must be an int >= {low}, got {width!r}")
    return width


class ShortConv(nnx.Module):
    """Causal depthwise convolution of ``u [B, T, *features]`` (width ``W``), then SiLU.

    ``features`` and ``axes`` (their logical sharding names) give the per-channel kernel
    ``[W, *features]`` and, with ``bias``, ``b [*features]``. ``__call__(u, past)`` returns
    ``(y, new_past)``: ``past [B, W-1, *features]`` are the inputs before ``u`` (zeros at the
    start of a sequence), ``new_past`` the last ``W - 1`` inputs including ``u``'s.
    """

    def __init__(self, width: int, features: tuple[int, ...], axes: tuple, *, bias: bool,
                 rngs: nnx.Rngs):
        self.width = check_conv_width(width, allow_zero=False)
        self.features = tuple(features)
        # fan_in = W per channel (a depthwise conv): std 1/sqrt(W), as PyTorch's Conv1d bound
        self.kernel = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(width)),
                            (width,) + self.features, (None,) + tuple(axes))
        self.bias = (param(rngs, nnx.initializers.zeros_init(), self.features, tuple(axes))
                     if bias else None)

    def zero_past(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.width - 1) + self.features, jnp.float32)

    def __call__(self, u: jax.Array, past: jax.Array | None = None):
        u = u.astype(jnp.float32)
        if past is None:
            past = self.zero_past(u.shape[0])
        full = jnp.concatenate([past.astype(jnp.float32), u], axis=1)
        t, w = u.shape[1], self.width
        kernel = self.kernel[...].astype(jnp.float32)
        y = sum(full[:, i : i + t] * kernel[i] for i in range(w))
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return jax.nn.silu(y), full[:, full.shape[1] - (w - 1):]


class ConvCarry:
    """Mixin for a :class:`~models.cores.recurrent.RecurrentCore` whose layer starts with short
    convolutions: the decoding cache holds the recurrent ``"state"`` and the convolutions'
    last inputs (``"conv"``, a pytree of ``[B, W-1, ...]`` arrays).

    The core implements ``conv_past(batch)`` (that pytree, zeros) and ``layer(inp, state, past,
    want_state, context_axis=None) -> (o, final_state, new_past)``.
    """

    def conv_past(self, batch: int):
        raise NotImplementedError

    def layer(self, inp, state, past, want_state, context_axis=None):
        raise NotImplementedError

    def recur(self, inp, state, want_state, *, context_axis=None):
        o, final, _ = self.layer(inp, state, self.conv_past(inp.q.shape[0]), want_state,
                                 context_axis)
        return o, final

    def state_size(self, seq_len: int) -> int:
        """The recurrent state plus the ``W - 1`` carried inputs of every convolution."""
        carried = sum(math.prod(x.shape) for x in jax.tree.leaves(self.conv_past(1)))
        return super().state_size(seq_len) + carried

    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        return {**super().init_cache(batch, max_len, policy), "conv": self.conv_past(batch)}

    def decode(self, inp, cache: dict, index: jax.Array, policy: CachePolicy):
        o, state, past = self.layer(inp, cache["state"], cache["conv"], True)
        return o, {**cache, "state": state.astype(jnp.float32), "conv": past}
