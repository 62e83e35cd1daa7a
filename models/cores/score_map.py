"""Cores whose weights depend on more than one query-key pair: multi-token attention (a
convolution over the score map and across heads) and ConViT's gated positional self-attention
(a learned function of the 2-D offset beside the content scores). Both on
:mod:`jattn.variants` (reference and blocked xla forms).

=================  ===============================================================================
mta                Multi-token attention: key-query conv + head mixing before the softmax
                   (Golovneva et al. 2025); KV-cache decoding keeps the recent queries too
gpsa               ``(1 - sigma(l_h)) softmax(q k^T) + sigma(l_h) softmax(v_h . r_ij)`` (ConViT,
                   d'Ascoli et al. 2021); for the ViT (2-D grid), 1-D offsets without a grid
=================  ===============================================================================
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from models import kv_cache
from models.cores.softmax import _SoftmaxBase
from models.cores.variants import weights_from_outputs
from models.registry import register_mechanism
from models.sharding import param

__all__ = ["MTA", "GPSA"]


@register_mechanism("mta")
class MTA(_SoftmaxBase):
    """Multi-token attention (Golovneva, Wang, Weston & Sukhbaatar, "Multi-Token Attention",
    2025), pre-softmax: per head a key-query convolution ``theta_h [c_q, c_k]`` over the masked
    score map (causal in the query direction, centred in the key direction), then a mixing of
    each group of ``c_h`` heads, then the softmax; see
    :func:`jattn.variants.multi_token_attention` for the formula.

    Options (the paper's values by default): ``mta_query_kernel`` (``c_q = 6``),
    ``mta_key_kernel`` (``c_k = 11``), ``mta_head_group`` (``c_h = 2``; None: no head mixing).
    Both kernels start at the identity (exactly softmax attention, as the paper initializes).
    The paper's group normalization of the head outputs (with depth scaling) is not included.

    Decoding (full KV cache only) also caches the rotated queries: a new query's logits read
    the scores of the ``c_q - 1`` queries before it. No ALiBi (a dense bias through the conv is
    not implemented), no score_mod, no context parallelism.
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        mta_query_kernel: int = 6
        mta_key_kernel: int = 11
        mta_head_group: int | None = 2

    context_parallel = False

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        o, h = self.opts, cfg.num_heads
        for name, value in (("mta_query_kernel", o.mta_query_kernel),
                            ("mta_key_kernel", o.mta_key_kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        ch = o.mta_head_group
        if ch is not None and (isinstance(ch, bool) or not isinstance(ch, int) or ch < 1
                               or h % ch):
            raise ValueError(f"mta_head_group must be None or a positive int dividing "
                             f"num_heads={h}, got {ch!r}")
        if cfg.position == "alibi":
            raise ValueError("mechanism 'mta' does not take position='alibi' (a dense bias "
                             "through the convolution); use 'rope' or 'none'")
        kq, hk = jattn.variants.mta_identity_kernels(h, o.mta_query_kernel, o.mta_key_kernel, ch)
        self.kq_kernel = param(rngs, lambda *_: jnp.asarray(kq), kq.shape, ("heads", None, None))
        self.head_kernel = (None if hk is None else
                            param(rngs, lambda *_: jnp.asarray(hk), hk.shape, (None, None, None)))

    def _kernels(self):
        return self.kq_kernel[...], None if self.head_kernel is None else self.head_kernel[...]

    def attend(self, q, k, v, *, mask, bias, context_axis=None, score_mod=None,
               implementation=None):
        if score_mod is not None or bias is not None:
            raise NotImplementedError("mechanism 'mta' takes no score_mod or bias")
        kq, hk = self._kernels()
        return jattn.variants.multi_token_attention(
            q, k, v, kq, hk, mask=mask, scale=self.cfg.scale,
            implementation=implementation or self.cfg.implementation)

    def weights(self, q, k, *, mask, bias, score_mod=None):
        return weights_from_outputs(
            lambda q, k, v: self.attend(q, k, v, mask=mask, bias=bias, score_mod=score_mod,
                                        implementation="reference"), q, k)

    # --- decoding: the KV cache plus the rotated queries -----------------------------------
    def init_cache(self, batch, max_len, policy):
        kv_cache.require_full(policy, "mta", "the conv reads earlier queries' scores of every key")
        cache = super().init_cache(batch, max_len, policy)
        cache["mta_q"] = jnp.zeros((batch, max_len, self.cfg.num_heads, self.cfg.dh),
                                   self.cfg.dtype)
        return cache

    def state_size(self, seq_len):
        """The KV cache plus one rotated query per (position, head)."""
        return super().state_size(seq_len) + seq_len * self.cfg.num_heads * self.cfg.dh

    def decode(self, inp, cache, index, policy):
        kv_cache.require_full(policy, "mta")
        tq, cq = inp.q.shape[1], self.opts.mta_query_kernel
        index = jnp.asarray(index, jnp.int32)
        new_pos = index + jnp.arange(tq, dtype=jnp.int32)
        cache = kv_cache.update(cache, self.rope(inp.k, new_pos), inp.v, index, policy)
        zero = jnp.zeros((), jnp.int32)
        cache["mta_q"] = jax.lax.dynamic_update_slice(
            cache["mta_q"], self.rope(inp.q, new_pos).astype(cache["mta_q"].dtype),
            (zero, index, zero, zero))
        view = kv_cache.visible(cache, index, tq, policy)
        # the c_q - 1 queries before the new ones, then the new ones (positions < 0: no row)
        q_pos = index - (cq - 1) + jnp.arange(tq + cq - 1, dtype=jnp.int32)
        size = cache["k"].shape[1]
        q = jnp.take(cache["mta_q"], jnp.clip(q_pos, 0, size - 1), axis=1)
        k_pos = jnp.arange(size, dtype=jnp.int32)
        filled = cache["pos"] >= 0
        vis = ((k_pos[None, :] <= q_pos[:, None]) & (q_pos >= 0)[:, None] & filled[None, :]
               & self._pattern(q_pos, k_pos)[0, 0])
        o = self.attend(q, cache["k"], cache["v"], mask=vis[None, None], bias=None)[:, cq - 1:]
        o = self.finish(inp, o)
        return jnp.where(view.invalid, jnp.asarray(jnp.nan, o.dtype), o), cache


@register_mechanism("gpsa")
class GPSA(_SoftmaxBase):
    """Gated positional self-attention (d'Ascoli et al., "ConViT: Improving Vision Transformers
    with Soft Convolutional Inductive Biases", ICML 2021): per head
    ``(1 - sigma(lambda_h)) softmax(q k^T) + sigma(lambda_h) softmax(v_h . r_ij)``, renormalized,
    ``r_ij = (dx, dy, dx^2 + dy^2)`` the grid offset of key ``j`` from query ``i``; see
    :func:`jattn.variants.gpsa_attention`.

    On the ViT's patch grid (``cfg.grid_shape``; the class token, a prefix token, takes part in
    the content softmax only). Without a grid (a decoder) the tokens form a ``1 x T`` row, so
    the positional map is a learned function of the 1-D offset. ``v_h`` starts at the paper's
    locality init (heads centred on the offsets of a ``sqrt(H) x sqrt(H)`` grid, strength
    ``gpsa_locality_strength``, default 1) and ``lambda_h`` at ``gpsa_gate_init`` (default 1:
    mostly positional, as in the paper). No KV-cache decoding (an encoder mechanism).
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        gpsa_locality_strength: float = 1.0
        gpsa_gate_init: float = 1.0

    context_parallel = False

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        if cfg.grid_shape is not None and len(cfg.grid_shape) != 2:
            raise ValueError(f"mechanism 'gpsa' needs a 2-D grid_shape, got {cfg.grid_shape}")
        init = jattn.variants.gpsa_locality_init(cfg.num_heads, self.opts.gpsa_locality_strength)
        self.pos_weights = param(rngs, lambda *_: jnp.asarray(init), init.shape, ("heads", None))
        self.gate_logits = param(rngs, nnx.initializers.constant(self.opts.gpsa_gate_init),
                                 (cfg.num_heads,), ("heads",))

    def _grid(self, t: int) -> tuple[int, int]:
        cfg = self.cfg
        return cfg.grid_shape if cfg.grid_shape is not None else (1, t - cfg.num_prefix_tokens)

    def attend(self, q, k, v, *, mask, bias, context_axis=None, score_mod=None,
               implementation=None):
        if score_mod is not None:
            raise NotImplementedError("mechanism 'gpsa' takes no score_mod")
        cfg = self.cfg
        return jattn.variants.gpsa_attention(
            q, k, v, self.pos_weights[...], self.gate_logits[...], grid=self._grid(q.shape[1]),
            num_prefix_tokens=cfg.num_prefix_tokens, mask=mask, bias=bias, scale=cfg.scale,
            implementation=implementation or cfg.implementation)

    def weights(self, q, k, *, mask, bias, score_mod=None):
        return weights_from_outputs(
            lambda q, k, v: self.attend(q, k, v, mask=mask, bias=bias, score_mod=score_mod,
                                        implementation="reference"), q, k)

    def decode(self, inp, cache, index, policy):
        raise NotImplementedError("mechanism 'gpsa' (ConViT) is an encoder mechanism: it has no "
                                  "KV-cache decoding")
