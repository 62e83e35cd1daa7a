"""Kernelized linear attention (feature maps) and efficient attention (Shen et al. 2021)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jattn.linear import _checks, _packing
from jattn.linear.chunk import chunk_recurrence, segment_starts
from jattn.linear.feature_maps import resolve_feature_map
from jattn.linear.gla import gla
from jattn.linear.recurrent import (
    LinearAttentionState,
    check_linear_state,
    linear_attention_recurrent,
)
from jattn.linear.reference import linear_attention_reference


def _ratio(num, den, normalize, scale):
    if normalize:
        return num / jnp.where(den == 0, 1.0, den)[..., None]
    return scale * num


@partial(jax.jit, static_argnames=("feature_map", "static_params"))
def _featurize_jit(q, k, params, *, feature_map, static_params):
    phi = resolve_feature_map(
        feature_map, params if static_params is None else static_params, q.shape[-1]
    )
    return phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))


def _featurize(q, k, feature_map, params):
    """``(phi(q), phi(k))`` in fp32; named maps run under one jit (params traced, ints static)."""
    if isinstance(feature_map, str):
        static = params if isinstance(params, int) else None
        return _featurize_jit(
            q,
            k,
            None if static is not None else params,
            feature_map=feature_map,
            static_params=static,
        )
    phi = resolve_feature_map(feature_map, params, q.shape[-1])
    return phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))


@partial(jax.jit, static_argnames=("impl", "causal", "normalize", "scale", "chunk_size"))
def _linear_xla(
    fq, fk, v, kv0, z0, segment_ids=None, *, impl, causal, normalize, scale, chunk_size
):
    start = None if segment_ids is None else segment_starts(segment_ids)
    if impl == "reference":
        return linear_attention_reference(
            fq, fk, v, causal=causal, normalize=normalize, scale=scale, kv0=kv0, z0=z0,
            start=start,
        )
    v = v.astype(jnp.float32)
    if not causal:  # recurrent = prefill the state token by token, then read it out
        if impl == "recurrent":
            zero_q = jnp.zeros_like(fq)
            _, (kv, z) = linear_attention_recurrent(
                zero_q, fk, v, normalize=False, scale=1.0, state=LinearAttentionState(kv0, z0)
            )
        else:
            kv = kv0 + jnp.einsum("bthf,bthv->bhfv", fk, v)
            z = z0 + fk.sum(1)
        num = jnp.einsum("bthf,bhfv->bthv", fq, kv)
        den = jnp.einsum("bthf,bhf->bth", fq, z)
        return _ratio(num, den, normalize, scale), (kv, z)
    if impl == "recurrent":
        return linear_attention_recurrent(
            fq, fk, v, normalize=normalize, scale=scale, state=LinearAttentionState(kv0, z0),
            start=start,
        )
    # chunk: the shared backbone with no decay; a ones column appended to v carries z.
    V = v.shape[-1]
    v_aug = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    S0 = jnp.concatenate([kv0, z0[..., None]], axis=-1)
    o_aug, S = chunk_recurrence(
        fq, fk, v_aug, None, scale=1.0, initial_state=S0, chunk_size=chunk_size,
        segment_ids=segment_ids,
    )
    return _ratio(o_aug[..., :V], o_aug[..., V], normalize, scale), (S[..., :V], S[..., V])


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    feature_map: Any = "elu1",
    causal: bool = True,
    normalize: bool = True,
    scale: float | None = None,
    implementation: str | None = None,
    feature_map_params: Any = None,
    initial_state: LinearAttentionState | tuple | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    context_axis: str | tuple[str, ...] | None = None,
    segment_ids: jax.Array | None = None,
    cu_seqlens: jax.Array | None = None,
) -> tuple[jax.Array, LinearAttentionState | None]:
    """Kernelized linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    ``o_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) . sum_j phi(k_j))`` over ``j <= i``
    (causal) or all ``j``; ``normalize=False`` drops the denominator and returns
    ``scale * phi(q_i) sum_j phi(k_j)^T v_j`` (``scale`` cancels when normalized, so it is only
    used then). A zero denominator (e.g. ``relu`` features all zero) gives 0.

    Args:
      q, k: ``[B, T, H, D]``; v: ``[B, T, H, V]``.
      feature_map: ``"elu1"``, ``"relu"``, ``"performer"``, ``"hedgehog"``, ``"taylor"``,
        ``"dpfp"`` (see :mod:`jattn.linear.feature_maps` for maps and papers) or a callable
        ``phi(x [..., D]) -> [..., F]`` (called as ``phi(x, feature_map_params)`` if params
        are given).
      feature_map_params: ``performer``: projection ``[m, D]`` from ``performer_features(key,
        D, m)`` (None: a fixed draw with key 0, ``m = 2D``; redraw by passing a new one);
        ``hedgehog``: ``hedgehog_params(...)`` dict (required, differentiable); ``dpfp``: ``nu``.
      scale: default ``1 / sqrt(D)``.
      implementation: ``"reference"``, ``"recurrent"`` (scan of
        :func:`linear_attention_step`), ``"chunk"`` / ``"xla"`` (the shared chunk backbone with
        no decay; non-causal: two einsums), ``"pallas"`` (``pallas_kernels.chunk_gla`` with a
        zero gate; causal only), None (best available).
      initial_state: :class:`LinearAttentionState` ``(kv [B, H, F, V], z [B, H, F])`` or None.
      output_final_state: return the state after the sequence (non-causal: after all tokens).
      chunk_size: chunk length of the chunk path.
      context_axis: None, or a mesh axis name (under ``jax.set_mesh``) that splits ``T``:
        context parallelism, see :mod:`jattn.linear.context_parallel`. Same result.
      segment_ids: None or int ``[B, T]`` (``causal=True`` only): packed sequences, as in
        :func:`jattn.linear.gla`; ``kv`` and ``z`` restart at each change of id. Not with
        ``context_axis``.
      cu_seqlens: None or int ``[N + 1]`` document offsets (``B = 1``, ``causal=True``):
        packed documents with a per-document ``initial_state`` and final state
        (``kv [N, H, F, V]``, ``z [N, H, F]``), as in :func:`jattn.linear.gla` (it runs as
        ``gla`` with a zero gate on the features, a ones column of ``v`` carrying ``z``).

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, LinearAttentionState (fp32) or None)``. A zero
      ``B``, ``T``, ``H`` or ``V``: empty ``o``, the initial state as the final one.
    """
    B, T, H, D, V = _checks.check_qkv(q, k, v)
    _checks.check_implementation(implementation)
    chunk_size = _checks.check_chunk_size(chunk_size)
    scale = float(_checks.default_scale(scale, D))
    dtype = _checks.out_dtype(q, k, v)
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.no_segments_with_context(segment_ids, context_axis)
    if segment_ids is not None and not causal:
        raise NotImplementedError(
            "linear_attention: segment_ids needs causal=True (a non-causal per-segment sum "
            "would need one state per segment)"
        )
    fq, fk = _featurize(q, k, feature_map, feature_map_params)
    if fq.shape[:3] != (B, T, H) or fk.shape != fq.shape:
        raise ValueError(
            f"feature_map must map [B, T, H, D] = {q.shape} to [B, T, H, F], got {fq.shape}"
        )
    F = fq.shape[-1]
    if cu_seqlens is not None:
        return _linear_documents(fq, fk, v, initial_state, cu_seqlens, segment_ids, causal,
                                 normalize, scale, implementation, output_final_state,
                                 chunk_size, context_axis, dtype)
    state = check_linear_state("initial_state", initial_state, B, H, F, V)
    if context_axis is not None:
        from jattn.linear.context_parallel import linear_attention_context_parallel

        o, (kv, z) = linear_attention_context_parallel(fq, fk, v, state.kv, state.z,
            causal=bool(causal), normalize=bool(normalize), scale=scale, chunk_size=chunk_size,
            implementation=implementation, context_axis=context_axis)
        return o.astype(dtype), (LinearAttentionState(kv, z) if output_final_state else None)

    impl = _checks.pick(implementation)
    if impl in ("pallas", "pallas?"):
        explicit = impl == "pallas"
        res = None
        if not causal:
            if explicit:
                raise NotImplementedError(
                    "implementation='pallas': linear_attention with "
                    "causal=False has no kernel; use 'chunk'"
                )
        else:
            v_aug = jnp.concatenate(
                [v.astype(jnp.float32), jnp.ones((B, T, H, 1), jnp.float32)], axis=-1
            )
            S0 = jnp.concatenate([state.kv, state.z[..., None]], axis=-1)
            res = _checks.call_pallas(
                "chunk_gla",
                explicit,
                fq,
                fk,
                v_aug,
                jnp.zeros((B, T, H), jnp.float32),
                scale=1.0,
                initial_state=S0,
                output_final_state=True,
                chunk_size=chunk_size,
                segment_ids=segment_ids,
            )
        if res is not None:
            o_aug, S = res
            o = _ratio(
                o_aug[..., :V].astype(jnp.float32),
                o_aug[..., V].astype(jnp.float32),
                normalize,
                scale,
            )
            final = LinearAttentionState(S[..., :V], S[..., V])
            return o.astype(dtype), (final if output_final_state else None)
        impl = "chunk"
    o, (kv, z) = _linear_xla(
        fq,
        fk,
        v,
        state.kv,
        state.z,
        segment_ids,
        impl=impl,
        causal=bool(causal),
        normalize=bool(normalize),
        scale=scale,
        chunk_size=chunk_size,
    )
    return o.astype(dtype), (LinearAttentionState(kv, z) if output_final_state else None)


def _linear_documents(fq, fk, v, initial_state, cu_seqlens, segment_ids, causal, normalize,
                      scale, implementation, output_final_state, chunk_size, context_axis,
                      dtype):
    """``linear_attention`` with ``cu_seqlens``: gla on the features with a zero gate and a
    ones column appended to ``v`` (its state column is ``z``), per-document states."""
    B, T, H, F = fq.shape
    V = v.shape[-1]
    n_docs = _packing.check_cu_seqlens(cu_seqlens, B, T, segment_ids, context_axis)
    if not causal:
        raise NotImplementedError("linear_attention: cu_seqlens needs causal=True")
    S0 = None
    if initial_state is not None:
        state = check_linear_state("initial_state", initial_state, n_docs, H, F, V)
        S0 = jnp.concatenate([state.kv, state.z[..., None]], axis=-1)
    v_aug = jnp.concatenate([v.astype(jnp.float32), jnp.ones((B, T, H, 1), jnp.float32)], -1)
    o_aug, S = gla(fq, fk, v_aug, jnp.zeros((B, T, H), jnp.float32), scale=1.0,
                   initial_state=S0, output_final_state=output_final_state,
                   chunk_size=chunk_size, implementation=implementation, cu_seqlens=cu_seqlens)
    o_aug = o_aug.astype(jnp.float32)
    o = _ratio(o_aug[..., :V], o_aug[..., V], normalize, scale)
    final = LinearAttentionState(S[..., :V], S[..., V]) if output_final_state else None
    return o.astype(dtype), final


def efficient_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Efficient attention (Shen et al. 2021, "Efficient Attention: Attention with Linear
    Complexities"), non-causal.

    ``E(Q, K, V) = rho_q(Q) (rho_k(K)^T V)`` with ``rho_q`` a softmax over the feature axis of
    each query and ``rho_k`` a softmax over the token axis of each key channel: each of the
    ``K`` channels is a global "template" that pools the values; ``O(T K V)`` instead of
    ``O(T^2)``. No scale (as in the paper).

    Args:
      q: ``[B, Tq, H, K]``; k: ``[B, Tk, H, K]``; v: ``[B, Tk, H, V]``.

    Returns:
      ``o [B, Tq, H, V]`` in the inputs' dtype (computed in fp32).
    """
    _checks.check_cross_qkv(q, k, v, gqa=False)
    dtype = _checks.out_dtype(q, k, v)
    rq = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
    rk = jax.nn.softmax(k.astype(jnp.float32), axis=1)
    context = jnp.einsum("bthk,bthv->bhkv", rk, v.astype(jnp.float32))
    return jnp.einsum("bthk,bhkv->bthv", rq, context).astype(dtype)
