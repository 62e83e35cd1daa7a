"""Softmax-family variants from recent papers, on ``jattn.attention`` (KV-cache decoding).

=================  ===============================================================================
fox                Forgetting Transformer: ``s_ij += c_i - c_j``, ``c = cumsum log f`` (Lin et al.)
softpick           ``relu(e^s - 1) / sum |e^s - 1|`` (Zuhri et al. 2025)
stick_breaking     ``beta_ij prod_{j<k<=i} (1 - beta_ik)``, ``beta = sigmoid(s)`` (Tan et al. 2024)
diff               Differential attention ``softmax(Q1 K1^T) - lambda softmax(Q2 K2^T)`` (Ye et al.)
cog                signed weights ``sign(s) softmax(|s|)`` (Cog attention, Lv et al. 2024)
top_theta          softmax over keys with ``s >= theta_h``, calibrated (Berestizshevsky et al. 2025)
dual_triangle      half of each head looks back, half forward (MECHANISMS.md)
=================  ===============================================================================

None of them runs context-parallel (``context_parallel = False``): untested there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from jattn import score_mods
from models import kv_cache
from models.cores.base import CoreInputs, repeat_kv
from models.cores.softmax import _dense_visible, _SoftmaxBase
from models.layers import Dense
from models.registry import register_mechanism
from models.sharding import param

__all__ = ["FoX", "Softpick", "StickBreaking", "Diff", "Cog", "TopTheta", "DualTriangle",
           "calibrate_top_theta", "diff_lambda_init", "weights_from_outputs"]


@register_mechanism("fox")
class FoX(_SoftmaxBase):
    """Forgetting Transformer (Lin et al., "Forgetting Transformer: Softmax Attention with a
    Forget Gate", ICLR 2025).

    A data-dependent scalar forget gate per head, ``f_t = sigmoid(w_h . x_t + b_h)``, decays the
    scores: ``s_ij = scale q_i.k_j + sum_{j < t <= i} log f_t = scale q_i.k_j + c_i - c_j`` with
    ``c = cumsum_t log f_t``; then softmax over visible keys. Full sequence:
    ``jattn.score_mods.forgetting(log f)`` (gradients reach ``w_h``, ``b_h`` through the
    cumsums). Decoding keeps ``c`` of every cached position next to the KV cache (``"fox_c"
    [B, L, Hq]``; full policy only) and adds ``c_i - c_j`` as a bias.

    Options: ``fox_output_gate`` (the paper's "Pro" output gate,
    ``o * sigmoid(X W_o + b_o)`` per head channel before ``W_O``, as :class:`Gated`);
    ``fox_bias_init`` (init of ``b_h``; ``f = sigmoid(b_h)`` at a zero input).
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        fox_output_gate: bool = False
        fox_bias_init: float = 0.0

    context_parallel = False

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        self.forget = Dense((cfg.d_model,), (cfg.num_heads,), ("embed",), ("heads",),
                            use_bias=True,
                            bias_init=nnx.initializers.constant(self.opts.fox_bias_init),
                            rngs=rngs)
        self.out_gate = (Dense((cfg.d_model,), (cfg.num_heads, cfg.dh), ("embed",),
                               ("heads", "kv"), use_bias=True, rngs=rngs)
                         if self.opts.fox_output_gate else None)

    def log_forget(self, x: jax.Array) -> jax.Array:
        """``log f [B, T, Hq]`` (fp32) from the block input ``x [B, T, D]``."""
        return jax.nn.log_sigmoid(self.forget(x).astype(jnp.float32))

    def score_mod(self, inp: CoreInputs):
        return score_mods.forgetting(self.log_forget(inp.x))

    def finish(self, inp, o):
        if self.out_gate is None:
            return o
        g = jax.nn.sigmoid(self.out_gate(inp.x).astype(jnp.float32))
        return (o.astype(jnp.float32) * g).astype(o.dtype)

    def init_cache(self, batch, max_len, policy):
        kv_cache.require_full(policy, "fox", "the forget-gate cumsums of evicted tokens are lost")
        cache = super().init_cache(batch, max_len, policy)
        cache["fox_c"] = jnp.zeros((batch, max_len, self.cfg.num_heads), jnp.float32)
        return cache

    def state_size(self, seq_len):
        """The KV cache plus one cumsum ``c`` per (position, head)."""
        return super().state_size(seq_len) + seq_len * self.cfg.num_heads

    def decode(self, inp, cache, index, policy):
        kv_cache.require_full(policy, "fox")
        tq = inp.q.shape[1]
        index = jnp.asarray(index, jnp.int32)
        new_pos = index + jnp.arange(tq, dtype=jnp.int32)
        # c at the new positions continues the cumsum of the last cached position
        c_all = cache["fox_c"]
        prev = jax.lax.dynamic_index_in_dim(c_all, jnp.maximum(index - 1, 0), 1, keepdims=True)
        prev = jnp.where(index > 0, prev, 0.0)
        c_new = prev + jnp.cumsum(self.log_forget(inp.x), axis=1)
        cache = kv_cache.update(cache, self.rope(inp.k, new_pos), inp.v, index, policy)
        cache["fox_c"] = jax.lax.dynamic_update_slice(c_all, c_new, (0, index, 0))
        view = kv_cache.visible(cache, index, tq, policy)
        q = self.rope(inp.q, view.q_pos)
        vis = view.mask & self._pattern(view.q_pos, view.k_pos)
        decay = (jnp.moveaxis(c_new, 2, 1)[:, :, :, None]
                 - jnp.moveaxis(cache["fox_c"], 2, 1)[:, :, None, :])
        alibi = self.alibi(view.q_pos, view.k_pos)
        bias = decay if alibi is None else decay + alibi
        o = self.attend(q, cache["k"], cache["v"], mask=vis, bias=bias)
        o = self.finish(inp, o)
        return jnp.where(view.invalid, jnp.asarray(jnp.nan, o.dtype), o), cache


@register_mechanism("softpick")
class Softpick(_SoftmaxBase):
    """Softpick (Zuhri et al., "Softpick: No Attention Sink, No Massive Activations with
    Rectified Softmax", 2025): ``p_ij = relu(e^{s_ij} - 1) / (sum_{j visible} |e^{s_ij} - 1|
    + eps)``; rows may sum to less than one. The ``"softpick"`` normalizer of
    :mod:`jattn.normalizers` (stable with a running max)."""

    normalizer = "softpick"
    context_parallel = False


@register_mechanism("stick_breaking")
class StickBreaking(_SoftmaxBase):
    """Stick-breaking attention (Tan et al., "Scaling Stick-Breaking Attention", 2024):
    ``beta_ij = sigmoid(s_ij)``, ``p_ij = beta_ij prod_{j < k <= i} (1 - beta_ik)`` over visible
    keys (the nearest key breaks the stick first; rows sum to at most one). The
    ``"stick_breaking"`` normalizer of :mod:`jattn.normalizers` (log space). The paper uses no
    position encoding (``position="none"``): the stick order carries position."""

    normalizer = "stick_breaking"
    context_parallel = False


def diff_lambda_init(layer: int) -> float:
    """Ye et al.'s depth schedule ``lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))``, ``l >= 1``."""
    if layer < 1:
        raise ValueError(f"diff_layer must be >= 1 (1-based layer index), got {layer}")
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


@register_mechanism("diff")
class Diff(_SoftmaxBase):
    """Differential attention (Ye et al., "Differential Transformer", 2024).

    Each head splits ``q, k [.., Dh]`` into halves ``q1, q2, k1, k2 [.., Dh/2]`` (RoPE per
    half) and keeps ``v [.., Dh]``:

    ``a = softmax(q1 k1^T / sqrt(Dh/2)) v - lambda softmax(q2 k2^T / sqrt(Dh/2)) v``,
    ``o = (1 - lambda_init) RMSNorm_head(a)`` (the paper's per-head GroupNorm, learnable
    ``[Dh]`` scale shared by the heads), with one ``lambda`` per layer re-parameterised as
    ``lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` (``lq*, lk* [Dh/2]``, init
    ``N(0, 0.1^2)``) and ``lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))`` at layer ``l``. Two
    ``jattn.attention`` calls, so both maps run on the kernels (and the KV cache).

    Options: ``diff_layer`` (``l``, 1-based; the core does not know its depth, so a
    multi-layer model sets it per layer through ``layer_mechanisms`` configs, or accepts the
    same value everywhere), ``diff_lambda_init`` (overrides the schedule).
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        diff_layer: int = 1
        diff_lambda_init: float | None = None

    context_parallel = False
    norm_eps = 1e-5

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        if cfg.dh % 2:
            raise ValueError(f"mechanism 'diff' splits each head in two: head_dim must be even, "
                             f"got {cfg.dh}")
        self.lambda_init = (self.opts.diff_lambda_init if self.opts.diff_lambda_init is not None
                            else diff_lambda_init(self.opts.diff_layer))
        half, init = cfg.dh // 2, nnx.initializers.normal(0.1)
        self.lq1, self.lk1, self.lq2, self.lk2 = (param(rngs, init, (half,), ("kv",))
                                                  for _ in range(4))
        self.norm_scale = param(rngs, nnx.initializers.ones, (cfg.dh,), ("kv",))

    def lam(self) -> jax.Array:
        """The scalar ``lambda`` (fp32)."""
        return (jnp.exp(jnp.sum(self.lq1[...] * self.lk1[...]))
                - jnp.exp(jnp.sum(self.lq2[...] * self.lk2[...])) + self.lambda_init)

    def rope(self, x, positions):
        if self.cfg.position != "rope":
            return x
        b, t, h, d = x.shape
        x2 = jattn.position.rope(x.reshape(b, t, 2 * h, d // 2), positions,
                                 base=self.cfg.rope_base, fraction=self.cfg.rope_fraction)
        return x2.reshape(b, t, h, d)

    @staticmethod
    def _halves(x):
        d = x.shape[-1] // 2
        return x[..., :d], x[..., d:]

    def attend(self, q, k, v, *, mask, bias, context_axis=None, score_mod=None):
        cfg = self.cfg
        (q1, q2), (k1, k2) = self._halves(q), self._halves(k)

        def one(qq, kk):
            return jattn.attention(qq, kk, v, mask=mask, bias=bias, scale=cfg.scale,
                                   logits_soft_cap=cfg.logits_soft_cap,
                                   implementation=cfg.implementation,
                                   score_mod=score_mod).astype(jnp.float32)

        a = one(q1, k1) - self.lam() * one(q2, k2)
        a = a * jax.lax.rsqrt(jnp.mean(jnp.square(a), axis=-1, keepdims=True) + self.norm_eps)
        return (a * self.norm_scale[...] * (1.0 - self.lambda_init)).astype(q.dtype)

    def weights(self, q, k, *, mask, bias, score_mod=None):
        """The differential map ``softmax(q1 k1^T) - lambda softmax(q2 k2^T)`` (signed)."""
        cfg = self.cfg
        (q1, q2), (k1, k2) = self._halves(q), self._halves(k)

        def one(qq, kk):
            return jattn.attention_weights(qq, kk, mask=mask, bias=bias, scale=cfg.scale,
                                           logits_soft_cap=cfg.logits_soft_cap,
                                           score_mod=score_mod)

        return one(q1, k1) - self.lam() * one(q2, k2)


@register_mechanism("cog")
class Cog(_SoftmaxBase):
    """Signed weights, Cog attention (Lv et al., "More Expressive Attention with Negative
    Weights", 2024), in the form MECHANISMS.md infers:

    ``p_ij = sign(s_ij) softmax_j(|s_ij|)`` over visible keys, ``s = scale q k^T (+ bias)``
    (a soft-cap, if set, applies to ``|s|``, which leaves the sign alone). The magnitude is a
    softmax of ``|s|``, so a head can give a key a large *negative* weight (delete/copy).

    :func:`jattn.variants.signed_attention`: an online softmax over ``|s|`` with the sign
    applied in the value product (``implementation`` None or ``"xla"``: blocked, never
    ``[T, T]``; ``"reference"``: materialized). No context parallelism, no score_mod.
    """

    context_parallel = False

    def weights(self, q, k, *, mask, bias, score_mod=None):
        cfg = self.cfg
        if score_mod is not None:
            raise NotImplementedError("mechanism 'cog' takes no score_mod")
        scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        kk = repeat_kv(k, q.shape[2]).astype(jnp.float32)
        s = scale * jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk)
        if bias is not None:
            s = s + bias

        def magnitude(t, b, h, qi, ki):
            return jnp.abs(t)

        mag = jattn.attention_weights(q, k, mask=mask, bias=bias, scale=cfg.scale,
                                      logits_soft_cap=cfg.logits_soft_cap, score_mod=magnitude)
        vis = _dense_visible(mask, q.shape[1], k.shape[1])
        return jnp.where(vis, jnp.sign(s) * mag, 0.0)

    def attend(self, q, k, v, *, mask, bias, context_axis=None, score_mod=None):
        if score_mod is not None:
            raise NotImplementedError("mechanism 'cog' takes no score_mod")
        cfg = self.cfg
        return jattn.variants.signed_attention(q, k, v, mask=mask, bias=bias, scale=cfg.scale,
                                               logits_soft_cap=cfg.logits_soft_cap,
                                               implementation=cfg.implementation)


def weights_from_outputs(attend, q, k) -> jax.Array:
    """``[B, Hq, Tq, Tk]`` weights of a mechanism linear in ``v``: ``attend(q, k, v)`` with
    ``v`` the identity over keys (one-hot value per key), so the output rows are the weights.
    For analysis (materializes ``[Tq, Tk]``)."""
    b, tk, hkv = k.shape[0], k.shape[1], k.shape[2]
    eye = jnp.broadcast_to(jnp.eye(tk, dtype=jnp.float32)[None, :, None, :], (b, tk, hkv, tk))
    return jnp.moveaxis(attend(q, k, eye).astype(jnp.float32), 2, 1)


class TopThetaThreshold(nnx.Variable):
    """Calibrated per-head score thresholds (not trained: a threshold has no gradient)."""


@register_mechanism("top_theta")
class TopTheta(_SoftmaxBase):
    """Top-theta attention (Berestizshevsky et al., "Top-Theta Attention: Sparsifying
    Transformers by Compensated Thresholding", 2025): softmax over the keys whose score reaches
    a calibrated per-head threshold, ``s_ij >= theta_h`` (the diagonal always kept), see
    :func:`jattn.variants.top_theta_attention`.

    ``theta`` (a :class:`TopThetaThreshold` ``[Hq]``) starts at ``-inf``: plain softmax, so a
    model trains dense and is calibrated afterwards. :func:`calibrate_top_theta` runs a
    forward pass on sample data and sets every top-theta layer's ``theta`` to keep about
    ``top_theta_keep`` keys per row (option, default 8).
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        top_theta_keep: int = 8

    context_parallel = False

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        self.theta = TopThetaThreshold(jnp.full((cfg.num_heads,), -jnp.inf, jnp.float32))
        self.calibrating = False

    def attend(self, q, k, v, *, mask, bias, context_axis=None, score_mod=None,
               diagonal_offset=None):
        if score_mod is not None:
            raise NotImplementedError("mechanism 'top_theta' takes no score_mod")
        cfg = self.cfg
        if self.calibrating:  # calibrate_top_theta: thresholds from this batch's scores
            self.theta.set_value(jattn.variants.calibrate_top_theta(
                q, k, keep=self.opts.top_theta_keep, mask=mask, bias=bias, scale=cfg.scale,
                logits_soft_cap=cfg.logits_soft_cap))
        return jattn.variants.top_theta_attention(
            q, k, v, self.theta[...], mask=mask, bias=bias, scale=cfg.scale,
            logits_soft_cap=cfg.logits_soft_cap, implementation=cfg.implementation,
            diagonal_offset=diagonal_offset)

    def decode(self, inp, cache, index, policy):
        """Full KV cache only: a new query's own key (always kept) is its slot ``index + t``,
        which the end-aligned default would misplace in a partly filled cache."""
        kv_cache.require_full(policy, "top_theta", "its own key is located by slot")
        tq = inp.q.shape[1]
        index = jnp.asarray(index, jnp.int32)
        new_pos = index + jnp.arange(tq, dtype=jnp.int32)
        cache = kv_cache.update(cache, self.rope(inp.k, new_pos), inp.v, index, policy)
        view = kv_cache.visible(cache, index, tq, policy)
        vis = view.mask & self._pattern(view.q_pos, view.k_pos)
        o = self.attend(self.rope(inp.q, view.q_pos), cache["k"], cache["v"], mask=vis,
                        bias=self.alibi(view.q_pos, view.k_pos), diagonal_offset=index)
        o = self.finish(inp, o)
        return jnp.where(view.invalid, jnp.asarray(jnp.nan, o.dtype), o), cache

    def weights(self, q, k, *, mask, bias, score_mod=None):
        cfg = self.cfg
        return weights_from_outputs(
            lambda q, k, v: jattn.variants.top_theta_attention(
                q, k, v, self.theta[...], mask=mask, bias=bias, scale=cfg.scale,
                logits_soft_cap=cfg.logits_soft_cap, implementation="reference"), q, k)


def calibrate_top_theta(model: nnx.Module, run) -> None:
    """Set the thresholds of every :class:`TopTheta` core in ``model`` from one call of
    ``run()`` (e.g. ``lambda: model(sample_tokens)``; eager, not under ``jax.jit``)."""
    cores = [m for _, m in nnx.iter_modules(model) if isinstance(m, TopTheta)]
    if not cores:
        raise ValueError("calibrate_top_theta: the model has no 'top_theta' attention core")
    for core in cores:
        core.calibrating = True
    try:
        run()
    finally:
        for core in cores:
            core.calibrating = False


@register_mechanism("dual_triangle")
class DualTriangle(_SoftmaxBase):
    """Dual triangle attention (MECHANISMS.md: "half of each head's subspace masked past+self,
    half future+self; bidirectional without positions"): the first half of each head's q/k/v
    attends to keys ``j <= i``, the second half to ``j >= i``, both ANDed with the block's mask;
    outputs concatenated. :func:`jattn.variants.dual_triangle_attention` (two
    ``jattn.attention`` calls: every implementation). Meant for bidirectional blocks
    (``causal=False``, e.g. the ViT) with ``position="none"``; under a causal mask the future
    half sees only the query itself. No KV-cache decoding: the future half needs keys that
    have not been generated (``decode`` raises NotImplementedError)."""

    context_parallel = False

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        if cfg.dh % 2:
            raise ValueError(f"mechanism 'dual_triangle' splits each head in two: head_dim must "
                             f"be even, got {cfg.dh}")

    def attend(self, q, k, v, *, mask, bias, context_axis=None, score_mod=None):
        cfg = self.cfg
        extra = {} if score_mod is None else {"score_mod": score_mod}
        return jattn.variants.dual_triangle_attention(
            q, k, v, mask=mask, bias=bias, scale=cfg.scale, logits_soft_cap=cfg.logits_soft_cap,
            implementation=cfg.implementation, **extra)

    def weights(self, q, k, *, mask, bias, score_mod=None):
        """The mean of the two halves' weight maps (the past and the future triangle)."""
        cfg = self.cfg
        past, future = jattn.variants.past_and_future_masks(mask, q.shape[1], k.shape[1])
        h = q.shape[-1] // 2

        def one(sl, m):
            return jattn.attention_weights(q[..., sl], k[..., sl], mask=m, bias=bias,
                                           scale=cfg.scale, logits_soft_cap=cfg.logits_soft_cap,
                                           score_mod=score_mod)

        return 0.5 * (one(slice(0, h), past) + one(slice(h, None), future))

    def decode(self, inp, cache, index, policy):
        raise NotImplementedError("mechanism 'dual_triangle' is bidirectional (half of each "
                                  "head attends to future keys): it has no KV-cache decoding")
