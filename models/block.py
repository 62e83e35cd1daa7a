"""Pre-norm residual block shared by the decoder and the ViT.

``h = h + Attn(Norm_1(h))``; ``h = h + MLP(Norm_2(h))`` (Xiong et al., "On Layer Normalization
in the Transformer Architecture", 2020). ``mlp="none"`` drops the MLP sub-block and its norm;
``norm="none"`` makes both norms the identity (the theory experiments use both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import AttentionBlock
from models.config import AttentionConfig
from models.intermediates import record
from models.kv_cache import CachePolicy
from models.layers import MLP, make_norm
from models.sharding import constrain

__all__ = ["TransformerBlock"]


class TransformerBlock(nnx.Module):
    """One pre-norm layer: attention (any registered mechanism) then an optional MLP."""

    def __init__(self, attn: AttentionConfig, *, mlp: str = "swiglu", mlp_dim: int | None = None,
                 norm: str = "rmsnorm", use_bias: bool = False, out_init_scale: float = 1.0,
                 rngs: nnx.Rngs):
        d = attn.d_model
        self.attn_norm = make_norm(norm, d, use_bias=use_bias, rngs=rngs)
        self.attn = AttentionBlock(attn, out_init_scale=out_init_scale, rngs=rngs)
        if mlp == "none":
            self.mlp_norm = self.mlp = None
        else:
            self.mlp_norm = make_norm(norm, d, use_bias=use_bias, rngs=rngs)
            self.mlp = MLP(d, mlp_dim or 4 * d, mlp, use_bias=use_bias,
                           init_scale_out=out_init_scale, rngs=rngs)

    def __call__(self, h: jax.Array, *, positions: jax.Array | None = None) -> jax.Array:
        """``h [B, T, D] -> [B, T, D]``. Records ``residual_norms [B, T]`` (``||h||`` after
        this layer) for :func:`models.capture_intermediates`."""
        h = h + self.attn(self.attn_norm(h), positions=positions).astype(h.dtype)
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h)).astype(h.dtype)
        record(self, "residual_norms", lambda: jnp.linalg.norm(h.astype(jnp.float32), axis=-1))
        # The residual stream between blocks: rows over data x fsdp, the sequence over context,
        # the width whole. Pins XLA's propagation so a block's weights are gathered (FSDP) and
        # its activations are not (and tensor-parallel partial sums are reduced here).
        return constrain(h, ("batch", "length", "embed"))

    def decode(self, h: jax.Array, cache: dict, index: jax.Array,
               policy: CachePolicy) -> tuple[jax.Array, dict]:
        a, cache = self.attn.decode(self.attn_norm(h), cache, index, policy)
        h = h + a.astype(h.dtype)
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h)).astype(h.dtype)
        return h, cache
