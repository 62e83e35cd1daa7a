"""Gated linear attention: GLA, RetNet, Lightning attention and Mamba2-style decay."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jattn.linear import _checks, _packing
from jattn.linear.chunk import chunk_recurrence, segment_starts
from jattn.linear.recurrent import gla_recurrent
from jattn.linear.reference import gla_reference


@partial(jax.jit, static_argnames=("impl", "scale", "chunk_size"))
def _gla_xla(q, k, v, g, initial_state, segment_ids=None, *, impl, scale, chunk_size):
    start = None if segment_ids is None else segment_starts(segment_ids)
    if impl == "reference":
        return gla_reference(q, k, v, g, scale=scale, initial_state=initial_state, start=start)
    if impl == "recurrent":
        return gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state, start=start)
    return chunk_recurrence(
        q, k, v, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
        segment_ids=segment_ids,
    )


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
    context_axis: str | tuple[str, ...] | None = None,
    segment_ids: jax.Array | None = None,
    cu_seqlens: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated linear attention with a data-dependent (or constant) decay in log space.

    ``S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t``,   ``o_t = scale * q_t S_t``,

    with ``S_t [K, V]`` per batch and head, kept in fp32. One recurrence covers:

    * GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
      Training"): ``g [B, T, H, K]``, a per-key-channel data-dependent gate.
    * RetNet (Sun et al. 2023, "Retentive Network"): constant ``g = log(gamma_h)`` per head,
      ``g = jnp.broadcast_to(retnet_decay(H), (B, T, H))``.
    * Lightning attention / TransNormerLLM (Qin et al. 2024): constant per-head decay from
      :func:`lightning_decay`, broadcast the same way.
    * Mamba2-style scalar data-dependent decay: ``g [B, T, H]``, e.g. ``-exp(A_log) * dt``.

    Gates: ``g = -inf`` (a full reset, decay 0) is valid in every implementation; the chunk
    and Pallas forms clamp log-decays at a finite floor (``-110``, whose ``exp`` is 0 in fp32,
    so the result is unchanged) before forming cumulative sums and their differences, where
    ``-inf - (-inf)`` would be NaN. A concrete ``g`` with an entry > 0 or NaN raises
    ``ValueError``; traced (jitted) positive gates are undefined behaviour (not checked).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; any float dtype, any length ``T``.
      g: log-decay (<= 0; -inf resets), ``[B, T, H, K]`` or ``[B, T, H]``.
      scale: default ``1 / sqrt(K)``.
      initial_state: ``[B, H, K, V]`` or None (zeros).
      output_final_state: also return ``S_T`` (fp32) instead of None.
      chunk_size: chunk length of the chunk / Pallas paths.
      implementation: ``"reference"`` (scan over time), ``"recurrent"`` (scan of
        :func:`gla_step`), ``"chunk"`` (chunkwise-parallel, alias ``"xla"``), ``"pallas"``
        (``pallas_kernels.chunk_gla``), or None: Pallas on GPU/TPU when available, else chunk.
      context_axis: None, or a mesh axis name (under ``jax.set_mesh``) that splits ``T``:
        context parallelism, see :mod:`jattn.linear.context_parallel`. Same result.
      segment_ids: None or int ``[B, T]``: packed sequences. The state restarts from zero
        wherever the id changes between ``t - 1`` and ``t`` (equal to running each segment
        separately; boundaries are data, so moving them does not recompile).
        ``initial_state`` is the first segment's, the final state the last segment's. Every
        implementation takes it (Pallas: masked in the chunk kernels); not with
        ``context_axis`` (NotImplementedError).
      cu_seqlens: None or int ``[N + 1]`` document offsets (flash-linear-attention's
        convention; ``B = 1``; start 0, nondecreasing, end ``T``, checked when concrete):
        packed documents, each run from its own state. ``initial_state`` and the final state
        are then per document, ``[N, H, K, V]``. A traced array: moving the boundaries does
        not recompile. See :mod:`jattn.linear._packing`. Not with ``segment_ids``.

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] fp32 or None)``.
      Differentiable in ``q, k, v, g, initial_state``. A zero ``B``, ``T``, ``H`` or ``V``:
      empty ``o`` and the initial state (zeros if None) as the final state.
    """
    B, T, H, K, V = _checks.check_qkv(q, k, v)
    _checks.check_gate("g", g, B, T, H, K)
    dtype = _checks.out_dtype(q, k, v)
    chunk_size, scale = _checks.check_run_options(
        (B, T, H, K, V), initial_state, segment_ids, chunk_size, implementation, scale,
        context_axis, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        def call(xs, seg):
            return gla(xs["q"], xs["k"], xs["v"], xs["g"], scale=scale, chunk_size=chunk_size,
                       implementation=implementation, segment_ids=seg)[0]

        o, S = _packing.run_documents(
            call, dict(q=q, k=k, v=v, g=g), dict(q="query", k="key", v="value", g="zero"),
            cu_seqlens, key_dim=K, initial_state=initial_state,
            output_final_state=output_final_state, scale=scale)
        return o.astype(dtype), S
    if context_axis is not None:
        from jattn.linear.context_parallel import gla_context_parallel

        o, S = gla_context_parallel(q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
            implementation=implementation, context_axis=context_axis)
        return o.astype(dtype), S

    o, S = _checks.dispatch(
        implementation,
        lambda explicit: _checks.call_pallas(
            "chunk_gla", explicit, q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
            segment_ids=segment_ids),
        lambda impl: _gla_xla(q, k, v, g, initial_state, segment_ids, impl=impl, scale=scale,
                              chunk_size=chunk_size),
    )
    return o.astype(dtype), (S if output_final_state else None)


def retnet_decay(num_heads: int) -> jax.Array:
    """RetNet's per-head constant log-decay ``log(1 - 2^(-5 - h))``, ``h = 0..H-1`` -> ``[H]``.

    Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models".
    Use as ``g = jnp.broadcast_to(retnet_decay(H), (B, T, H))``.
    """
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return jnp.log1p(-(2.0 ** (-5.0 - h)))


def _alibi_slopes(n: int) -> list[float]:
    def power_of_2(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def lightning_decay(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> jax.Array:
    """Lightning attention's constant log-decay per head, ``-s_h (1 - l / (L - 1) + 1e-5)`` [H].

    ``s_h`` are the ALiBi slopes (``2^(-8 (h+1) / H)`` for ``H`` a power of two), damped by depth
    so that the first layer decays fastest and the last barely at all. Follows the TransNormerLLM
    / Lightning Attention-2 code (Qin et al. 2024); the layer schedule is taken from that code,
    not from the paper's abstract. With ``num_layers=1`` the factor is 1.
    """
    if not 0 <= layer_idx < max(num_layers, 1):
        raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
    slopes = jnp.asarray(_alibi_slopes(num_heads), jnp.float32)
    factor = 1.0 if num_layers <= 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return -slopes * factor
