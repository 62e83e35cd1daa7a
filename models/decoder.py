"""Decoder-only language model with hybrid layer patterns.

``logits = Head(Norm(Block_L(... Block_1(Embed(tokens) [+ P]))))`` with pre-norm blocks
(:class:`models.block.TransformerBlock`). Each layer's attention mechanism comes from
``layer_pattern``, one letter per layer, tiled over ``num_layers``: ``"A"`` = ``mechanism``
(default softmax), ``"L"`` = ``linear_mechanism`` (default GLA), more letters through
``layer_mechanisms``. ``"LLLA"`` with 8 layers is three linear layers then one softmax layer,
twice (the 3:1 ratio recommended by "A Systematic Analysis of Hybrid Linear Attention").

Options for the theory experiments: ``mlp="none"``, ``norm="none"``, ``positions="learned"``,
``num_heads=1``, ``use_bias=False``, ``mlp="relu"``, ``tie_embeddings=False``, real-valued
inputs (``input_dim``) and outputs (``output_dim``), ``last_only=True`` in the call.

Example (Bigram-Backcopy, Guo et al. 2024)::

    cfg = DecoderConfig(vocab_size=64, d_model=256, num_layers=1, num_heads=1, mlp="relu",
                        mlp_dim=1024, norm="layernorm", positions="learned", max_len=256,
                        use_bias=False, tie_embeddings=False)

In-context linear regression (one attention layer, H heads, no MLP, norm or positions; read
the prediction at the last position)::

    cfg = DecoderConfig(input_dim=d + 1, output_dim=1, d_model=d + 1, num_layers=1,
                        num_heads=H, head_dim=d + 1, mlp="none", norm="none", final_norm=False,
                        positions="none", mechanism="softmax")
    y_hat = Decoder(cfg, rngs=nnx.Rngs(0))(z, last_only=True)    # z [B, T, d + 1] -> [B, 1]

Context parallelism (``context_axis="context"``, under ``jax.set_mesh`` with that axis): every
layer's attention runs with the sequence split over the axis, softmax layers through
``jattn.attention(..., context_axis=)`` (ring or all-gather), recurrent layers through the
``jattn.linear`` functions (LASP-2 state passing); everything else (embeddings, norms, MLPs, the
head) is per token and follows the ``("batch", "length", "embed")`` constraints (sequence over
``context``). :func:`set_context_parallel` turns it on for a built model (the runner does so when
``mesh.context > 1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.block import TransformerBlock
from models.config import AttentionConfig, check_context_fields
from models.cores.base import AuxLoss
from models.intermediates import capture_intermediates, record
from models.kv_cache import CachePolicy
from models.layers import MLPS, NORMS, Dense, Embed, make_norm
from models.registry import check_mechanism, mechanism_kind, option_names
from models.sharding import constrain, param
from models.validation import check_ids, is_concrete, require_int, take_or_nan

__all__ = ["DecoderConfig", "Decoder", "set_context_parallel"]

POSITIONS = ("rope", "alibi", "learned", "none")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static configuration of :class:`Decoder` (hashable; see the module docstring).

    Attributes:
      vocab_size: token vocabulary (ignored for the input when ``input_dim`` is set).
      d_model, num_layers, num_heads, num_kv_heads, head_dim: sizes (GQA via num_kv_heads).
      mlp: ``"swiglu"``, ``"geglu"``, ``"gelu"``, ``"relu"`` or ``"none"``; ``mlp_dim``
        default ``4 * d_model``.
      norm: ``"rmsnorm"``, ``"layernorm"`` or ``"none"``; ``final_norm`` before the head.
      positions: ``"rope"``, ``"alibi"``, ``"learned"`` (absolute table of ``max_len``) or
        ``"none"``.
      tie_embeddings: output logits ``h E^T`` with the input table.
      embed_init_std: std of the token table's normal init (1.0; GPT-2-style models use 0.02,
        which keeps tied logits ``h E^T`` of order 1 at initialization).
      use_bias: biases in every projection (and LayerNorm).
      qk_norm: RMSNorm on q and k.
      mechanism, linear_mechanism: mechanisms of ``"A"`` and ``"L"`` layers.
      layer_pattern: one letter per layer, tiled; its length must divide ``num_layers``.
      layer_mechanisms: extra ``(letter, mechanism)`` pairs, e.g.
        ``(("S", "sliding_window:128"),)``.
      attention_options: extra :class:`AttentionConfig` fields as ``(name, value)`` pairs, e.g.
        ``(("moh_top_k", 2), ("window", 32))``.
      input_dim: real-valued inputs ``[B, T, input_dim]`` through a linear embedding.
      output_dim: output width (default ``vocab_size``; untied head).
      dtype: compute dtype (parameters fp32).
      context_axis: None, or the mesh axis that splits the sequence (context parallelism): every
        layer's full-sequence attention runs split over it (``AttentionConfig.context_axis``),
        same result as unsplit; decoding is not split. The input length ``T`` must be divisible
        by ``2 n`` (``n`` = the axis size) when any layer is softmax-family (the zigzag layout)
        and by ``n`` otherwise. Positions are global token indices: the model keeps natural
        token order throughout (RoPE and learned positions need nothing special).
        Where the zigzag permutation happens: in each softmax layer's ``jattn.attention`` call
        (it moves q, k, v into the causally balanced layout and the output back), not once at
        the embedding, because recurrent layers need natural order (a recurrence) and hybrid
        stacks mix both. Cost per softmax layer and device: two ``ppermute`` s of ``T / 2n``
        tokens for each of q, k, v and the output (and again in the backward), i.e. about
        ``1 / (n - 1)`` of the ring's own K/V traffic at ``Hq = Hkv``. Mechanisms that cannot
        run split (``clipped_softmax``, ALiBi positions, a softmax ``implementation`` other
        than None / ``"xla"``) raise a ValueError here, naming the mechanism.
      context_strategy: ``"ring"`` or ``"allgather"`` (softmax layers; see
        ``jattn.attention``).
    """

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp: str = "swiglu"
    mlp_dim: int | None = None
    norm: str = "rmsnorm"
    final_norm: bool = True
    positions: str = "rope"
    max_len: int = 2048
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    tie_embeddings: bool = True
    embed_init_std: float = 1.0
    use_bias: bool = False
    qk_norm: bool = False
    mechanism: str = "softmax"
    linear_mechanism: str = "gla"
    layer_pattern: str = "A"
    layer_mechanisms: tuple[tuple[str, str], ...] = ()
    attention_options: tuple[tuple[str, Any], ...] = ()
    implementation: str | None = None
    linear_implementation: str | None = None
    input_dim: int | None = None
    output_dim: int | None = None
    dtype: Any = jnp.float32
    context_axis: str | None = None
    context_strategy: str = "ring"

    def __post_init__(self):
        # Validation only: every bad value raises a ValueError naming the field and the value
        # (the runner prints it as one line for a bad --config.model.* flag).
        owner = "DecoderConfig"
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_len"):
            require_int(owner, name, getattr(self, name))
        for name in ("num_kv_heads", "head_dim", "mlp_dim", "input_dim", "output_dim"):
            require_int(owner, name, getattr(self, name), optional=True)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"{owner}.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"{owner}.d_model={self.d_model} is not divisible by num_heads="
                             f"{self.num_heads}; set head_dim explicitly")
        for name, allowed in (("positions", POSITIONS), ("mlp", MLPS), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} is not one of "
                                 f"{allowed}")
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            raise ValueError(f"{owner}.layer_pattern must be a non-empty string like 'A' or "
                             f"'LLLA', got {self.layer_pattern!r}")
        letters = self.letters()
        for ch in self.layer_pattern:  # an unknown letter first: it is the likelier typo
            if ch not in letters:
                raise ValueError(f"{owner}.layer_pattern={self.layer_pattern!r}: layer_pattern "
                                 f"letter {ch!r} has no mechanism; known letters: "
                                 f"{sorted(letters)} (add one with layer_mechanisms)")
        if self.num_layers % len(self.layer_pattern):
            raise ValueError(f"{owner}.layer_pattern={self.layer_pattern!r} (length "
                             f"{len(self.layer_pattern)}) must tile num_layers={self.num_layers}")
        check_context_fields(self.context_axis, self.context_strategy, owner)
        fields = {f.name for f in dataclasses.fields(AttentionConfig)} | set(option_names())
        for name, _ in self.attention_options:
            if name not in fields:
                raise ValueError(f"{owner}.attention_options: {name!r} is not an "
                                 f"AttentionConfig field or core option")
        if self.tie_embeddings and (self.input_dim is not None or self.output_dim is not None):
            object.__setattr__(self, "tie_embeddings", False)
        for letter, mech in letters.items():
            field = {"A": "mechanism", "L": "linear_mechanism"}.get(letter)
            where = f"{owner}.{field}" if field else f"{owner}.layer_mechanisms[{letter!r}]"
            try:
                mechanism_kind(mech)  # an unknown name, even on a letter the pattern skips
            except ValueError as e:
                raise ValueError(f"{where}={mech!r}: {e}") from None
            if letter in self.layer_pattern:  # masks (pattern arguments) are built now too
                attn = self.attention_config(self.layer_pattern.index(letter))
                try:
                    check_mechanism(attn)
                except ValueError as e:
                    raise ValueError(f"{where}={mech!r}: {e}") from None

    def letters(self) -> dict[str, str]:
        return {"A": self.mechanism, "L": self.linear_mechanism, **dict(self.layer_mechanisms)}

    def layer_mechanism(self, i: int) -> str:
        """Mechanism name of layer ``i``."""
        return self.letters()[self.layer_pattern[i % len(self.layer_pattern)]]

    def attention_config(self, i: int) -> AttentionConfig:
        pos = self.positions if self.positions in ("rope", "alibi") else "none"
        return AttentionConfig(
            d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, mechanism=self.layer_mechanism(i), causal=True,
            position=pos, rope_base=self.rope_base, rope_fraction=self.rope_fraction,
            qk_norm=self.qk_norm, use_bias=self.use_bias, implementation=self.implementation,
            linear_implementation=self.linear_implementation, dtype=self.dtype,
            context_axis=self.context_axis, context_strategy=self.context_strategy,
            **dict(self.attention_options))

    def context_multiple(self, axis_size: int) -> int:
        """What the input length must be a multiple of with ``context_axis`` of ``axis_size``
        devices: ``2 n`` if any layer runs softmax attention (zigzag layout), else ``n``."""
        kinds = {mechanism_kind(self.layer_mechanism(i)) for i in range(len(self.layer_pattern))}
        return axis_size * (2 if kinds & {"softmax", "hybrid"} else 1)


