"""Flax NNX models on jattn: an attention block whose mechanism is chosen by name, a ViT and a
decoder-only LM with hybrid layer patterns, KV-cache / recurrent-state decoding, and logical-axis
sharding.

* :class:`AttentionBlock` / :class:`AttentionConfig`: ``mechanism="softmax" | "sigmoid" | "relu"
  | "sinks" | "gated" | "clipped_softmax" | "moh" | "linear:<feature_map>" | "gla" | "retnet" |
  "deltanet" | "gated_deltanet" | "kda" | "based" | "agent" | "flowformer" | ...`` or a mask
  pattern (``"sliding_window:64"``, ``"chunked:16"``, ``"strided:4"``, ``"neighborhood:3"``,
  ``"window:4"``);
  :func:`register_mechanism` adds one.
* :class:`ViT` (:func:`vit_config` ``("S/16", num_classes=10, image_size=32)``).
* :class:`Decoder` (:class:`DecoderConfig`, ``layer_pattern="LLLA"``), ``Decoder.generate``.
* :mod:`models.sharding`: logical axis rules -> mesh, :func:`create_sharded`.
* :func:`capture_intermediates` ``(model, *args)``: output plus the analysis tensors the modules
  record (:mod:`models.intermediates`), grouped by layer.

Layout: :mod:`models.config` (``AttentionConfig``), :mod:`models.cores` (the cores, one file per
family), :mod:`models.registry` (mechanisms by name), :mod:`models.patterns` (mask patterns by
name), :mod:`models.kv_cache` (``CachePolicy``, the KV cache), :mod:`models.attention` (the
block), :mod:`models.decoder`, :mod:`models.vit`, :mod:`models.decode`.
"""

from models import sharding
from models.attention import AttentionBlock
from models.block import TransformerBlock
from models.config import AttentionConfig
from models.cores import AuxLoss, Core, CoreInputs, RecurrentCore, SoftmaxCore
from models.decode import decode_fns, generate
from models.decoder import Decoder, DecoderConfig
from models.intermediates import capture_intermediates
from models.kv_cache import CachePolicy
from models.patterns import pattern_names, register_pattern
from models.registry import build_core, mechanism_kind, mechanism_names, register_mechanism
from models.sharding import axis_rules, create_sharded
from models.vit import VIT_SIZES, ViT, ViTConfig, vit_config

__all__ = [
    "AttentionBlock",
    "AttentionConfig",
    "AuxLoss",
    "CachePolicy",
    "Core",
    "CoreInputs",
    "Decoder",
    "DecoderConfig",
    "RecurrentCore",
    "SoftmaxCore",
    "TransformerBlock",
    "VIT_SIZES",
    "ViT",
    "ViTConfig",
    "axis_rules",
    "build_core",
    "capture_intermediates",
    "create_sharded",
    "decode_fns",
    "generate",
    "mechanism_kind",
    "mechanism_names",
    "pattern_names",
    "register_mechanism",
    "register_pattern",
    "sharding",
    "vit_config",
]
