"""Flow attention (Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022).

Attention as a flow network: with the sigmoid feature map ``Q = sigmoid(q)``, ``K = sigmoid(k)``
(per batch and head, ``e = eps``), token ``i`` (a sink) receives the incoming flow ``I_i`` and
token ``j`` (a source) sends the outgoing flow ``O_j``:

    I_i = (Q_i + e) . (sum_j K_j + e)                 O_j = (K_j + e) . (sum_i Q_i + e)

Conservation fixes each sink's incoming and each source's outgoing flow to 1; the flows that
then result measure competition and allocation:

    I^_i = (Q_i + e) . (sum_j K_j / O_j + e)     O^_j = clip((K_j + e) . (sum_i Q_i / I_i + e), c)
    allocation  a_i = sigmoid(I^_i Tq / Tk)       competition  w_j = Tk softmax_j(O^_j)
    o_i = a_i (Q_i / I_i) sum_j K_j^T (w_j v_j)

Causal (the paper's language-model form, ``Tq = Tk``, ``n_i = i + 1``): every sum over tokens
becomes a prefix sum up to the token, normalized by the token count:

    I_i = (Q_i + e) . (sum_{j<=i} K_j + e)            O_j = (K_j + e) . (sum_{i<=j} Q_i + e)
    I^_i = (Q_i + e) . (sum_{j<=i} n_j K_j / O_j + e) / n_i
    O^_j = clip((K_j + e) . (sum_{i<=j} n_i Q_i / I_i + e) / n_j, c)
    a_i = sigmoid(I^_i),   w_j = n_j exp(O^_j) / sum_{l<=j} exp(O^_l)
    o_i = a_i (Q_i / I_i) sum_{j<=i} K_j^T (w_j v_j)

``clip(x, c)`` clips to ``[-c, c]``; ``c`` (``clamp``, 1 in the paper's reference code)
bounds the competition logits for stability. The weighted value sum is plain linear
attention: causal, it runs on :func:`jattn.linear.linear_attention`'s chunked form.

The causal form is a recurrence over prefix sums: :func:`flow_attention_recurrent` continues it
from a :class:`FlowState` (decoding: prefill, then a few tokens per call).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.linear import _checks
from jattn.linear.kernelized import linear_attention
from jattn.linear.recurrent import LinearAttentionState

__all__ = ["FlowState", "flow_attention", "flow_attention_recurrent"]


class FlowState(NamedTuple):
    """The prefix sums causal flow attention carries (fp32, ``H`` the query heads):
    ``sum_k = sum_j K_j``, ``sum_q = sum_i Q_i``, ``sum_kn = sum_j n_j K_j / O_j``,
    ``sum_qn = sum_i n_i Q_i / I_i`` (each ``[B, H, D]``), ``sum_e = sum_j exp(O^_j) [B, H]``,
    ``kv = sum_j K_j^T (w_j v_j) [B, H, D, V]`` and ``count``, the tokens so far (``[]``)."""

    sum_k: jax.Array
    sum_q: jax.Array
    sum_kn: jax.Array
    sum_qn: jax.Array
    sum_e: jax.Array
    kv: jax.Array
    count: jax.Array

    @staticmethod
    def zeros(b: int, h: int, d: int, dv: int) -> FlowState:
        vec = jnp.zeros((b, h, d), jnp.float32)
        return FlowState(vec, vec, vec, vec, jnp.zeros((b, h), jnp.float32),
                         jnp.zeros((b, h, d, dv), jnp.float32), jnp.zeros((), jnp.float32))


def _identity(x: jax.Array) -> jax.Array:
    return x


def _dot(a: jax.Array, c: jax.Array) -> jax.Array:  # [B, T, H, D] . [B, T|1, H, D] -> [B, T, H]
    return jnp.sum(a * c, axis=-1)


def _features(q, k, v):
    """``sigmoid(q)``, ``sigmoid(k)`` and ``v`` in fp32, kv heads repeated to the query heads."""
    g = q.shape[2] // k.shape[2]
    rep = (lambda x: jnp.repeat(x, g, axis=2)) if g > 1 else _identity
    return (jax.nn.sigmoid(q.astype(jnp.float32)), rep(jax.nn.sigmoid(k.astype(jnp.float32))),
            rep(v.astype(jnp.float32)))


def _noncausal(fq, fk, v, eps, clamp, dense):
    tq, tk = fq.shape[1], fk.shape[1]
    total = lambda x: jnp.sum(x, axis=1, keepdims=True)  # noqa: E731
    inc = _dot(fq + eps, total(fk) + eps)
    out = _dot(fk + eps, total(fq) + eps)
    sink = _dot(fq + eps, total(fk / out[..., None]) + eps)
    src = _dot(fk + eps, total(fq / inc[..., None]) + eps)
    alloc = jax.nn.sigmoid(sink * (tq / tk))
    comp = tk * jax.nn.softmax(jnp.clip(src, -clamp, clamp), axis=1)
    qn, vw = fq / inc[..., None], v * comp[..., None]
    if dense:
        o = jnp.einsum("bhqk,bkhv->bqhv", jnp.einsum("bqhd,bkhd->bhqk", qn, fk), vw)
    else:
        o = jnp.einsum("bqhd,bhdv->bqhv", qn, jnp.einsum("bkhd,bkhv->bhdv", fk, vw))
    return o * alloc[..., None]


def _causal(fq, fk, v, state: FlowState, eps, clamp, dense):
    """Causal flow attention continued from ``state``; ``(o, final state)``. ``dense``: prefix
    sums through a ``[T, T]`` 0/1 matrix and a dense masked product (the reference form)."""
    t = fq.shape[1]
    tri = jnp.tril(jnp.ones((t, t), jnp.float32))

    def prefix(x, carry):  # x [B, T, H, ...] summed up to each token, after carry [B, H, ...]
        run = jnp.einsum("ij,bj...->bi...", tri, x) if dense else jnp.cumsum(x, axis=1)
        return carry[:, None] + run

    count = state.count + jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None]  # n_i
    cum_k, cum_q = prefix(fk, state.sum_k), prefix(fq, state.sum_q)
    inc = _dot(fq + eps, cum_k + eps)
    out = _dot(fk + eps, cum_q + eps)
    cum_kn = prefix(fk * (count / out)[..., None], state.sum_kn)
    cum_qn = prefix(fq * (count / inc)[..., None], state.sum_qn)
    sink = _dot(fq + eps, cum_kn + eps) / count
    src = _dot(fk + eps, cum_qn + eps) / count
    alloc = jax.nn.sigmoid(sink)
    e = jnp.exp(jnp.clip(src, -clamp, clamp))
    cum_e = prefix(e, state.sum_e)
    comp = count * e / cum_e
    qn, vw = fq / inc[..., None], v * comp[..., None]
    if dense:
        s = jnp.einsum("bqhd,bkhd->bhqk", qn, fk) * tri
        o = jnp.einsum("bhqk,bkhv->bqhv", s, vw) + jnp.einsum("bqhd,bhdv->bqhv", qn, state.kv)
        kv = state.kv + jnp.einsum("bkhd,bkhv->bhdv", fk, vw)
    else:
        carry = LinearAttentionState(state.kv, jnp.zeros(state.sum_k.shape, jnp.float32))
        o, (kv, _) = linear_attention(qn, fk, vw, feature_map=_identity, causal=True,
                                      normalize=False, scale=1.0, initial_state=carry,
                                      output_final_state=True)
    new = FlowState(cum_k[:, -1], cum_q[:, -1], cum_kn[:, -1], cum_qn[:, -1], cum_e[:, -1], kv,
                    state.count + t)
    return o * alloc[..., None], new


def _check(q, k, v, causal, clamp, implementation):
    tq, tk = _checks.check_cross_qkv(q, k, v)
    if causal and tq != tk:
        raise ValueError(f"causal flow attention needs Tq == Tk, got q {q.shape}, k {k.shape}")
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0, got {clamp!r}")
    if implementation not in (None, "xla", "reference"):
        raise ValueError(f"implementation must be None, 'xla' or 'reference', "
                         f"got {implementation!r}")


def flow_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    clamp: float = 1.0,
    implementation: str | None = None,
) -> jax.Array:
    """Flow attention (Flowformer), non-causal or causal (see the module docstring).

    Args:
      q: ``[B, Tq, Hq, K]``; k: ``[B, Tk, Hkv, K]``; v: ``[B, Tk, Hkv, V]`` (``Hq % Hkv == 0``;
        ``Tq == Tk`` when causal). Raw projections: the sigmoid feature map is applied here.
      causal: the prefix-sum form (each output sees tokens up to its own).
      eps: the paper's ``1e-6`` added to every flow factor.
      clamp: bound ``c > 0`` of the competition logits ``O^``.
      implementation: ``None`` / ``"xla"`` (``O(T K V)``; causal through chunked linear
        attention) or ``"reference"`` (dense ``[Tq, Tk]`` products, ``O(T^2)``).

    Returns:
      ``o [B, Tq, Hq, V]`` in the inputs' dtype (computed in fp32).
    """
    _check(q, k, v, causal, clamp, implementation)
    dense = implementation == "reference"
    fq, fk, v32 = _features(q, k, v)
    if causal:
        b, _, h, d = fq.shape
        o, _ = _causal(fq, fk, v32, FlowState.zeros(b, h, d, v.shape[-1]), eps, clamp, dense)
    else:
        o = _noncausal(fq, fk, v32, eps, clamp, dense)
    return o.astype(_checks.out_dtype(q, k, v))


def flow_attention_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: FlowState | None = None,
    *,
    eps: float = 1e-6,
    clamp: float = 1.0,
) -> tuple[jax.Array, FlowState]:
    """Causal flow attention of ``T`` new tokens after the ones ``state`` summarizes (None: the
    sequence starts here); ``(o [B, T, Hq, V], FlowState)``. Running a sequence in pieces gives
    :func:`flow_attention` ``(causal=True)`` of the whole (decoding keeps ``O(H K V)`` floats).
    Shapes and arguments as :func:`flow_attention` (``Tq == Tk``)."""
    _check(q, k, v, True, clamp, None)
    fq, fk, v32 = _features(q, k, v)
    b, _, h, d = fq.shape
    if state is None:
        state = FlowState.zeros(b, h, d, v.shape[-1])
    elif not isinstance(state, FlowState) or state.kv.shape != (b, h, d, v.shape[-1]):
        raise ValueError(f"state must be a FlowState with kv [B, Hq, K, V] = "
                         f"{(b, h, d, v.shape[-1])}, got {type(state).__name__}")
    o, state = _causal(fq, fk, v32, state, eps, clamp, False)
    return o.astype(_checks.out_dtype(q, k, v)), state
