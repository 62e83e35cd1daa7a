"""Small NNX building blocks with logical axis names: dense, norms, MLPs, embeddings.

Kernels keep their structured shapes (``[D, H, Dh]`` for a head projection rather than
``[D, H * Dh]``) so each dimension carries its own logical name (:mod:`models.sharding`).
Everything computes in the input dtype with fp32 statistics in the norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.sharding import param
from models.validation import check_ids, take_or_nan

__all__ = ["Dense", "RMSNorm", "LayerNorm", "make_norm", "MLP", "Embed", "pytorch_default_init"]

_LECUN = nnx.initializers.lecun_normal()


def _fan_in_init(fan_in: int, scale: float = 1.0):
    """Truncated-normal init with variance ``scale / fan_in`` for kernels of any rank."""
    std = (scale / max(fan_in, 1)) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return (std / 0.87962566) * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


class Dense(nnx.Module):
    """``y = x . W (+ b)`` contracting the last ``len(in_shape)`` axes of ``x``.

    ``W`` has shape ``in_shape + out_shape`` with logical axes ``in_axes + out_axes``; ``b`` has
    ``out_shape``. Example: a query projection ``[D] -> [H, Dh]`` is
    ``Dense((D,), (H, Dh), ("embed",), ("heads", "kv"))``.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_axes: Sequence[str | None], out_axes: Sequence[str | None], *,
                 use_bias: bool = False, init_scale: float = 1.0, kernel_init=None,
                 bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = 1
        for n in self.in_shape:
            fan_in *= n
        kernel_init = kernel_init or _fan_in_init(fan_in, init_scale)
        self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape,
                            tuple(in_axes) + tuple(out_axes))
        self.bias = (param(rngs, bias_init, self.out_shape, tuple(out_axes)) if use_bias
                     else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"x must end in {self.in_shape}, got shape {x.shape}")
        kernel = self.kernel[...].astype(x.dtype)
        y = jax.lax.dot_general(
            x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "embed",
                 rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale (+ bias)`` over the last axis (Ba et al., 2016)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, use_bias: bool = True,
                 axis_name: str | None = "embed", rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), (axis_name,))
        self.bias = (param(rngs, nnx.initializers.zeros_init(), (dim,), (axis_name,))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class _Identity(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


NORMS = ("rmsnorm", "layernorm", "none")


def make_norm(kind: str, dim: int, *, use_bias: bool = True, rngs: nnx.Rngs) -> nnx.Module:
    """``"rmsnorm"``, ``"layernorm"`` (bias iff ``use_bias``) or ``"none"`` (identity)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, rngs=rngs)
    if kind == "layernorm":
        return LayerNorm(dim, use_bias=use_bias, rngs=rngs)
    if kind == "none":
        return _Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


MLPS = ("swiglu", "geglu", "gelu", "relu", "none")


class MLP(nnx.Module):
    """Position-wise feed-forward network.

    * ``"gelu"`` / ``"relu"``: ``W_2 act(W_1 x + b_1) + b_2`` (Vaswani et al., 2017).
    * ``"swiglu"`` / ``"geglu"``: ``W_2 (act(W_g x) * W_1 x)`` with act = SiLU / GELU
      (Shazeer, "GLU Variants Improve Transformer", 2020).
    """

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu", *, use_bias: bool = False,
                 init_scale_out: float = 1.0, rngs: nnx.Rngs):
        if kind not in MLPS or kind == "none":
            raise ValueError(f"mlp kind must be one of {MLPS[:-1]}, got {kind!r}")
        self.kind = kind
        self.up = Dense((dim,), (hidden,), ("embed",), ("mlp",), use_bias=use_bias, rngs=rngs)
        self.gate = (Dense((dim,), (hidden,), ("embed",), ("mlp",), use_bias=use_bias, rngs=rngs)
                     if kind in ("swiglu", "geglu") else None)
        self.down = Dense((hidden,), (dim,), ("mlp",), ("embed",), use_bias=use_bias,
                          init_scale=init_scale_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * h
        elif self.kind == "geglu":
            h = jax.nn.gelu(self.gate(x)) * h
        elif self.kind == "gelu":
            h = jax.nn.gelu(h)
        else:
            h = jax.nn.relu(h)
        return self.down(h)


class Embed(nnx.Module):
    """Token embedding table ``[V, D]`` (logical ``("vocab", "embed")``), with ``attend``
    for tied output logits ``x . E^T``."""

    def __init__(self, vocab_size: int, dim: int, *, init_std: float = 1.0, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.embedding = param(rngs, nnx.initializers.normal(init_std), (vocab_size, dim),
                               ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [...]`` int -> ``[..., D]``.

        Ids outside ``[0, vocab_size)`` raise a ValueError when ``tokens`` is concrete; traced
        (under ``jit``) they embed as NaN, so their logits are NaN rather than a wrapped-around
        or clamped row's.
        """
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be an int array, got dtype {tokens.dtype}")
        check_ids(tokens, self.vocab_size, "token ids", "vocab_size")
        return take_or_nan(self.embedding[...], tokens)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(x.dtype))


def pytorch_default_init(model: nnx.Module, rngs: nnx.Rngs) -> None:
    """Re-initializes a :class:`models.Decoder` in place with PyTorch's default initializers:
    token and position embeddings ``N(0, 1)`` (``nn.Embedding``), every projection
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``nn.Linear``), norm scales 1.

    Papers whose code used PyTorch's defaults (Guo et al. 2024, Bigram-Backcopy) start from
    this state: at d=256 it gives their initial norms ``||Val<s>|| ~ 9.0`` (= ``sqrt(d/3)``)
    and ``||Res<s>|| ~ 24`` (~ ``sqrt(2 d)``). The models' own init has positions
    ``N(0, 0.02)``: a ~50x weaker position signal, so position-based circuits (previous-token
    heads, hence induction / backcopy heads) take far longer to form.
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            bound = 1.0 / math.sqrt(math.prod(node.in_shape))
            k = node.kernel
            k[...] = jax.random.uniform(rngs.params(), k.shape, k.dtype, -bound, bound)
    pos = getattr(model, "pos_embed", None)
    if pos is not None:
        pos[...] = jax.random.normal(rngs.params(), pos.shape, pos.dtype)
