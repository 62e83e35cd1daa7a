"""The shared chunkwise-parallel backbone for every gated linear recurrence in ``jattn.linear``.

One function, :func:`chunk_recurrence`, serves GLA / RetNet / Lightning / Mamba2-style decay
(``beta=None``), DeltaNet / Gated DeltaNet / KDA (``beta`` given), the diagonal-plus-low-rank
transition of RWKV-7 (``low_rank=(a, b)``) and causal linear attention (``g=None``), all with
optional packed-sequence restarts (``segment_ids``). The sequence is cut into chunks of ``C``
steps. With ``G_t`` the cumulative log-decay inside a chunk (per key channel, or a scalar
broadcast over channels) and ``S_0`` the state entering the chunk, the recurrence
``S_t = diag(exp(g_t)) S_{t-1} + k_t^T u_t`` unrolls to

    S_t = diag(exp(G_t)) S_0 + sum_{j<=t} (k_j * exp(G_t - G_j))^T u_j
    o_t = scale * (q_t * exp(G_t)) S_0 + sum_{j<=t} A_tj u_j,
    A_tj = scale * sum_c q_tc k_jc exp(G_tc - G_jc)                      (j <= t)

where the "pseudo-values" ``u`` are the values ``v`` for gated linear attention. For the
delta rule ``u_t = beta_t (v_t - k_t S'_t)`` depends on the state; within a chunk this is a
unit-lower-triangular system (the UT / WY transform of Yang et al. 2024):

    (I + diag(beta) A^kk) U = diag(beta) (V - (K * exp(G)) S_0),
    A^kk_tj = sum_c k_tc k_jc exp(G_tc - G_jc)                           (j < t)

solved per chunk, with the entering state already in the right-hand side, by the blockwise
triangular solve of :mod:`jattn.linear.solve_tril` (16 x 16 diagonal blocks by forward
substitution, the rest by matmuls; no ``[C, C]`` inverse, no ``C``-step loop). Everything
inside a chunk is parallel (matmuls and that solve); a ``lax.scan`` over the ``T / C``
chunks carries the state. Each
chunk's work runs inside the scan body (rematerialized in the backward pass) rather than for
all chunks at once: the per-chunk intermediates (``[C, C]`` scores, the ``[c, c, K]`` decay
tensor) then stay in cache, and memory is ``O(T (K + V) + (T / C) K V)``. On a CPU this was
~10x faster for per-channel gates than materializing every chunk's intermediates together.
The per-channel score matrices and the solve carry hand-written gradients
(:mod:`jattn.linear.chunk_scores`, :mod:`jattn.linear.solve_tril`).

Numerics: gates stay in log space and no ``exp`` of a positive number is formed. Relative
decays ``exp(G_i - G_j)`` are only evaluated for ``i >= j`` (the exponent is masked to -inf
before ``exp``). A scalar gate gives a ``[C, C]`` decay matrix directly. A per-channel gate
cannot be factored as ``(q exp(G)) (k exp(-G))^T`` without overflow (``exp(-G)`` reaches
``exp(+1920)`` at ``g = -30``), so the chunk is split again into sub-chunks of ``c`` steps:
pairs in different sub-chunks factor through the boundary ``R`` (cumulative gate at the end of
the earlier sub-chunk), ``exp(G_i - R) * exp(R - G_j)``, both factors <= 1; pairs inside one
sub-chunk use per-entry differences (a ``[c, c, K]`` tensor). ``c ~ sqrt(C)`` balances the two.
All arithmetic is fp32 whatever the input dtype.

Full resets: each log-decay is clamped at ``LOG_DECAY_FLOOR`` (-110) before the cumulative
sum. ``g = -inf`` (decay 0) would otherwise make ``G`` infinite and every difference
``G_i - G_j`` behind it ``-inf - (-inf) = NaN``. ``exp(-110)`` is exactly 0 in fp32 (below the
smallest subnormal), and every decay factor spanning a clamped step is ``<= exp(-110)``, so
the clamp changes no value; its gradient to ``g`` is 0 there, as the exact one (``exp(g)``
times the cotangent) is. Precision: ``G`` falls by 110 per reset, and differences of
cumulative gates of size ``|G|`` carry fp32 rounding ``~|G| * 6e-8`` (as strong finite gates
do): one reset per chunk costs ~1e-6 relative error; 22 resets in one 32-step chunk measured
3.5e-5 against the reference scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jattn.linear.chunk_scores import gated_scores, sub_chunk_size  # noqa: F401
from jattn.linear.solve_tril import unit_lower_solve

_NEG_INF = -jnp.inf
# Log-decays are clamped here (see the module docstring): exp(-110) == 0 in fp32.
LOG_DECAY_FLOOR = -110.0


def _to_chunks(x: jax.Array, n: int, c: int) -> jax.Array:
    """``[B, T, H, ...]`` -> zero-padded ``[N, B, H, C, ...]``."""
    B, T, H = x.shape[:3]
    pad = n * c - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((B, n, c, H) + x.shape[3:])
    perm = (1, 0, 3, 2) + tuple(range(4, x.ndim))
    return x.transpose(perm)


def _from_chunks(x: jax.Array, T: int) -> jax.Array:
    """``[N, B, H, C, D]`` -> ``[B, T, H, D]`` (padding dropped)."""
    N, B, H, C, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, N * C, H, D)[:, :T]


def _masked_exp(d: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(d)`` where ``mask`` else 0, masking BEFORE the exp (no inf in values or grads)."""
    return jnp.exp(jnp.where(mask, d, _NEG_INF))


