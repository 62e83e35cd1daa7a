"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021).

``images [B, H, W, C]`` -> non-overlapping ``p x p`` patches -> linear embedding (the stride-p
convolution) -> ``+`` learned (or fixed 2-D sin-cos) positions -> optional class token ->
pre-LN blocks -> LayerNorm -> class token or global average pool -> linear head.

Variants follow big_vision's ``"<size>/<patch>"`` strings: ``"Ti/16"``, ``"S/16"``,
``"M/16"``, ``"B/16"``, ``"L/16"``; tiny test variants ``"test/4"`` (width 16, 1 layer) and
``"mu/4"`` (width 32, 2 layers). Any registered attention mechanism works
(``mechanism="sigmoid"``, ``"gla"``, ...); 2-D local attention by ``mask``:
``"neighborhood:7"`` (NATTEN, Hassani et al. 2023; ``"neighborhood:7,2"`` dilated) or
``"window:7"`` (non-overlapping windows). Under a grid mask the class token sees and is seen by
every patch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.block import TransformerBlock
from models.config import AttentionConfig
from models.cores.base import AuxLoss
from models.intermediates import capture_intermediates
from models.layers import MLPS, Dense, make_norm
from models.registry import check_mechanism, mechanism_kind
from models.sharding import constrain, param
from models.validation import require_int

__all__ = ["ViTConfig", "ViT", "VIT_SIZES", "vit_config"]

# name: (width, depth, mlp_dim, heads)
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "test": (16, 1, 32, 2),
    "mu": (32, 2, 64, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}

POOLS = ("token", "gap")
POSEMBS = ("learned", "sincos2d", "none")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static configuration of :class:`ViT` (hashable). Build from a variant with
    :func:`vit_config`.

    Attributes:
      image_size: ``(H, W)`` (or an int), divisible by ``patch_size``.
      patch_size, width, depth, mlp_dim, num_heads: sizes.
      num_classes: head outputs (0: return the pooled representation).
      channels: input channels.
      pool: ``"token"`` (class token) or ``"gap"`` (global average pool).
      posemb: ``"learned"``, ``"sincos2d"`` or ``"none"``.
      mechanism: attention mechanism name (see :func:`models.registry.mechanism_names`), or a
        tuple of names tiled over the layers (e.g. ``("window:7",) * 3 + ("softmax",)``).
      mask: grid mask pattern, e.g. ``"neighborhood:3"`` or ``"window:4"`` (or a tuple, tiled).
      qk_norm, use_bias: as in :class:`models.config.AttentionConfig`.
      attention_options: extra ``AttentionConfig`` fields as ``(name, value)`` pairs.
      context_axis, context_strategy: context parallelism, as in
        :class:`models.decoder.DecoderConfig`: every layer's attention runs with the tokens
        split over the mesh axis ``context_axis`` (the token count, patches plus the class
        token, must be divisible by twice its size for softmax layers).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    mlp_dim: int = 1536
    num_heads: int = 6
    num_classes: int = 1000
    channels: int = 3
    pool: str = "token"
    posemb: str = "learned"
    mechanism: str | tuple[str, ...] = "softmax"
    mask: Any = None
    qk_norm: bool = False
    use_bias: bool = True
    mlp: str = "gelu"
    implementation: str | None = None
    linear_implementation: str | None = None
    attention_options: tuple[tuple[str, Any], ...] = ()
    dtype: Any = jnp.float32
    context_axis: str | None = None
    context_strategy: str = "ring"

    def __post_init__(self):
        # Every bad value raises a ValueError naming the field and the value.
        owner = "ViTConfig"
        for name in ("patch_size", "width", "depth", "mlp_dim", "num_heads", "channels"):
            require_int(owner, name, getattr(self, name))
        require_int(owner, "num_classes", self.num_classes, minimum=0)
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2:
            raise ValueError(f"{owner}.image_size must be an int or (H, W), got "
                             f"{self.image_size!r}")
        for s in size:
            require_int(owner, "image_size", s)
        object.__setattr__(self, "image_size", size)
        if self.width % self.num_heads:
            raise ValueError(f"{owner}.width={self.width} is not divisible by num_heads="
                             f"{self.num_heads}")
        if self.mlp not in MLPS:
            raise ValueError(f"{owner}.mlp={self.mlp!r} is not one of {MLPS}")
        if any(s % self.patch_size for s in size):
            raise ValueError(f"image_size {size} must be divisible by patch_size "
                             f"{self.patch_size}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}")
        for name in ("mechanism", "mask"):
            v = getattr(self, name)
            if isinstance(v, list | tuple):
                if not v or self.depth % len(v):
                    raise ValueError(f"{name} tuple of length {len(v)} must tile depth="
                                     f"{self.depth}")
                object.__setattr__(self, name, tuple(v))
        mechs = self.mechanism if isinstance(self.mechanism, tuple) else (self.mechanism,)
        masks_ = self.mask if isinstance(self.mask, tuple) else (self.mask,)
        for i in range(self.depth):  # a few dataclasses per layer: cheap
            mech = mechs[i % len(mechs)]
            try:
                if not isinstance(mech, str):
                    raise ValueError("a mechanism is a registry name (str)")
                mechanism_kind(mech)
                check_mechanism(self.attention_config(i))  # mask patterns on the grid
            except ValueError as e:
                raise ValueError(f"{owner}.mechanism={mech!r} (mask={masks_[i % len(masks_)]!r})"
                                 f": {e}") from None

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    def attention_config(self, i: int = 0) -> AttentionConfig:
        """Attention configuration of layer ``i``."""
        mech, mask = self.mechanism, self.mask
        mech = mech[i % len(mech)] if isinstance(mech, tuple) else mech
        mask = mask[i % len(mask)] if isinstance(mask, tuple) else mask
        return AttentionConfig(
            d_model=self.width, num_heads=self.num_heads, mechanism=mech,
            mask=mask, causal=False, position="none", qk_norm=self.qk_norm,
            use_bias=self.use_bias, implementation=self.implementation,
            linear_implementation=self.linear_implementation, grid_shape=self.grid,
            num_prefix_tokens=1 if self.pool == "token" else 0, dtype=self.dtype,
            context_axis=self.context_axis, context_strategy=self.context_strategy,
            **dict(self.attention_options))