class Decoder(nnx.Module):
    """Decoder-only LM (see the module docstring for the configuration)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        if cfg.input_dim is None:
            self.embed = Embed(cfg.vocab_size, d, init_std=cfg.embed_init_std, rngs=rngs)
            self.in_proj = None
        else:
            self.embed = None
            self.in_proj = Dense((cfg.input_dim,), (d,), (None,), ("embed",),
                                 use_bias=cfg.use_bias, rngs=rngs)
        self.pos_embed = (param(rngs, nnx.initializers.normal(0.02), (cfg.max_len, d),
                                (None, "embed")) if cfg.positions == "learned" else None)
        out_scale = 1.0 / (2 * cfg.num_layers)
        self.layers = nnx.List([
            TransformerBlock(cfg.attention_config(i), mlp=cfg.mlp, mlp_dim=cfg.mlp_dim,
                             norm=cfg.norm, use_bias=cfg.use_bias, out_init_scale=out_scale,
                             rngs=rngs)
            for i in range(cfg.num_layers)])
        self.final_norm = (make_norm(cfg.norm, d, use_bias=cfg.use_bias, rngs=rngs)
                           if cfg.final_norm else None)
        if cfg.tie_embeddings:
            self.head = None
        else:
            out = cfg.output_dim or cfg.vocab_size
            self.head = Dense((d,), (out,), ("embed",),
                              ("vocab" if cfg.output_dim is None else None,),
                              use_bias=cfg.use_bias, rngs=rngs)

    # --- pieces ---------------------------------------------------------------------------------
    def _embed(self, inputs: jax.Array, positions: jax.Array) -> jax.Array:
        if self.embed is not None:
            if inputs.ndim != 2:
                raise ValueError(f"tokens must have shape [B, T], got {inputs.shape}")
            h = self.embed(inputs)
        else:
            if inputs.ndim != 3 or inputs.shape[-1] != self.cfg.input_dim:
                raise ValueError(f"inputs must have shape [B, T, input_dim="
                                 f"{self.cfg.input_dim}], got {inputs.shape}")
            h = self.in_proj(inputs.astype(self.cfg.dtype))
        if self.pos_embed is not None:
            # concrete positions were checked by the callers; traced ones past the table (or
            # negative) give NaN rows rather than a wrapped-around or clamped position
            h = h + take_or_nan(self.pos_embed[...], positions)
        return constrain(h.astype(self.cfg.dtype), ("batch", "length", "embed"))

    def check_positions(self, length: int, what: str) -> None:
        """With learned positions, raise unless positions ``0 .. length - 1`` fit the table.

        ``what`` describes where ``length`` comes from (for the message).
        """
        if self.pos_embed is not None and length > self.cfg.max_len:
            raise ValueError(f"{what} needs positions up to {length - 1}, past the learned "
                             f"position table (DecoderConfig.max_len={self.cfg.max_len}); "
                             f"raise max_len or shorten the input")

    def check_context_length(self, length: int) -> None:
        """With ``context_axis``, raise a ValueError unless ``length`` tokens split over it."""
        axis = self.cfg.context_axis
        if axis is None:
            return
        from jattn.context_parallel import axis_size

        n = axis_size(axis)  # raises (naming the axis) without a mesh that has it
        multiple = self.cfg.context_multiple(n)
        if length % multiple:
            why = ("2 * n for the zigzag layout of its softmax layers" if multiple != n
                   else "n")
            raise ValueError(
                f"DecoderConfig.context_axis={axis!r} splits the sequence over {n} devices, so "
                f"the input length must be a multiple of {multiple} ({why}); got T={length}. "
                f"Change the sequence length (e.g. {-(-length // multiple) * multiple}) or the "
                f"size of mesh axis {axis!r}")

    def _logits(self, h: jax.Array) -> jax.Array:
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.head is None:
            return self.embed.attend(h)
        return self.head(h)

    # --- full sequence --------------------------------------------------------------------------
    def __call__(self, inputs: jax.Array, *, positions: jax.Array | None = None,
                 last_only: bool = False, gather: jax.Array | None = None,
                 return_intermediates: bool = False):
        """Logits ``[B, T, V]`` (``[B, V]`` with ``last_only``) for tokens ``[B, T]`` (or inputs
        ``[B, T, input_dim]``).

        ``gather`` (int ``[B, K]``) returns the logits ``[B, K, V]`` of those positions only:
        the output head (``O(T V d)``, the dominant cost at a large vocabulary) then runs on
        ``K`` positions per row, e.g. the labelled positions of a sparse-loss task.

        Analysis tensors (attention weights, value and residual norms) are recorded for
        :func:`models.capture_intermediates`; ``return_intermediates=True`` is the same as
        ``capture_intermediates(self, inputs, ...)`` and returns ``(logits, intermediates)``.
        """
        if return_intermediates:
            return capture_intermediates(self, inputs, positions=positions, last_only=last_only,
                                         gather=gather)
        t = inputs.shape[1]
        self.check_context_length(t)
        if positions is None:
            # T is static, so this check also runs at trace time under jit
            self.check_positions(t, f"an input of {t} tokens")
            positions = jnp.arange(t, dtype=jnp.int32)
        elif self.pos_embed is not None:
            check_ids(positions, self.cfg.max_len, "positions",
                      "the learned position table's DecoderConfig.max_len")
        h = self._embed(inputs, positions)
        record(self, "embedding_norms", lambda: jnp.linalg.norm(h.astype(jnp.float32), axis=-1))
        for layer in self.layers:
            h = layer(h, positions=positions)
        if last_only and gather is not None:
            raise ValueError("pass at most one of last_only and gather")
        if last_only:
            h = h[:, -1]
        elif gather is not None:
            if gather.ndim != 2 or gather.shape[0] != h.shape[0]:
                raise ValueError(f"gather must be int [B={h.shape[0]}, K], got {gather.shape}")
            h = jnp.take_along_axis(h, gather[..., None].astype(jnp.int32), axis=1)
        logits = self._logits(h)
        return logits

    def aux_loss(self) -> jax.Array:
        """Sum of the auxiliary losses of the last forward (MoH load balance; 0 if none)."""
        leaves = jax.tree.leaves(nnx.state(self, AuxLoss))
        return sum(leaves, jnp.zeros((), jnp.float32))

    # --- decoding -------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int,
                   policy: CachePolicy = CachePolicy()) -> list:  # noqa: B008
        """Per-layer caches: KV caches for softmax layers, states for recurrent layers."""
        return [layer.attn.init_cache(batch, max_len, policy.for_layer(i))
                for i, layer in enumerate(self.layers)]

    def decode(self, inputs: jax.Array, cache: list, index: jax.Array,
               policy: CachePolicy = CachePolicy()) -> tuple[jax.Array, list]:  # noqa: B008
        """Logits ``[B, Tq, V]`` of ``Tq`` new tokens at positions ``index + arange(Tq)``,
        given the cache of everything before; returns the updated cache. Prefill is one call
        with the prompt, then one call per token.

        A concrete ``index`` is checked (``>= 0``; learned positions and, under the full
        policy, the KV cache must hold ``index + Tq`` tokens): ValueError. A traced one is not;
        a step past the cache or the position table returns NaN logits (and leaves the cache
        unchanged), see :meth:`models.cores.softmax.SoftmaxCore.decode`.
        """
        if is_concrete(index):
            tq = inputs.shape[1]
            if int(index) < 0:
                raise ValueError(f"decode index={int(index)} must be >= 0")
            self.check_positions(int(index) + tq,
                                 f"decoding {tq} token(s) at index={int(index)}")
        index = jnp.asarray(index, jnp.int32)
        positions = index + jnp.arange(inputs.shape[1], dtype=jnp.int32)
        h = self._embed(inputs, positions)
        new = []
        for i, (layer, c) in enumerate(zip(self.layers, cache, strict=True)):
            h, c = layer.decode(h, c, index, policy.for_layer(i))
            new.append(c)
        return self._logits(h), new

    def generate(self, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array | None = None,
                 temperature: float = 0.0, max_len: int | None = None,
                 policy: CachePolicy = CachePolicy()) -> jax.Array:  # noqa: B008
        """Sample ``max_new_tokens`` after ``prompt [B, P]``; returns ``[B, P + N]``.

        Greedy when ``temperature == 0``. See :func:`models.decode.generate`.
        """
        from models.decode import generate

        return generate(self, prompt, max_new_tokens, rng=rng, temperature=temperature,
                        max_len=max_len, policy=policy)


def set_context_parallel(model: nnx.Module, axis: str | None,
                         strategy: str = "ring") -> nnx.Module:
    """Turn context parallelism on (``axis`` a mesh axis name) or off (None) for a built
    :class:`Decoder` or :class:`models.vit.ViT`, in place; returns ``model``.

    The parameters do not depend on it, so a model built (and initialized, e.g. by a task's
    ``build_model``) without it gets it afterwards: its config and every attention block's and
    core's :class:`AttentionConfig` are replaced by copies with ``context_axis=axis,
    context_strategy=strategy`` (validated as at construction: a mechanism that cannot run
    split raises a ValueError naming it).
    """
    cfg = getattr(model, "cfg", None)
    if not (dataclasses.is_dataclass(cfg) and hasattr(cfg, "context_axis")):
        raise TypeError(f"set_context_parallel needs a models.Decoder or models.ViT, got "
                        f"{type(model).__name__}")
    # the model's config first: its validation names the offending mechanism
    model.cfg = dataclasses.replace(cfg, context_axis=axis, context_strategy=strategy)
    for _, module in nnx.iter_modules(model):
        sub = getattr(module, "cfg", None)
        if isinstance(sub, AttentionConfig):
            module.cfg = dataclasses.replace(sub, context_axis=axis, context_strategy=strategy)
    return model