def stacked_scores(rows: jax.Array, cols: jax.Array, G: jax.Array | None) -> jax.Array:
    """``A[r, s, ..., i, j] = sum_c rows[r, ..., i, c] cols[s, ..., j, c] exp(G_ic - G_jc)`` for
    ``j <= i``, else 0: several score matrices of one chunk sharing one gate.

    ``rows [R, ..., C, K]``, ``cols [S, ..., C, K]``; ``G`` None (no decay), ``[..., C]``
    (scalar) or ``[..., C, K]`` (per channel: :func:`jattn.linear.chunk_scores.gated_scores`,
    sub-chunked, with its own gradient). Returns ``[R, S, ..., C, C]``.
    """
    if G is not None and G.ndim == rows.ndim - 1:
        return gated_scores(rows, cols, G)
    C = rows.shape[-2]
    idx = jnp.arange(C)
    mask = idx[:, None] >= idx[None, :]
    decay = None if G is None else _masked_exp(G[..., :, None] - G[..., None, :], mask)
    # One plain matmul per pair (an einsum with the stack axes leading was ~1.5x slower to
    # differentiate on CPU).
    out = []
    for r in range(rows.shape[0]):
        for c in range(cols.shape[0]):
            A = jnp.einsum("...ik,...jk->...ij", rows[r], cols[c])
            out.append(jnp.where(mask, A, 0.0) if decay is None else A * decay)
    return jnp.stack(out).reshape((rows.shape[0], cols.shape[0]) + out[0].shape)


