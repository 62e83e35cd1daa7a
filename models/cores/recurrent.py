"""Linear / recurrent cores: a fixed-size state per layer instead of a KV cache.

Each core runs one ``jattn.linear`` function with ``initial_state`` / ``output_final_state``,
which serves the full sequence, the prefill and each decoding step alike. Recurrent cores scan
tokens in order whatever ``cfg.causal`` (in a ViT they read patches in raster order);
``linear:<feature_map>`` honours ``causal=False``. They accept no mask pattern.

Context parallelism (``AttentionConfig.context_axis``): the full-sequence call passes the axis to
the ``jattn.linear`` function (each device runs its contiguous shard from a zero state, the
per-device state summaries are all-gathered and combined: LASP-2), on global arrays in natural
token order. Decoding steps are never split.

=====================  ==========================================================================
linear:<feature_map>   kernelized linear attention (Katharopoulos et al. 2020, ...)
gla                    gated linear attention, per-channel data-dependent decay (Yang et al. 2024)
retnet                 retention, constant per-head decay (Sun et al. 2023)
deltanet               delta rule (Yang et al. 2024)
gated_deltanet         scalar decay + delta rule (Yang et al. 2025)
kda                    Kimi Delta Attention: per-channel decay + delta rule (Kimi Team 2025)
deltaproduct           num_householder delta steps per token, scalar decay (Siems et al. 2025)
rwkv7                  RWKV-7 time mix (simplified): the DPLR delta rule (in models/cores/rwkv7.py)
loglinear_gla          log-linear GLA, Fenwick-tree states (Guo et al. 2025): models.cores.loglinear
loglinear_mamba2       log-linear Mamba-2 (Guo et al. 2025): models.cores.loglinear
mamba2                 the full Mamba-2 layer (Dao & Gu 2024): models.cores.mamba2
=====================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
import jattn.linear
from models.config import AttentionConfig
from models.cores.base import Core, CoreInputs, repeat_kv
from models.cores.short_conv import ConvCarry, ShortConv, check_conv_width
from models.kv_cache import CachePolicy
from models.layers import Dense
from models.registry import register_mechanism
from models.sharding import param

__all__ = ["RecurrentCore", "Linear", "GLA", "RetNet", "DeltaNet", "GatedDeltaNet", "KDA",
           "DeltaProduct", "Kernelized", "linear_kwargs"]


class RecurrentCore(Core):
    """Linear / recurrent core: a fixed-size state ``[B, H, K, V]`` (fp32) per layer.

    Subclasses implement :meth:`recur`: ``(inp, initial_state) -> (o, final_state)`` using a
    ``jattn.linear`` function with ``initial_state``/``output_final_state``, which serves the
    full sequence, the prefill and each decoding step alike.
    """

    kind = "recurrent"

    def state_shape(self) -> tuple[int, int, int]:
        """``(H, K, V)`` of the recurrent state."""
        return (self.cfg.num_heads, self.cfg.dh, self.cfg.dh)

    def recur(self, inp: CoreInputs, state: jax.Array | None, want_state: bool, *,
              context_axis: str | None = None):
        """``(o, final_state)``; ``context_axis`` (full-sequence calls of a block with
        ``cfg.context_axis``; only passed when set) splits the sequence over that mesh axis."""
        raise NotImplementedError

    def __call__(self, inp: CoreInputs) -> jax.Array:
        # the keyword only when set: subclasses' recur may predate context parallelism
        split = {} if self.cfg.context_axis is None else {"context_axis": self.cfg.context_axis}
        o, _ = self.recur(inp, None, False, **split)
        return o

    def state_size(self, seq_len: int) -> int:
        """``H K V``, whatever the sequence length."""
        return math.prod(self.state_shape())

    def init_cache(self, batch: int, max_len: int, policy: CachePolicy) -> dict:
        return {"state": jnp.zeros((batch,) + self.state_shape(), jnp.float32)}

    def decode(self, inp: CoreInputs, cache: dict, index: jax.Array, policy: CachePolicy):
        o, state = self.recur(inp, cache["state"], True)
        return o, {**cache, "state": state.astype(jnp.float32)}


class _HeadNormGate(nnx.Module):
    """Per-head RMSNorm of the recurrent output, optionally times ``swish(x W_r)``, as in
    GLA / RetNet / Gated DeltaNet / KDA (the usual output block of linear attention)."""

    def __init__(self, cfg: AttentionConfig, gate: bool, *, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones_init(), (cfg.dh,), ("kv",))
        self.gate = (Dense((cfg.d_model,), (cfg.num_heads, cfg.dh), ("embed",), ("heads", "kv"),
                           rngs=rngs) if gate else None)

    def __call__(self, x: jax.Array, o: jax.Array) -> jax.Array:
        of = o.astype(jnp.float32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + 1e-6)
        of = of * self.scale[...]
        if self.gate is not None:
            of = of * jax.nn.silu(self.gate(x).astype(jnp.float32))
        return of.astype(o.dtype)


class _RecurrentBase(RecurrentCore):
    """Shared plumbing: GQA expansion, output norm/gate, the jattn call with a state."""

    out_gate: bool = True
    out_norm: bool = True
    context_parallel = True

    def __init__(self, cfg: AttentionConfig, mask, arg: str | None = None, *, rngs: nnx.Rngs):
        if arg is not None:
            raise ValueError(f"mechanism {cfg.mechanism_name!r} takes no argument, got {arg!r}")
        if cfg.mask is not None:
            raise ValueError(f"mechanism {cfg.mechanism_name!r} is recurrent and supports no "
                             f"mask pattern (got mask={cfg.mask!r})")
        super().__init__(cfg, mask)
        self.out = _HeadNormGate(cfg, self.out_gate, rngs=rngs) if self.out_norm else None

    def heads(self, inp: CoreInputs):
        h = self.cfg.num_heads
        return inp.q, repeat_kv(inp.k, h), repeat_kv(inp.v, h)

    def gates(self, inp: CoreInputs) -> dict:
        """Keyword arguments for the jattn.linear call (decays, betas)."""
        return {}

    def run(self, q, k, v, state, want_state, context_axis=None, **gates):
        raise NotImplementedError

    def recur(self, inp, state, want_state, *, context_axis=None):
        return self.mix(inp, *self.heads(inp), state, want_state, context_axis)

    def mix(self, inp, q, k, v, state, want_state, context_axis=None):
        """``(o, final_state)``: the jattn call on ``q, k, v`` at every head, then the output
        norm and gate."""
        o, final = self.run(q, k, v, state, want_state, context_axis, **self.gates(inp))
        if self.out is not None:
            o = self.out(inp.x, o)
        return o, final


def linear_kwargs(cfg: AttentionConfig, context_axis: str | None = None) -> dict:
    """Keywords of the ``jattn.linear`` call of a core with config ``cfg``; ``context_axis``
    only when set (``delta_product`` and ``dplr_delta_rule`` take none)."""
    kw = {"implementation": cfg.linear_implementation, "chunk_size": cfg.chunk_size,
          "scale": cfg.scale}
    return kw if context_axis is None else {**kw, "context_axis": context_axis}


class _LowRankGate(nnx.Module):
    """``x -> (x W_down) W_up + b`` with ``W_down [D, r]``, ``W_up [r, H, K]`` (GLA's gate)."""

    def __init__(self, cfg: AttentionConfig, rank: int, *, rngs: nnx.Rngs):
        self.down = Dense((cfg.d_model,), (rank,), ("embed",), (None,), rngs=rngs)
        self.up = Dense((rank,), (cfg.num_heads, cfg.dh), (None,), ("heads", "kv"),
                        use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(self.down(x)).astype(jnp.float32)


@register_mechanism("gla")
class GLA(_RecurrentBase):
    """Gated linear attention (Yang et al., "Gated Linear Attention Transformers with
    Hardware-Efficient Training", 2024).

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` with the per-channel
    data-dependent log-decay ``g_t = logsigmoid(x_t W_1 W_2 + b) / tau`` (options
    ``gate_low_rank`` 16, ``gla_temperature`` ``tau = 16``), then per-head RMSNorm and the output
    gate ``swish(x W_r)``.
    """

    @dataclasses.dataclass(frozen=True)
    class Options:
        gate_low_rank: int = 16  # rank of the decay projection
        gla_temperature: float = 16.0  # tau in g = logsigmoid(.) / tau

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        self.decay = _LowRankGate(cfg, self.opts.gate_low_rank, rngs=rngs)

    def gates(self, inp):
        return {"g": jax.nn.log_sigmoid(self.decay(inp.x)) / self.opts.gla_temperature}

    def run(self, q, k, v, state, want_state, context_axis=None, *, g):
        return jattn.linear.gla(q, k, v, g, initial_state=state, output_final_state=want_state,
                                **linear_kwargs(self.cfg, context_axis))


@register_mechanism("retnet")
class RetNet(_RecurrentBase):
    """Retention (Sun et al., "Retentive Network", 2023): ``S_t = gamma_h S_{t-1} + k_t^T v_t``
    with the constant per-head decay ``gamma_h = 1 - 2^(-5 - h)``
    (``jattn.linear.retnet_decay``), then per-head RMSNorm and ``swish(x W_r)``. The xPos
    rotation of the paper is omitted (the decay carries position)."""

    def gates(self, inp):
        b, t = inp.q.shape[:2]
        return {"g": jnp.broadcast_to(jattn.linear.retnet_decay(self.cfg.num_heads),
                                      (b, t, self.cfg.num_heads))}

    def run(self, q, k, v, state, want_state, context_axis=None, *, g):
        return jattn.linear.gla(q, k, v, g, initial_state=state, output_final_state=want_state,
                                **linear_kwargs(self.cfg, context_axis))


class _DeltaBase(ConvCarry, _RecurrentBase):
    """Delta-rule cores: ``beta = sigmoid(x W_b)``; q, k, v pass the short causal depthwise
    convolutions + SiLU of the papers' layers (fla's ``ShortConvolution``, width
    ``conv_width`` = 4, no bias; :mod:`models.cores.short_conv`), q and k then a per-head L2
    norm inside the delta rule. ``conv_width=0`` drops the convolutions (SiLU on q and k only:
    jattn's form before they were added, for ablations)."""

    @dataclasses.dataclass(frozen=True)
    class Options:
        conv_width: int = 4  # short causal depthwise conv on q, k, v (0: none)

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        self.beta = Dense((cfg.d_model,), (cfg.num_heads,), ("embed",), ("heads",),
                          use_bias=True, rngs=rngs)
        width = check_conv_width(self.opts.conv_width, allow_zero=True)
        streams = {} if width == 0 else self.conv_streams()
        self.conv_names = tuple(streams)
        for name, (features, axes) in streams.items():  # attributes conv_q, conv_k, ...
            setattr(self, f"conv_{name}", ShortConv(width, features, axes, bias=False, rngs=rngs))

    def convs(self) -> dict[str, ShortConv]:
        """``{stream name: its ShortConv}``; empty with ``conv_width=0``."""
        return {name: getattr(self, f"conv_{name}") for name in self.conv_names}

    def conv_streams(self) -> dict[str, tuple[tuple[int, ...], tuple]]:
        """``{name: (features, logical axes)}`` of the arrays :meth:`projections` returns."""
        kv = ((self.cfg.kv_heads, self.cfg.dh), ("heads", "kv"))
        return {"q": ((self.cfg.num_heads, self.cfg.dh), ("heads", "kv")), "k": kv, "v": kv}

    def projections(self, inp) -> dict[str, jax.Array]:
        """The per-token arrays ``[B, T, *features]`` that enter the convolutions."""
        return {"q": inp.q, "k": inp.k, "v": inp.v}

    def assemble(self, streams: dict[str, jax.Array]):
        """``(q, k, v)`` at every query head from the (convolved) :meth:`projections`."""
        h = self.cfg.num_heads
        return streams["q"], repeat_kv(streams["k"], h), repeat_kv(streams["v"], h)

    def conv_past(self, batch):
        return {n: c.zero_past(batch) for n, c in self.convs().items()}

    def layer(self, inp, state, past, want_state, context_axis=None):
        streams = self.projections(inp)
        convs = self.convs()
        if not convs:
            q, k, v = self.assemble(streams)
            q, k = jax.nn.silu(q), jax.nn.silu(k)
        else:
            conv = {n: convs[n](u, past[n]) for n, u in streams.items()}
            past = {n: c[1] for n, c in conv.items()}
            q, k, v = self.assemble({n: c[0].astype(inp.q.dtype) for n, c in conv.items()})
        return (*self.mix(inp, q, k, v, state, want_state, context_axis), past)

    def delta_gates(self, inp) -> jax.Array | None:
        return None

    def gates(self, inp):
        return {"beta": jax.nn.sigmoid(self.beta(inp.x).astype(jnp.float32)),
                "g": self.delta_gates(inp)}

    def run(self, q, k, v, state, want_state, context_axis=None, *, beta, g):
        return jattn.linear.delta_rule(q, k, v, beta, g=g, initial_state=state,
                                       output_final_state=want_state, use_qk_l2norm=True,
                                       **linear_kwargs(self.cfg, context_axis))


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """Mamba's dt bias: ``softplus(b) = dt ~ logUniform(1e-3, 1e-1)``."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))


def _a_log_init(key, shape, dtype=jnp.float32):
    """Mamba2's ``A_log = log(A)``, ``A ~ U(1, 16)``."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def ssd_decay(a_log: nnx.Param, dt_bias: nnx.Param, dt_logits: jax.Array):
    """Mamba-2's step and scalar log-decay: ``dt = softplus(dt_logits + dt_bias)``,
    ``g = -exp(A_log) dt``; ``dt_logits [B, T, H]`` -> ``(dt, g)``, both fp32."""
    dt = jax.nn.softplus(dt_logits.astype(jnp.float32) + dt_bias[...])
    return dt, -jnp.exp(a_log[...]) * dt


def init_ssd_decay(core: nnx.Module, cfg: AttentionConfig, rngs: nnx.Rngs) -> None:
    """Give ``core`` the parameters of :func:`ssd_decay` with ``dt_logits = x W_a``:
    ``a_proj [D, H]``, ``a_log [H]``, ``dt_bias [H]`` (read back by :func:`ssd_log_decay`)."""
    h = cfg.num_heads
    core.a_proj = Dense((cfg.d_model,), (h,), ("embed",), ("heads",), rngs=rngs)
    core.a_log = param(rngs, _a_log_init, (h,), ("heads",))
    core.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",))


def ssd_log_decay(core: nnx.Module, x: jax.Array) -> jax.Array:
    """``g = -exp(A_log) softplus(x W_a + dt_bias)`` ``[B, T, H]`` of a core set up by
    :func:`init_ssd_decay`."""
    return ssd_decay(core.a_log, core.dt_bias, core.a_proj(x))[1]


@register_mechanism("deltanet")
class DeltaNet(_DeltaBase):
    """DeltaNet (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
    Sequence Length", 2024): ``S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})``,
    ``o_t = scale q_t S_t``; short convolutions + SiLU on q/k/v, L2-normalized q/k, per-head
    RMSNorm output (no gate)."""

    out_gate = False


@register_mechanism("gated_deltanet")
class GatedDeltaNet(_DeltaBase):
    """Gated DeltaNet (Yang et al., "Gated Delta Networks: Improving Mamba2 with Delta Rule",
    2025): the delta rule on ``exp(g_t) S_{t-1}`` with the Mamba2 scalar decay
    ``g_t = -exp(A_log_h) softplus(x_t W_a + dt_bias_h)``; the paper's full layer: short
    convolutions + SiLU on q/k/v, L2-normalized q/k, RMSNorm + ``swish(x W_r)`` output."""

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        init_ssd_decay(self, cfg, rngs)

    def delta_gates(self, inp):
        return ssd_log_decay(self, inp.x)


@register_mechanism("kda")
class KDA(_DeltaBase):
    """Kimi Delta Attention (Kimi Team, "Kimi Linear", 2025): the gated delta rule with a
    per-key-channel decay ``g_t = -exp(A_log_h) softplus(x_t W_down W_up + dt_bias)``
    (``[B, T, H, K]``, low rank option ``gate_low_rank``); RMSNorm + ``swish(x W_r)`` output.
    The exact gate parameterization of the paper is inferred (Mamba2-style, per channel)."""

    @dataclasses.dataclass(frozen=True)
    class Options(_DeltaBase.Options):
        gate_low_rank: int = 16  # rank of the decay projection

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, arg, rngs=rngs)
        self.decay = _LowRankGate(cfg, self.opts.gate_low_rank, rngs=rngs)
        self.a_log = param(rngs, _a_log_init, (cfg.num_heads,), ("heads",))
        self.dt_bias = param(rngs, _dt_bias_init, (cfg.num_heads, cfg.dh), ("heads", "kv"))

    def delta_gates(self, inp):
        dt = jax.nn.softplus(self.decay(inp.x) + self.dt_bias[...])
        return -jnp.exp(self.a_log[...])[:, None] * dt


@register_mechanism("deltaproduct")
class DeltaProduct(GatedDeltaNet):
    """Gated DeltaProduct (Siems et al., "DeltaProduct: Improving State-Tracking in Linear RNNs
    via Householder Products", 2025): per token, the Gated DeltaNet decay then
    ``num_householder`` (``n_h``) delta-rule steps, so the transition is a product of ``n_h``
    generalized Householder matrices (``jattn.linear.delta_product``).

    Step 0 uses the block's k/v projections; steps ``1..n_h-1`` have their own
    (``[D] -> [n_h - 1, H, Dh]``); ``beta [n_h, H]`` per token, ``sigmoid`` (times 2 with
    ``allow_neg_eigval``, the paper's negative-eigenvalue variant). SiLU + L2-normed q/k, decay
    ``-exp(A_log) softplus(x W_a + dt_bias)``, per-head RMSNorm + ``swish(x W_r)`` output.
    The short convolutions (``conv_width``) run over tokens on every step's q/k/v projections
    before the steps are interleaved (as fla's ``GatedDeltaProduct``).
    """

    context_parallel = False  # jattn.linear.delta_product takes no context_axis

    @dataclasses.dataclass(frozen=True)
    class Options(_DeltaBase.Options):
        num_householder: int = 2  # delta-rule steps per token (1: Gated DeltaNet)
        allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1)

    def __init__(self, cfg, mask, arg=None, *, rngs):
        n_h = self.Options(**cfg.options_for(self.Options)).num_householder
        if not isinstance(n_h, int) or isinstance(n_h, bool) or n_h < 1:
            raise ValueError(f"num_householder must be a positive int, got {n_h!r}")
        super().__init__(cfg, mask, arg, rngs=rngs)
        h, dh = cfg.num_heads, cfg.dh
        self.beta = Dense((cfg.d_model,), (n_h, h), ("embed",), (None, "heads"), use_bias=True,
                          rngs=rngs)
        self.kv_extra = (Dense((cfg.d_model,), (2, n_h - 1, h, dh), ("embed",),
                               (None, None, "heads", "kv"), rngs=rngs) if n_h > 1 else None)

    def conv_streams(self):
        streams = super().conv_streams()
        n_h, h, dh = self.opts.num_householder, self.cfg.num_heads, self.cfg.dh
        if n_h > 1:  # steps 1..n_h-1's keys and values
            streams["kv_extra"] = ((2, n_h - 1, h, dh), (None, None, "heads", "kv"))
        return streams

    def projections(self, inp):
        streams = super().projections(inp)
        if self.kv_extra is not None:
            streams["kv_extra"] = self.kv_extra(inp.x)
        return streams

    def assemble(self, streams):
        q, k, v = super().assemble(streams)
        if "kv_extra" in streams:  # [B, T, n_h, H, Dh] -> [B, T * n_h, H, Dh]
            extra = streams["kv_extra"]
            b, t, h, dh = k.shape
            n_h = self.opts.num_householder
            k = jnp.concatenate([k[:, :, None], extra[:, :, 0].astype(k.dtype)], axis=2)
            v = jnp.concatenate([v[:, :, None], extra[:, :, 1].astype(v.dtype)], axis=2)
            k, v = k.reshape(b, t * n_h, h, dh), v.reshape(b, t * n_h, h, v.shape[-1])
        return q, k, v

    def gates(self, inp):
        beta = jax.nn.sigmoid(self.beta(inp.x).astype(jnp.float32))  # [B, T, n_h, H]
        if self.opts.allow_neg_eigval:
            beta = 2.0 * beta
        b, t = beta.shape[:2]
        return {"beta": beta.reshape(b, t * self.opts.num_householder, -1),
                "g": self.delta_gates(inp)}

    def run(self, q, k, v, state, want_state, context_axis=None, *, beta, g):
        # _RecurrentBase.recur passes context_axis positionally; delta_product has no split
        return jattn.linear.delta_product(
            q, k, v, beta, num_householder=self.opts.num_householder, g=g, initial_state=state,
            output_final_state=want_state, use_qk_l2norm=True, **linear_kwargs(self.cfg))