def vit_config(variant: str, **overrides: Any) -> ViTConfig:
    """``ViTConfig`` from a ``"<size>/<patch>"`` string (e.g. ``"S/16"``) plus overrides."""
    if not isinstance(variant, str) or "/" not in variant:
        raise ValueError(f"variant must look like 'S/16', got {variant!r}")
    size, patch = variant.split("/", 1)
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r} in variant {variant!r}; known: "
                         f"{list(VIT_SIZES)}")
    width, depth, mlp_dim, heads = VIT_SIZES[size]
    fields = {"width": width, "depth": depth, "mlp_dim": mlp_dim, "num_heads": heads,
              "patch_size": int(patch)}
    fields.update(overrides)
    return ViTConfig(**fields)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding ``[h * w, width]`` (MoCo v3 / big_vision)."""
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for sincos2d, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class ViT(nnx.Module):
    """Vision Transformer with a pluggable attention mechanism (see the module docstring)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.channels, cfg.width
        gh, gw = cfg.grid
        self.patch_embed = Dense((p * p * c,), (d,), (None,), ("embed",), use_bias=True,
                                 rngs=rngs)
        if cfg.posemb == "learned":
            self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (gh * gw, d),
                                   (None, "embed"))
        else:
            self.pos_embed = None
        self.cls = (param(rngs, nnx.initializers.zeros_init(), (1, 1, d), (None, None, "embed"))
                    if cfg.pool == "token" else None)
        self.layers = nnx.List([
            TransformerBlock(cfg.attention_config(i), mlp=cfg.mlp, mlp_dim=cfg.mlp_dim,
                             norm="layernorm", use_bias=cfg.use_bias, rngs=rngs)
            for i in range(cfg.depth)])
        self.norm = make_norm("layernorm", d, rngs=rngs)
        self.head = (Dense((d,), (cfg.num_classes,), ("embed",), (None,), use_bias=True,
                           kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
                     if cfg.num_classes else None)

    def patchify(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]`` (row-major patch order)."""
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1:] != cfg.image_size + (cfg.channels,):
            raise ValueError(f"images must have shape [B, {cfg.image_size[0]}, "
                             f"{cfg.image_size[1]}, {cfg.channels}], got {images.shape}")
        b = images.shape[0]
        p = cfg.patch_size
        gh, gw = cfg.grid
        x = images.reshape(b, gh, p, gw, p, cfg.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * gw, p * p * cfg.channels)

    def __call__(self, images: jax.Array, *, return_intermediates: bool = False):
        """Logits ``[B, num_classes]`` (or the pooled ``[B, width]`` if ``num_classes=0``);
        ``return_intermediates=True`` is :func:`models.capture_intermediates` ``(self, images)``:
        ``(out, {"layers": [per-layer dicts as in Decoder]})``."""
        if return_intermediates:
            return capture_intermediates(self, images)
        cfg = self.cfg
        h = self.patch_embed(self.patchify(images.astype(cfg.dtype)))
        if self.pos_embed is not None:
            h = h + self.pos_embed[...].astype(h.dtype)
        elif cfg.posemb == "sincos2d":
            h = h + jnp.asarray(posemb_sincos_2d(*cfg.grid, cfg.width), h.dtype)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(h.dtype), (h.shape[0], 1, cfg.width))
            h = jnp.concatenate([cls, h], axis=1)
        h = constrain(h, ("batch", "length", "embed"))
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        h = h[:, 0] if cfg.pool == "token" else jnp.mean(h, axis=1)
        out = self.head(h) if self.head is not None else h
        return out

    def aux_loss(self) -> jax.Array:
        """Sum of auxiliary losses of the last forward (MoH load balance; 0 if none)."""
        return sum(jax.tree.leaves(nnx.state(self, AuxLoss)), jnp.zeros((), jnp.float32))
