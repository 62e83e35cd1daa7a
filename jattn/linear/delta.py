"""The delta rule: DeltaNet, Gated DeltaNet and Kimi Delta Attention (KDA)."""

from __future__ import annotations

from functools import partial

import jax

from jattn.linear import _checks, _packing
from jattn.linear.chunk import chunk_recurrence, segment_starts
from jattn.linear.recurrent import L2NORM_EPS, delta_rule_recurrent, l2norm
from jattn.linear.reference import delta_rule_reference


@partial(jax.jit, static_argnames=("impl", "scale", "chunk_size", "use_qk_l2norm"))
def _delta_xla(
    q, k, v, beta, g, initial_state, segment_ids=None, *, impl, scale, chunk_size,
    use_qk_l2norm,
):
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    start = None if segment_ids is None else segment_starts(segment_ids)
    kw = dict(scale=scale, initial_state=initial_state)
    if impl == "reference":
        return delta_rule_reference(q, k, v, beta, g, start=start, **kw)
    if impl == "recurrent":
        return delta_rule_recurrent(q, k, v, beta, g, start=start, **kw)
    return chunk_recurrence(q, k, v, g, beta, chunk_size=chunk_size, segment_ids=segment_ids, **kw)


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
    context_axis: str | tuple[str, ...] | None = None,
    segment_ids: jax.Array | None = None,
    cu_seqlens: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Linear attention with the (gated) delta-rule state update.

    ``S'_t = exp(g_t) * S_{t-1}``;  ``S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t)``;
    ``o_t = scale * q_t S_t``  (``S_t [K, V]`` per batch and head, fp32). The state is moved
    towards storing ``v_t`` under key ``k_t`` at learning rate ``beta_t``.

    * DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
      Sequence Length"; Schlag et al. 2021): ``g=None``.
    * Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta
      Rule"): scalar decay ``g [B, T, H]``.
    * KDA (Kimi Team 2025, "Kimi Linear"): per-key-channel decay ``g [B, T, H, K]``
      (``exp(g_t)`` scales the rows of ``S``).

    The chunk path uses the WY / UT transform: within a chunk the pseudo-values
    ``u_t = beta_t (v_t - k_t S'_t)`` solve one unit-lower-triangular system (see
    :mod:`jattn.linear.chunk`).

    Stability: the transition ``I - beta_t k_t^T k_t`` has eigenvalue ``1 - beta_t |k_t|^2``
    along ``k_t``, so the state stays bounded iff ``0 <= beta_t |k_t|^2 <= 2`` (a contraction
    for ``< 2``). Outside it the state grows geometrically and turns NaN on long sequences;
    concrete (non-traced) inputs that violate the bound raise a
    :class:`UnstableDeltaRuleWarning` (a ``RuntimeWarning``). Use ``use_qk_l2norm=True``
    (``q, k <- x / sqrt(|x|^2 + 1e-6)`` per head, so ``|k|^2 < 1``) with ``beta`` in
    ``(0, 1)`` (a sigmoid; ``(0, 2)`` for negative eigenvalues), as the papers do.

    Gates: ``g = -inf`` (a full reset, decay 0) is valid in every implementation; the chunk
    and Pallas forms clamp log-decays at a finite floor (``-110``, whose ``exp`` is 0 in fp32,
    so the result is unchanged) before forming cumulative sums and their differences. A
    concrete ``g`` with an entry > 0 or NaN raises ``ValueError``; traced positive gates
    are undefined behaviour (not checked).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``, see Stability.
      g: None, ``[B, T, H]`` or ``[B, T, H, K]`` log-decay (<= 0; -inf resets).
      scale: default ``1 / sqrt(K)``. initial_state: ``[B, H, K, V]`` or None.
      output_final_state, chunk_size, implementation: as in :func:`jattn.linear.gla`
        (``"recurrent"`` scans :func:`delta_rule_step`; ``"pallas"`` calls
        ``pallas_kernels.chunk_delta_rule`` on already L2-normalized q, k).
      context_axis: None, or a mesh axis name (under ``jax.set_mesh``) that splits ``T``:
        context parallelism, see :mod:`jattn.linear.context_parallel`. Same result.
      segment_ids: None or int ``[B, T]``: packed sequences, as in :func:`jattn.linear.gla`
        (the state restarts at each change of id; ``initial_state`` is the first segment's,
        the final state the last's; every implementation, not with ``context_axis``).
      cu_seqlens: None or int ``[N + 1]`` document offsets (``B = 1``): packed documents
        with per-document ``initial_state`` / final state ``[N, H, K, V]``, as in
        :func:`jattn.linear.gla`.

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] fp32 or None)``.
      Differentiable in ``q, k, v, beta, g, initial_state``. A zero ``B``, ``T``, ``H`` or
      ``V``: empty ``o`` and the initial state (zeros if None) as the final state.
    """
    B, T, H, K, V = _checks.check_qkv(q, k, v)
    _checks.check_beta(beta, B, T, H)
    _checks.warn_if_unstable(k, beta, L2NORM_EPS if use_qk_l2norm else None)
    if g is not None:
        _checks.check_gate("g", g, B, T, H, K)
    dtype = _checks.out_dtype(q, k, v)
    use_qk_l2norm = bool(use_qk_l2norm)
    chunk_size, scale = _checks.check_run_options(
        (B, T, H, K, V), initial_state, segment_ids, chunk_size, implementation, scale,
        context_axis, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        if use_qk_l2norm:  # before the inserted state tokens (exact unit keys / queries)
            q, k = l2norm(q).astype(q.dtype), l2norm(k).astype(k.dtype)

        def call(xs, seg):
            return delta_rule(xs["q"], xs["k"], xs["v"], xs["beta"], g=xs["g"], scale=scale,
                              chunk_size=chunk_size, implementation=implementation,
                              segment_ids=seg)[0]

        o, S = _packing.run_documents(
            call, dict(q=q, k=k, v=v, beta=beta, g=g),
            dict(q="query", k="key", v="value", beta="beta", g="zero"), cu_seqlens,
            key_dim=K, initial_state=initial_state, output_final_state=output_final_state,
            scale=scale)
        return o.astype(dtype), S
    if context_axis is not None:
        from jattn.linear.context_parallel import delta_rule_context_parallel

        o, S = delta_rule_context_parallel(q, k, v, beta, g=g, scale=scale,
            initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, implementation=implementation,
            context_axis=context_axis)
        return o.astype(dtype), S

    def call_kernel(explicit: bool):
        qn, kn = (l2norm(q).astype(q.dtype), l2norm(k).astype(k.dtype)) if use_qk_l2norm else (q, k)
        return _checks.call_pallas(
            "chunk_delta_rule", explicit, qn, kn, v, beta, g=g, scale=scale,
            initial_state=initial_state, output_final_state=output_final_state,
            chunk_size=chunk_size, segment_ids=segment_ids)

    o, S = _checks.dispatch(
        implementation, call_kernel,
        lambda impl: _delta_xla(q, k, v, beta, g, initial_state, segment_ids, impl=impl,
                                scale=scale, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm),
    )
    return o.astype(dtype), (S if output_final_state else None)