class Kernelized(nnx.Module):
    """Normalized causal (or bidirectional) linear attention with a named feature map, plus the
    learnable Hedgehog parameters when that map is chosen."""

    def __init__(self, feature_map: str, head_dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if feature_map not in jattn.linear.FEATURE_MAPS:
            raise ValueError(f"linear feature map must be one of {jattn.linear.FEATURE_MAPS}, "
                             f"got {feature_map!r}")
        self.feature_map = feature_map
        if feature_map == "hedgehog":
            init = jattn.linear.hedgehog_params(rngs.params(), head_dim, num_heads=num_heads)
            self.hh_weight = param(rngs, lambda *_: init["weight"], init["weight"].shape,
                                   ("heads", "kv", None))
            self.hh_bias = param(rngs, lambda *_: init["bias"], init["bias"].shape,
                                 ("heads", None))

    def params(self):
        if self.feature_map == "hedgehog":
            return {"weight": self.hh_weight[...], "bias": self.hh_bias[...]}
        return None

    def num_features(self, num_heads: int, head_dim: int) -> int:
        phi = jattn.linear.feature_maps.resolve_feature_map(self.feature_map, self.params(),
                                                           head_dim)
        x = jax.ShapeDtypeStruct((1, 1, num_heads, head_dim), jnp.float32)
        return jax.eval_shape(phi, x).shape[-1]

    def __call__(self, q, k, v, state, want_state, *, causal: bool, cfg: AttentionConfig,
                 context_axis: str | None = None):
        if state is not None:
            state = jattn.linear.LinearAttentionState(state["kv"], state["z"])
        o, final = jattn.linear.linear_attention(
            q, k, v, feature_map=self.feature_map, feature_map_params=self.params(),
            causal=causal, initial_state=state, output_final_state=want_state,
            **linear_kwargs(cfg, context_axis))
        return o, (None if final is None else {"kv": final.kv, "z": final.z})


@register_mechanism("linear")
class Linear(_RecurrentBase):
    """Kernelized linear attention (Katharopoulos et al., "Transformers are RNNs", 2020):
    ``o_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) . sum_j phi(k_j))`` over ``j <= i``
    (all ``j`` when ``causal=False``). ``"linear:<feature_map>"`` picks ``phi`` from
    ``jattn.linear.FEATURE_MAPS`` (``elu1`` default, ``relu``, ``performer`` (fixed draw),
    ``hedgehog`` (learnable, per head), ``taylor``, ``dpfp``). No output norm or gate."""

    out_norm = False

    def __init__(self, cfg, mask, arg=None, *, rngs):
        super().__init__(cfg, mask, None, rngs=rngs)
        self.kernel = Kernelized(arg or "elu1", cfg.dh, cfg.num_heads, rngs=rngs)

    def init_cache(self, batch, max_len, policy):
        h, d = self.cfg.num_heads, self.cfg.dh
        f = self.kernel.num_features(h, d)
        return {"kv": jnp.zeros((batch, h, f, d), jnp.float32),
                "z": jnp.zeros((batch, h, f), jnp.float32)}

    def run(self, q, k, v, state, want_state, context_axis=None):
        return self.kernel(q, k, v, state, want_state, causal=self.cfg.causal, cfg=self.cfg,
                           context_axis=context_axis)

    def decode(self, inp, cache, index, policy):
        o, state = self.recur(inp, cache, True)
        return o, state

    def state_size(self, seq_len):
        """``H F Dh + H F``: the state plus the normalizer, ``F`` features per head."""
        h, d = self.cfg.num_heads, self.cfg.dh
        f = self.kernel.num_features(h, d)
        return h * f * d + h * f