def intra_chunk_scores(
    a: jax.Array, b: jax.Array, G: jax.Array | None, *, strict: bool
) -> jax.Array:
    """``A_ij = sum_c a_ic b_jc exp(G_ic - G_jc)`` for ``j <= i`` (``j < i`` if strict), else 0.

    ``a, b [..., C, K]``; ``G`` None (no decay), ``[..., C]`` (scalar) or ``[..., C, K]``.
    Returns ``[..., C, C]`` (see :func:`stacked_scores`).
    """
    A = stacked_scores(a[None], b[None], G)[0, 0]
    if strict:
        A = A * (1.0 - jnp.eye(a.shape[-2], dtype=A.dtype))
    return A


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` bool: True where a new segment starts (the id changes from ``t - 1`` to ``t``).

    Position 0 is never a start: the initial state belongs to the first segment.
    """
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def chunk_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    beta: jax.Array | None = None,
    *,
    scale: float,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    low_rank: tuple[jax.Array, jax.Array] | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunkwise-parallel gated linear recurrence (optionally with the delta rule or a
    diagonal-plus-low-rank transition).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: log-decay, None (no decay), ``[B, T, H]`` or ``[B, T, H, K]``; ``-inf`` (a full
        reset) is valid: clamped at ``LOG_DECAY_FLOOR`` without changing the result.
      beta: None (additive update ``S += k^T v``) or ``[B, T, H]`` (delta rule).
      scale: output scale; initial_state: ``[B, H, K, V]`` or None.
      chunk_size: steps per chunk (``T`` is zero-padded to a multiple; padded steps have
        ``k = 0``, ``g = 0``, ``beta = 0`` and leave the state unchanged).
      low_rank: None, or ``(a, b)`` each ``[B, T, H, K]``: the transition becomes
        ``S_t = (diag(exp g_t) + a_t^T b_t) S_{t-1} + k_t^T v_t`` (DPLR; ``beta`` must be None).
        With ``w_t = b_t S_{t-1}`` this is gated linear attention with two writes per step
        (``k_t^T v_t`` and ``a_t^T w_t``); within a chunk the ``w`` solve the unit-lower-
        triangular system ``(I - A^ba) W = A^bk V + (B * exp(G_excl)) S_0``,
        ``A^xy_tj = sum_c x_tc y_jc exp(G_{t-1,c} - G_jc)`` (``j < t``): the WY/UT transform of
        the delta rule generalised to ``a != b`` (the delta rule is ``a = -beta k, b = k``).
      segment_ids: None or int ``[B, T]``: the state restarts (from zero) wherever the id
        changes between ``t - 1`` and ``t``; ``initial_state`` is the first segment's and the
        final state is the last segment's. Exact masking, not a ``-inf`` gate: every pair
        ``(t, j)`` in different segments, the entering state's contribution to rows after a
        restart, and the leaving state's contributions from before the last restart are
        multiplied by 0 (one ``[C, C]`` mask per chunk), so many segments per chunk cost no
        precision (a ``-inf`` gate would add 110 to ``|G|`` per restart).

    Returns:
      ``(o [B, T, H, V] fp32, final_state [B, H, K, V] fp32)``.
    """
    if low_rank is not None and beta is not None:
        raise ValueError("chunk_recurrence: pass beta (delta rule) or low_rank (DPLR), not both")
    f32 = jnp.float32
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    xs = {"q": q, "k": k, "v": v}
    if g is not None:
        xs["g"] = g
    if beta is not None:
        xs["beta"] = beta
    if low_rank is not None:
        xs["a"], xs["b"] = low_rank
    xs = {name: _to_chunks(x.astype(f32), N, C) for name, x in xs.items()}  # [N, B, H, C, ...]
    if segment_ids is not None:
        # Document index per token (0 for the first segment), padded with the last one so that
        # padded steps join the last segment; [N, B, 1, C] broadcasts over heads.
        doc = jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
        doc = jnp.pad(doc, [(0, 0), (0, N * C - T)], mode="edge")
        doc = doc.reshape(B, N, 1, C).transpose(1, 0, 2, 3)
        xs["doc"] = doc
        xs["doc_prev"] = jnp.concatenate(  # the document of the state entering each chunk
            [jnp.zeros((1, B, 1), jnp.int32), doc[:-1, ..., -1]], axis=0
        )

    def chunk_step(S, x):
        """One chunk: ``S [B, H, K, V]`` in, ``(S_out, o [B, H, C, V])`` out."""
        qc, kc, vc = x["q"], x["k"], x["v"]
        if "g" in x:
            # Clamped: a -inf gate (full reset) would give NaN differences of cumsums.
            G = jnp.cumsum(jnp.maximum(x["g"], LOG_DECAY_FLOOR), axis=2)  # [B, H, C(, K)]
            Ge = G if G.ndim == 4 else G[..., None]
            G_last = Ge[:, :, -1:]
            q_dec = qc * jnp.exp(Ge)
            k_dec = kc * jnp.exp(G_last - Ge)
            gamma = jnp.swapaxes(jnp.exp(G_last), -1, -2)  # [B, H, K or 1, 1]
        else:
            G = Ge = G_last = None
            q_dec, k_dec, gamma = qc, kc, 1.0
        if "doc" in x:
            doc = x["doc"]  # [B, 1, C]
            same = (doc[..., :, None] == doc[..., None, :]).astype(f32)  # [B, 1, C, C]
            first = (doc == x["doc_prev"][..., None]).astype(f32)[..., None]  # reads S_0
            last = (doc == doc[..., -1:]).astype(f32)[..., None]  # reaches S_out
            q_dec, k_dec = q_dec * first, k_dec * last
            gamma = gamma * first[..., -1:, :]  # S_0 survives iff no restart in the chunk
        else:
            same = first = last = None

        def scores(x_row, x_col, strict):
            A = intra_chunk_scores(x_row, x_col, G, strict=strict)
            return A if same is None else A * same

        if "a" in x:
            return _dplr_chunk(S, x, G, Ge, G_last, q_dec, k_dec, gamma, first, last, same,
                               scale)
        if "beta" in x:
            # A_qk and A_kk share the gate: one stacked call (one set of decay factors).
            A = stacked_scores(jnp.stack([qc, kc]), kc[None], G)[:, 0]
            if same is not None:
                A = A * same
            A_qk, A_kk = A[0] * scale, A[1] * (1.0 - jnp.eye(A.shape[-1], dtype=A.dtype))
            bc = x["beta"][..., None]  # [B, H, C, 1]
            k_fwd = kc if Ge is None else kc * jnp.exp(Ge)
            if first is not None:
                k_fwd = k_fwd * first
            # The UT transform, solved blockwise with this chunk's entering state in the rhs.
            U = unit_lower_solve(bc * A_kk, bc * (vc - jnp.einsum("bhck,bhkv->bhcv", k_fwd, S)))
        else:
            A_qk = scores(qc, kc, False) * scale  # [B, H, C, C]
            U = vc
        o = scale * jnp.einsum("bhck,bhkv->bhcv", q_dec, S)
        o = o + jnp.einsum("bhij,bhjv->bhiv", A_qk, U)
        return gamma * S + jnp.einsum("bhck,bhcv->bhkv", k_dec, U), o

    S0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    S_final, o = lax.scan(jax.checkpoint(chunk_step), S0, xs)
    return _from_chunks(o, T), S_final


def _dplr_chunk(S, x, G, Ge, G_last, q_dec, k_dec, gamma, first, last, same, scale):
    """The chunk step of the diagonal-plus-low-rank transition (see :func:`chunk_recurrence`).

    ``w_t = b_t S_{t-1}`` unrolls inside the chunk to
    ``w_t = (b_t * exp(G_{t-1})) S_0 + sum_{j<t} A^ba_tj w_j + sum_{j<t} A^bk_tj v_j``, solved
    as ``W = (I - A^ba)^{-1} [A^bk V + (B * exp(G_excl)) S_0]``; then
    ``o = scale (Q * exp(G)) S_0 + A^qk V + A^qa W`` and
    ``S_out = exp(G_C) S_0 + (K * exp(G_C - G))^T V + (A * exp(G_C - G))^T W``.
    The ``b`` rows' scores use the exclusive gate ``G_{t-1}``: they are computed as the
    inclusive scores of the shifted rows ``b_{t+1}``, moved down one row, so that all four
    score matrices share one gate and one set of decay factors (:func:`stacked_scores`).
    """
    vc, ac, bc = x["v"], x["a"], x["b"]
    if G is None:
        b_dec, a_dec = bc, ac
    else:
        # Exclusive cumulative gate G_{t-1} (0 before the chunk's first step).
        G_excl = jnp.concatenate([jnp.zeros_like(G[:, :, :1]), G[:, :, :-1]], axis=2)
        b_dec = bc * jnp.exp(G_excl if G_excl.ndim == 4 else G_excl[..., None])
        a_dec = ac * jnp.exp(G_last - Ge)
    if first is not None:
        b_dec, a_dec = b_dec * first, a_dec * last
    # The b rows read S_{t-1}: A^b_tj = sum_c b_tc y_jc exp(G_{t-1,c} - G_jc) (j < t) is row
    # t - 1 of the inclusive scores of the shifted rows b_{i+1} (j <= i). So all four score
    # matrices share one gate and one set of decay factors.
    b_next = jnp.concatenate([bc[:, :, 1:], jnp.zeros_like(bc[:, :, :1])], axis=2)
    A = stacked_scores(jnp.stack([x["q"], b_next]), jnp.stack([x["k"], ac]), G)

    def shift_down(M):  # row t <- row t - 1 of the shifted-row scores; row 0 reads nothing
        return jnp.concatenate([jnp.zeros_like(M[..., :1, :]), M[..., :-1, :]], axis=-2)

    A_qk, A_qa, A_bk, A_ba = A[0, 0], A[0, 1], shift_down(A[1, 0]), shift_down(A[1, 1])
    if same is not None:
        A_qk, A_qa, A_bk, A_ba = (M * same for M in (A_qk, A_qa, A_bk, A_ba))
    A_qk, A_qa = A_qk * scale, A_qa * scale
    rhs = jnp.einsum("bhij,bhjv->bhiv", A_bk, vc) + jnp.einsum("bhck,bhkv->bhcv", b_dec, S)
    W = unit_lower_solve(-A_ba, rhs)
    o = scale * jnp.einsum("bhck,bhkv->bhcv", q_dec, S)
    o = o + jnp.einsum("bhij,bhjv->bhiv", A_qk, vc) + jnp.einsum("bhij,bhjv->bhiv", A_qa, W)
    S_out = gamma * S + jnp.einsum("bhck,bhcv->bhkv", k_dec, vc)
    S_out = S_out + jnp.einsum("bhck,bhcv->bhkv", a_dec, W)
    return S_out, o
