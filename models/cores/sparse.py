"""Trainable sparse-attention cores: each query attends to a support chosen from the data.

=================  ===============================================================================
moba               MoBA (Lu et al. 2025): per token, its own key block plus the top-k earlier
                   blocks by ``q . mean(K_block)``
nsa                Native Sparse Attention (Yuan et al. 2025): compressed, selected and
                   sliding-window branches mixed by learned gates; learned block compression
dsa                DeepSeek Sparse Attention (DeepSeek-V3.2-Exp 2025): lightning indexer
                   ``I_ts = sum_j w_tj relu(q_tj . k_s)``, top-k tokens per query
=================  ===============================================================================

MoBA and DSA run ``jattn.attention`` with the routed support as a bool mask (``[B, Hq, T, T]``: a
research-scale form whose cost is dense; the blocked path skips key blocks no query selects).
The choice is discrete; gradients reach the attention through the chosen support. DSA's indexer
learns from its own loss (an :class:`AuxLoss`, see :class:`DSA`). NSA runs
:func:`jattn.sparse.nsa` (its blocked form unless ``implementation="reference"``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn import masks
from jattn import sparse as sparse_lib
from models.cores.base import AuxLoss
from models.cores.softmax import SoftmaxCore
from models.intermediates import record
from models.layers import Dense
from models.registry import register_mechanism
from models.sharding import param

__all__ = ["MoBA", "NSA", "DSA", "moba_support"]

F32 = jnp.float32


def _dense_visibility(mask, b: int, h: int, tq: int, tk: int):
    """``mask`` (None, a Mask or a bool array) as bool ``[1|B, 1|H, Tq, Tk]``."""
    if mask is None:
        return jnp.ones((1, 1, tq, tk), bool)
    if isinstance(mask, masks.Mask):
        qi = jnp.arange(tq, dtype=jnp.int32)[:, None]
        ki = jnp.arange(tk, dtype=jnp.int32)[None, :]
        if mask.num_heads is None:
            return mask.visible(qi, ki, 0, q_len=tq, kv_len=tk)[None, None]
        hh = jnp.arange(mask.num_heads, dtype=jnp.int32)[:, None, None]
        return mask.visible(qi[None], ki[None], hh, q_len=tq, kv_len=tk)[None]
    vis = jnp.asarray(mask, bool)
    return vis.reshape((1,) * (4 - vis.ndim) + vis.shape)


def moba_support(q, k, vis, block_size: int, top_k: int):
    """MoBA's per-token support, bool ``[B, Hq, Tq, Tk]``.

    For query ``t`` with visible keys ``vis[t]``: its own block is the one holding its last
    visible key (the current block, causally); candidates are the other blocks it sees whole
    (complete past blocks: their mean uses no future key); it keeps the own block and the
    ``top_k`` candidates of highest ``s_j = q_t . mean_{s in block j} k_s`` (the kv head's keys,
    GQA), then attends to their visible keys. Works the same on a KV cache (decoding).
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nb = -(-tk // block_size)
    pad = nb * block_size - tk
    vis = jnp.broadcast_to(vis, (b, hq, tq, tk))
    k_idx = jnp.arange(tk)
    last = jnp.max(jnp.where(vis, k_idx, -1), axis=-1)  # [B, Hq, Tq]
    own = jax.nn.one_hot(last // block_size, nb, dtype=bool) & (last >= 0)[..., None]
    vis_blocks = jnp.pad(vis, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(b, hq, tq, nb,
                                                                             block_size)
    whole = vis_blocks.all(-1) & ~own
    kp = jnp.pad(k.astype(F32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    k_mean = kp.reshape(b, nb, block_size, hkv, d).mean(2)  # padding only in never-whole blocks
    k_mean = jnp.repeat(k_mean, hq // hkv, axis=2)  # [B, nb, Hq, D]
    s = jnp.einsum("bthd,bjhd->bhtj", q.astype(F32), k_mean)
    chosen = own
    if top_k > 0:
        top, idx = jax.lax.top_k(jnp.where(whole, s, -jnp.inf), min(top_k, nb))
        chosen = chosen | (jax.nn.one_hot(idx, nb, dtype=bool)
                           & (top > -jnp.inf)[..., None]).any(-2)
    return jax.lax.stop_gradient(chosen[..., k_idx // block_size] & vis)


class _Routed(SoftmaxCore):
    """A softmax core whose ``attend``/``weights`` restrict the mask to a routed support."""

    context_parallel = False  # the routed dense mask is not split over devices

    def __init__(self, cfg, mask, arg=None, *, rngs: nnx.Rngs):
        if arg is not None:
            raise ValueError(f"mechanism {cfg.mechanism_name!r} takes no argument, got {arg!r}")
        super().__init__(cfg, mask)

    def support(self, q, k, vis):  # -> bool [B, Hq, Tq, Tk]
        raise NotImplementedError

    def _routed_mask(self, q, k, mask):
        vis = _dense_visibility(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        return self.support(q, k, vis)

    def attend(self, q, k, v, *, mask, bias, context_axis=None):
        return super().attend(q, k, v, mask=self._routed_mask(q, k, mask), bias=bias)

    def weights(self, q, k, *, mask, bias):
        return super().weights(q, k, mask=self._routed_mask(q, k, mask), bias=bias)


@register_mechanism("moba")
class MoBA(_Routed):
    """MoBA: Mixture of Block Attention (Lu et al. 2025), routed per token.

    Keys are split into blocks of ``moba_block_size``; query ``t`` attends to its current block
    (causally masked) and the ``moba_top_k`` earlier blocks with the highest gate score
    ``s_j = <q_t, mean_{s in block j} k_s>`` (after RoPE), per head (:func:`moba_support`).
    Parameter-free router; decodes with the ordinary KV cache (the rule only reads the cache).
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        moba_block_size: int = 64  # keys per block
        moba_top_k: int = 2  # earlier blocks kept per token (besides the current one)

    def support(self, q, k, vis):
        return moba_support(q, k, vis, self.opts.moba_block_size, self.opts.moba_top_k)


class _CompressMLP(nnx.Module):
    """NSA's learnable compression ``phi`` for one of keys / values: an intra-block position
    encoding ``pos [l, Dh]`` and a 2-layer MLP ``[l Dh] -> [M] -> [Dh]`` shared by all heads
    (:func:`jattn.sparse.compress_blocks`)."""

    def __init__(self, block_size: int, dh: int, hidden: int, *, rngs: nnx.Rngs):
        zeros, normal = nnx.initializers.zeros_init(), nnx.initializers.lecun_normal()
        self.pos = param(rngs, nnx.initializers.normal(0.02), (block_size, dh), (None, "kv"))
        self.w1 = param(rngs, normal, (block_size * dh, hidden), (None, "mlp"))
        self.b1 = param(rngs, zeros, (hidden,), ("mlp",))
        self.w2 = param(rngs, normal, (hidden, dh), ("mlp", "kv"))
        self.b2 = param(rngs, zeros, (dh,), ("kv",))

    def params(self) -> dict:
        return {name: getattr(self, name)[...] for name in sparse_lib.COMPRESS_MLP_KEYS}


@register_mechanism("nsa")
class NSA(SoftmaxCore):
    """Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned
    and Natively Trainable Sparse Attention"), causal.

    ``o_t = sum_{c in {cmp, slc, win}} g_t^c Attn(q_t, K~c_t, V~c_t)``
    (:func:`jattn.sparse.nsa`): blocks of ``nsa_block_size`` keys/values at stride
    ``nsa_stride`` compressed by a learnable MLP with intra-block position encoding
    (``nsa_compress="mlp"``, the paper's) or by the mean (``"mean"``); the query's own block
    plus the ``nsa_select`` blocks of highest compressed attention (shared by a GQA group); a
    sliding window of ``nsa_window`` keys. The gates come from the paper's gate MLP on the
    block input, ``g_t = sigmoid(x_t W_g + b_g) in [0, 1]^{Hq x 3}`` (the paper's "MLP and
    sigmoid activation" at its smallest, one linear layer, as public reimplementations do).
    Queries and keys are rotated (RoPE) before all three branches. Full-sequence only:
    decoding would need a cache of compressed keys (NotImplementedError); no extra mask
    pattern, no ALiBi.
    """

    context_parallel = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        nsa_block_size: int = 32  # l: compression and selection block
        nsa_stride: int = 16  # d: compression stride (divides l)
        nsa_select: int = 4  # blocks kept per query besides its own
        nsa_window: int = 64  # sliding-window keys
        nsa_compress: str = "mlp"  # "mlp" (learned phi) or "mean"
        nsa_compress_hidden: int = 64  # M, the compression MLP's hidden width

    def __init__(self, cfg, mask, arg=None, *, rngs: nnx.Rngs):
        if arg is not None:
            raise ValueError(f"mechanism {cfg.mechanism_name!r} takes no argument, got {arg!r}")
        super().__init__(cfg, mask)
        o = self.opts
        if cfg.mask is not None or not cfg.causal or cfg.position == "alibi":
            raise ValueError("mechanism 'nsa' is causal self-attention with its own support: "
                             f"needs mask=None, causal=True and no ALiBi, got mask={cfg.mask!r}, "
                             f"causal={cfg.causal}, position={cfg.position!r}")
        if o.nsa_compress not in ("mlp", "mean"):
            raise ValueError(f"nsa_compress must be 'mlp' or 'mean', got {o.nsa_compress!r}")
        if o.nsa_block_size % o.nsa_stride:
            raise ValueError(f"nsa_stride={o.nsa_stride} must divide "
                             f"nsa_block_size={o.nsa_block_size}")
        self.gate = Dense((cfg.d_model,), (cfg.num_heads, 3), ("embed",), ("heads", None),
                          use_bias=True, rngs=rngs)
        if o.nsa_compress == "mlp":
            mlp = (o.nsa_block_size, cfg.dh, o.nsa_compress_hidden)
            self.k_compress = _CompressMLP(*mlp, rngs=rngs)
            self.v_compress = _CompressMLP(*mlp, rngs=rngs)
        else:
            self.k_compress = self.v_compress = None

    def __call__(self, inp):
        cfg, o = self.cfg, self.opts
        q, k = self.rope(inp.q, inp.positions), self.rope(inp.k, inp.positions)
        gates = jax.nn.sigmoid(self.gate(inp.x).astype(F32))  # [B, T, Hq, 3]
        impl = "reference" if cfg.implementation == "reference" else "xla"
        out = jattn.sparse.nsa(
            q, k, inp.v, gates=gates, block_size=o.nsa_block_size, compress_stride=o.nsa_stride,
            select_blocks=o.nsa_select, window=o.nsa_window, scale=cfg.scale,
            k_compress=None if self.k_compress is None else self.k_compress.params(),
            v_compress=None if self.v_compress is None else self.v_compress.params(),
            implementation=impl)
        record(self, "gates", gates)
        return self.finish(inp, out)

    def decode(self, inp, cache, index, policy):
        raise NotImplementedError("nsa decoding needs a cache of compressed keys (not "
                                  "implemented yet); use the full-sequence forward")


@register_mechanism("dsa")
class DSA(SoftmaxCore):
    """DeepSeek Sparse Attention (DeepSeek-AI 2025, DeepSeek-V3.2-Exp).

    A lightning indexer with ``H_I = dsa_index_heads`` small heads of width ``dsa_index_dim``
    scores every visible key, ``I_ts = sum_j w_tj relu(q^I_tj . k^I_s)`` (``q^I, w`` from the
    query token's input, one ``k^I`` per key token; :func:`jattn.sparse.lightning_indexer`);
    each query attends to its ``dsa_top_k`` highest-scoring keys (one choice for all heads).
    The indexer learns from the paper's KL objective, stored as an :class:`AuxLoss` on every
    forward: ``L_I = mean_t KL(p_t || softmax(I_t))`` with ``p_t`` the main attention of query
    ``t`` summed over heads and L1-normalized (stop-gradient; the dense warm-up form).
    Full-sequence only: decoding would need the indexer keys in the cache (NotImplementedError).
    """

    context_parallel = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        dsa_top_k: int = 64  # keys kept per query
        dsa_index_heads: int = 4
        dsa_index_dim: int = 32

    def __init__(self, cfg, mask, arg=None, *, rngs: nnx.Rngs):
        if arg is not None:
            raise ValueError(f"mechanism {cfg.mechanism_name!r} takes no argument, got {arg!r}")
        super().__init__(cfg, mask)
        hi, di = self.opts.dsa_index_heads, self.opts.dsa_index_dim
        self.index_q = Dense((cfg.d_model,), (hi, di), ("embed",), (None, None), rngs=rngs)
        self.index_k = Dense((cfg.d_model,), (di,), ("embed",), (None,), rngs=rngs)
        self.index_w = Dense((cfg.d_model,), (hi,), ("embed",), (None,), rngs=rngs)
        self.index_loss = AuxLoss(jnp.zeros((), F32))

    def index_scores(self, x, vis):
        """``I [B, T, T]`` (-inf where no head sees the key), by
        :func:`jattn.sparse.lightning_indexer`'s formula."""
        q_i = self.index_q(x).astype(F32)
        k_i = self.index_k(x).astype(F32)
        w = self.index_w(x).astype(F32) * self.opts.dsa_index_heads ** -0.5
        scores = jnp.einsum("btj,btjs->bts", w, jax.nn.relu(
            jnp.einsum("btjd,bsd->btjs", q_i, k_i)))
        return jnp.where(vis.any(1), scores, -jnp.inf)

    def __call__(self, inp):
        t = inp.q.shape[1]
        q, k = self.rope(inp.q, inp.positions), self.rope(inp.k, inp.positions)
        bias = None
        if self.cfg.position == "alibi":
            bias = jattn.position.alibi_bias(self.cfg.num_heads, t, t)[None]
        vis = _dense_visibility(self.mask, q.shape[0], q.shape[2], t, t)
        scores = self.index_scores(inp.x, vis)
        top, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), min(self.opts.dsa_top_k, t))
        support = jattn.sparse.selection_mask(idx, top > -jnp.inf, t)[:, None] & vis
        # [B, Hq|1, T, T]
        o = self.attend(q, k, inp.v, mask=support, bias=bias)
        # the indexer's KL loss against the (stop-gradient) dense attention distribution
        p = jattn.attention_weights(q, k, mask=self.mask, bias=bias, scale=self.cfg.scale)
        p = jax.lax.stop_gradient(p.astype(F32).sum(1))
        p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-9)
        log_q = jax.nn.log_softmax(scores, axis=-1)
        kl = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0).sum(-1)
        self.index_loss.set_value(kl.mean())
        record(self, "attention_weights", lambda: self.weights(q, k, mask=support, bias=bias))
        return self.finish(inp, o)

    def decode(self, inp, cache, index, policy):
        raise NotImplementedError("dsa decoding needs the indexer keys in the KV cache "
                                  "(not implemented yet); use the full-sequence forward")
