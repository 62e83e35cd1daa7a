"""The diagonal-plus-low-rank (DPLR) delta rule: RWKV-7's state transition."""

from __future__ import annotations

from functools import partial

import jax

from jattn.linear import _checks, _packing
from jattn.linear.chunk import chunk_recurrence, segment_starts
from jattn.linear.recurrent import dplr_recurrent
from jattn.linear.reference import dplr_reference


@partial(jax.jit, static_argnames=("impl", "scale", "chunk_size"))
def _dplr_xla(q, k, v, a, b, g, initial_state, segment_ids, *, impl, scale, chunk_size):
    start = None if segment_ids is None else segment_starts(segment_ids)
    if impl == "reference":
        return dplr_reference(
            q, k, v, a, b, g, scale=scale, initial_state=initial_state, start=start
        )
    if impl == "recurrent":
        return dplr_recurrent(
            q, k, v, a, b, g, scale=scale, initial_state=initial_state, start=start
        )
    return chunk_recurrence(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        chunk_size=chunk_size,
        low_rank=(a, b),
        segment_ids=segment_ids,
    )


def dplr_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
    cu_seqlens: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Linear attention with a diagonal-plus-low-rank state transition.

    ``S_t = (diag(exp g_t) + a_t^T b_t) S_{t-1} + k_t^T v_t``,   ``o_t = scale * q_t S_t``

    with row vectors ``q_t, k_t, a_t, b_t [K]``, ``v_t [V]`` and ``S_t [K, V]`` per batch and
    head (fp32): the previous state decays per key channel, and ``a_t^T (b_t S_{t-1})`` reads
    the previous state along ``b_t`` and writes the read-out along ``a_t``; ``k_t^T v_t`` is
    added. The general
    transition of RWKV-7 (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State
    Evolution": ``a = -(a_icl * kappa_hat)``, ``b = kappa_hat``, RWKV's ``[V, K]`` state
    transposed; fla passes the same two vectors with read and write swapped) and of
    flash-linear-attention's ``dplr_delta_rule``; it contains

    * DeltaNet / Gated DeltaNet / KDA (:func:`jattn.linear.delta_rule`): with their ``beta``
      and ``g``, ``a = -beta k``, ``b = exp(g) * k`` (per channel, or the scalar broadcast),
      ``k_write = beta k`` and this function's ``g`` = theirs:
      ``exp(g) S - beta k^T k (exp(g) * S) + beta k^T v`` is theirs exactly;
    * gated linear attention (:func:`jattn.linear.gla`): ``a = b = 0``.

    Chunk form (``"chunk"``): with ``w_t = b_t S_{t-1}`` the recurrence is gated linear
    attention with a second write ``a_t^T w_t``; within a chunk the ``w`` solve one
    unit-lower-triangular system (the WY/UT transform of the delta rule generalised to
    ``a != b``), on the shared backbone :func:`jattn.linear.chunk_recurrence`.

    Stability is the caller's: the transition's spectrum must stay within the unit disc
    (RWKV-7: ``a = -icl * k_hat``, ``b = k_hat`` with unit ``k_hat`` and ``icl in (0, 1)``).

    Packed sequences: ``segment_ids [B, T]`` (int) restarts the state from zero wherever the id
    changes between ``t - 1`` and ``t`` (equal to running each segment separately; the
    boundaries are data: no recompilation when they move). ``initial_state`` is the first
    segment's initial state and the final state is the last segment's.

    Args:
      q, k, a, b: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: None (no decay), ``[B, T, H]`` or ``[B, T, H, K]`` log-decay (<= 0; -inf resets; a
        concrete entry > 0 or NaN raises ``ValueError``).
      scale: default ``1 / sqrt(K)``. initial_state: ``[B, H, K, V]`` or None.
      output_final_state: also return the final state. chunk_size: chunk length.
      segment_ids: None or int ``[B, T]`` (see above).
      cu_seqlens: None or int ``[N + 1]`` document offsets (``B = 1``): packed documents
        with per-document ``initial_state`` / final state ``[N, H, K, V]``, as in
        :func:`jattn.linear.gla`.
      implementation: ``"reference"`` (scan over time), ``"recurrent"`` (scan of
        :func:`dplr_delta_rule_step`), ``"chunk"`` / ``"xla"``, ``"pallas"``
        (``pallas_kernels.chunk_dplr_delta_rule``: the same UT transform as Pallas kernels,
        then the shared Pallas backbone on the interleaved ``a``/``k`` writes), or None:
        Pallas on GPU/TPU when it can serve the call, else chunk.

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] fp32 or None)``.
      Differentiable in ``q, k, v, a, b, g, initial_state``.
    """
    B, T, H, K, V = _checks.check_qkv(q, k, v)
    for name, x in (("a", a), ("b", b)):
        _checks.check_float(name, x)
        if x.shape != (B, T, H, K):
            raise ValueError(f"{name} must have shape [B, T, H, K] = {(B, T, H, K)}, got {x.shape}")
    if g is not None:
        _checks.check_gate("g", g, B, T, H, K)
    dtype = _checks.out_dtype(q, k, v, a, b)
    chunk_size, scale = _checks.check_run_options(
        (B, T, H, K, V), initial_state, segment_ids, chunk_size, implementation, scale,
        cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        def call(xs, seg):
            return dplr_delta_rule(xs["q"], xs["k"], xs["v"], xs["a"], xs["b"], g=xs["g"],
                                   scale=scale, chunk_size=chunk_size, segment_ids=seg,
                                   implementation=implementation)[0]

        o, S = _packing.run_documents(
            call, dict(q=q, k=k, v=v, a=a, b=b, g=g),
            dict(q="query", k="key", v="value", a="zero", b="zero", g="zero"), cu_seqlens,
            key_dim=K, initial_state=initial_state, output_final_state=output_final_state,
            scale=scale)
        return o.astype(dtype), S
    o, S = _checks.dispatch(
        implementation,
        lambda explicit: _checks.call_pallas(
            "chunk_dplr_delta_rule", explicit, q, k, v, a, b, g=g, scale=scale,
            initial_state=initial_state, output_final_state=output_final_state,
            chunk_size=chunk_size, segment_ids=segment_ids),
        lambda impl: _dplr_xla(q, k, v, a, b, g, initial_state, segment_ids, impl=impl,
                               scale=scale, chunk_size=chunk_size),
    )
    return o.astype(dtype), (S if output_final_state else None)
