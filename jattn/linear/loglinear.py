"""Log-linear attention (Guo et al. 2025, "Log-Linear Attention"): a Fenwick-tree hierarchy of
gated linear-attention states, for GLA (per-channel gates) and Mamba-2 (scalar gates).

Linear attention compresses the whole prefix into one state ``S_t``. Log-linear attention
partitions the prefix ``[0, t]`` of query ``t`` into ``O(log t)`` buckets of growing size (a
Fenwick tree) and keeps one state per bucket; each query mixes them with its own weights:

    o_t = sum_l lambda_t^l q_t S_t^l,
    S_t^l = sum_{s in B_t^l} (k_s * exp(G_t - G_s))^T v_s           (G_t = sum_{r<=t} g_r)

Bucket of a key ``s <= t`` (0-based positions): ``level(t, s) = bit_length(t XOR s)``, i.e.
0 for ``s = t`` (the token itself) and ``p + 1`` where ``p`` is the highest bit in which ``s``
and ``t`` differ. Bucket ``l >= 1`` holds the ``2^(l-1)`` keys sharing ``t``'s bits above
``p = l - 1`` with bit ``p`` cleared; it exists when bit ``p`` of ``t`` is set. So the
output is the masked (quadratic) form with a level-dependent weight

    o_t = scale * sum_{s<=t} lambda_t^{level(t,s)} (q_t . (k_s * exp(G_t - G_s))) v_s,

and ``T`` needs ``L = ceil(log2 T) + 1`` levels. ``lambda_t^l = 1`` for all ``l`` is plain
GLA (or Mamba-2's SSD). The paper's ``lambda`` is data-dependent, per token, head and level
(a projection of ``x_t``); here ``level_weights [B, T, H, L']`` with ``L' >= L`` (levels past
``L`` are unused, so a model can project to a fixed maximum).

Chunk form (the paper's Sec. 3.2 "chunkwise" algorithm, on a power-of-two chunk ``C``): keys
in the query's own chunk form the masked intra-chunk part (levels ``0..log2 C``, a scan over
chunks); a key in an earlier chunk has ``level = log2 C + bit_length(n_t XOR n_s)`` with ``n``
the chunk index, a Fenwick tree over chunks. Chunk level ``j`` is one level-parallel pass: in
blocks of ``2^j`` chunks the second half reads the decayed summary of the first half (built
by pairwise merges), so each query is multiplied only by the states it has (half the levels
on average). Work ``O(T C K + T log(T / C) K V / 2)``, memory ``O(T (K + V) + T K V / C)``.

Decoding: :func:`loglinear_gla_step` advances an explicit Fenwick stack of states
``[L - 1, B, H, K, V]`` (level ``l >= 1`` at index ``l - 1``; level 0 is the current token)
by one token, the chunk rule with ``C = 1``. The sequence function takes no initial and
returns no final state, and has no ``segment_ids``.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jattn.linear import _checks
from jattn.linear.chunk import LOG_DECAY_FLOOR, _from_chunks, _to_chunks, intra_chunk_scores


def num_levels(seq_len: int) -> int:
    """``ceil(log2 T) + 1``: the Fenwick levels a sequence of ``T`` tokens uses (1 for T <= 1)."""
    return 1 + max(0, math.ceil(math.log2(max(seq_len, 1))))


def fenwick_levels(t: jax.Array, s: jax.Array) -> jax.Array:
    """``level(t, s) = bit_length(t XOR s)`` elementwise for int positions (0 where equal)."""
    x = jnp.bitwise_xor(t, s).astype(jnp.int32)
    return (32 - lax.clz(x)).astype(jnp.int32)


def _clamped_cumsum(g: jax.Array, axis: int) -> jax.Array:
    # -inf (a full reset) would give NaN differences of cumulative sums; exp(-110) == 0 in fp32.
    return jnp.cumsum(jnp.maximum(g.astype(jnp.float32), LOG_DECAY_FLOOR), axis=axis)


def loglinear_reference(q, k, v, g, lam, *, scale: float) -> jax.Array:
    """The quadratic masked form (module docstring), fp32; ``[B, T, H, V]``."""
    f32 = jnp.float32
    q, k, v, lam = (x.astype(f32) for x in (q, k, v, lam))
    T = q.shape[1]
    pos = jnp.arange(T)
    causal = pos[:, None] >= pos[None, :]
    level = fenwick_levels(pos[:, None], pos[None, :])  # [T, T]
    G = _clamped_cumsum(g, axis=1)
    if g.ndim == 3:  # [B, T, H]
        d = G.transpose(0, 2, 1)  # [B, H, T]
        decay = jnp.exp(jnp.where(causal, d[..., :, None] - d[..., None, :], -jnp.inf))
        scores = jnp.einsum("bthk,bshk->bhts", q, k) * decay
    else:  # [B, T, H, K]: per-entry decay, O(T^2 K) memory
        d = G[:, :, None] - G[:, None, :]  # [B, t, s, H, K]
        decay = jnp.exp(jnp.where(causal[None, :, :, None, None], d, -jnp.inf))
        scores = jnp.einsum("bthk,bshk,btshk->bhts", q, k, decay)
    weight = jnp.take_along_axis(
        lam.transpose(0, 2, 1, 3), jnp.broadcast_to(level, (1, 1, T, T)), axis=-1
    )  # [B, H, T, T]: lambda_t^{level(t, s)}
    return scale * jnp.einsum("bhts,bshv->bthv", scores * weight, v)


def loglinear_chunk(q, k, v, g, lam, *, scale: float, chunk_size: int) -> jax.Array:
    """The chunkwise form (module docstring), fp32; ``[B, T, H, V]``: the intra-chunk part
    (:func:`_intra_chunk`) plus one level-parallel pass per chunk level (:func:`_inter_chunk`)."""
    B, T, H, K = q.shape
    C = min(chunk_size, 1 << max(0, math.ceil(math.log2(max(T, 1)))))
    N = -(-T // C)
    log_c = C.bit_length() - 1
    M = max(0, math.ceil(math.log2(N)))  # chunk levels
    need = log_c + 1 + M
    lam = lam.astype(jnp.float32)
    if lam.shape[-1] < need:  # levels beyond ceil(log2 T) never occur: weight 0
        lam = jnp.pad(lam, [(0, 0)] * 3 + [(0, need - lam.shape[-1])])
    lam = _to_chunks(lam[..., :need], N, C)  # [N, B, H, C, need]
    q = _to_chunks(q.astype(jnp.float32) * scale, N, C)
    k = _to_chunks(k.astype(jnp.float32), N, C)
    v = _to_chunks(v.astype(jnp.float32), N, C)
    g = _to_chunks(jnp.maximum(g.astype(jnp.float32), LOG_DECAY_FLOOR), N, C)
    Gk = jnp.cumsum(g, axis=3)  # [N, B, H, C(, K)]: in-chunk cumulative log decay, inclusive
    if g.ndim == 4:
        Gk = Gk[..., None]
    # The intra-chunk part one chunk at a time: all chunks at once is the same math but
    # materialises the per-channel gated scores of every chunk (~4x slower for GLA on CPU).
    intra = jax.checkpoint(partial(_intra_chunk, scalar=g.ndim == 4))
    o = lax.map(lambda x: intra(*x), (q, k, v, Gk, lam[..., : log_c + 1]))
    if M:
        o = o + _inter_chunk(q, k, v, Gk, lam[..., log_c + 1 :])
    return _from_chunks(o, T)


def _intra_chunk(q, k, v, Gk, lam, *, scalar: bool) -> jax.Array:
    """Keys in the query's own chunk: ``[..., B, H, C, V]`` (one chunk, or a stack of chunks
    with the leading axis ``N``: the same math, for measuring its cost). The Fenwick
    level of a pair in one chunk depends only on the two in-chunk offsets (chunks start at
    multiples of ``C``), levels ``0..log2 C``. ``O(T C (K + V + log C))`` work."""
    C = q.shape[-2]
    local = jnp.arange(C)
    onehot = jax.nn.one_hot(fenwick_levels(local[:, None], local[None, :]), lam.shape[-1])
    A = intra_chunk_scores(q, k, Gk[..., 0] if scalar else Gk, strict=False)  # [..., C, C]
    W = jnp.einsum("...tl,tsl->...ts", lam, onehot)  # lambda_t^{level(t, s)}
    return jnp.einsum("...ts,...sv->...tv", A * W, v)


def _inter_chunk(q, k, v, Gk, lam) -> jax.Array:
    """Keys in earlier chunks, one pass per chunk level ``j = 1..M``: ``[N, B, H, C, V]``.

    Chunk level ``j`` of query chunk ``n`` holds the ``2^(j-1)`` chunks sharing ``n``'s bits
    above ``j - 1`` with bit ``j - 1`` cleared, and is empty unless bit ``j - 1`` of ``n`` is
    set. With the chunks grouped in blocks of ``2^j`` (padded to ``2^M`` chunks), that is:
    the second half of every block reads the summary of the block's first half. So level
    ``j`` multiplies only half the queries by one ``[K, V]`` state (a scan over chunks that
    carries all ``M`` states would multiply every query by all of them: twice the work), and
    the half summaries build bottom-up by pairwise merges, ``O(N K V)`` per level. Decays stay
    local (sums of log-gates over one span, only ever exponentiated): no differences of
    global cumulative sums, which lose fp32 precision on long or strongly gated sequences.
    """
    N = q.shape[0]
    M = max(0, math.ceil(math.log2(N)))
    pad = [(0, (1 << M) - N)] + [(0, 0)] * 4
    G_end = Gk[:, :, :, -1]  # [N, B, H, K or 1]: log decay over each chunk
    own = jnp.einsum("nbhtk,nbhtv->nbhkv", k * jnp.exp(G_end[:, :, :, None] - Gk), v)
    q_dec = jnp.pad(q * jnp.exp(Gk), pad)  # decayed from the chunk start (<= 1)
    lam = jnp.pad(lam, pad)
    chunk_span = jnp.pad(G_end, pad[:4])
    summary, span = jnp.pad(own, pad), chunk_span  # level-0 summaries: one chunk each
    o = jnp.zeros(q_dec.shape[:4] + (v.shape[-1],), jnp.float32)
    for j in range(1, M + 1):
        half = 1 << (j - 1)
        first = summary.reshape((-1, 2) + summary.shape[1:])[:, 0]  # [blocks, B, H, K, V]
        # Decay from the second half's start to each of its chunks' starts: exclusive cumsum.
        # (not cumsum - span: that difference would cancel on strongly gated chunks)
        span2 = chunk_span.reshape((-1, 2, half) + chunk_span.shape[1:])[:, 1, :-1]
        before = jnp.pad(jnp.cumsum(span2, axis=1), [(0, 0), (1, 0)] + [(0, 0)] * 3)
        qj = q_dec.reshape((-1, 2, half) + q_dec.shape[1:])[:, 1] * jnp.exp(before)[..., None, :]
        lj = lam.reshape((-1, 2, half) + lam.shape[1:])[:, 1, ..., j - 1]  # [blocks,half,B,H,C]
        contrib = jnp.einsum("nrbhck,nbhkv->nrbhcv", lj[..., None] * qj, first)
        # Zeros for the first halves: a pad fuses into the add (``.at[:, 1].add`` is a scatter).
        o = o + jnp.pad(contrib[:, None], [(0, 0), (1, 0)] + [(0, 0)] * 5).reshape(o.shape)
        if j < M:  # merge pairs of spans: the later one's decay applies to the earlier summary
            pairs = summary.reshape((-1, 2) + summary.shape[1:])
            spans = span.reshape((-1, 2) + span.shape[1:])
            summary = pairs[:, 0] * jnp.exp(spans[:, 1])[..., None] + pairs[:, 1]
            span = spans[:, 0] + spans[:, 1]
    return o[:N]


def _trailing_ones(n: jax.Array) -> jax.Array:
    """Trailing one bits of a non-negative int32 ``n``: ``bit_length(~n & (n + 1)) - 1``."""
    return jnp.int32(32) - lax.clz(~n & (n + 1)) - 1


def loglinear_gla_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    level_weights: jax.Array,
    levels: jax.Array,
    index: jax.Array,
    *,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of :func:`loglinear_gla` at absolute position ``index``.

    Args:
      q, k: ``[B, H, K]``; v: ``[B, H, V]``; g: ``[B, H]`` or ``[B, H, K]`` (log-decay).
      level_weights: ``[B, H, L]``; ``levels``: the Fenwick stack ``[L - 1, B, H, K, V]``
        (fp32; zeros at ``index = 0``), level ``l >= 1`` of the keys ``< index`` at ``l - 1``,
        decayed to ``index - 1``. Positions up to ``2^(L - 1)`` fit.
      index: int scalar (may be traced), the position of this token.

    Returns:
      ``(o [B, H, V] fp32, levels)``: ``o = scale (lambda^0 q.k v + sum_l lambda^l (q *
      exp(g)) S^l)``; then every level decays by ``exp(g)`` and levels ``1..p`` merge with
      the token into level ``p + 1`` (``p`` = trailing one bits of ``index``).
    """
    f32 = jnp.float32
    q, k, v, lam = (x.astype(f32) for x in (q, k, v, level_weights))
    g = jnp.maximum(g.astype(f32), LOG_DECAY_FLOOR)
    decay = jnp.exp(g[..., None] if g.ndim == 2 else g)  # [B, H, K or 1]
    own = k[..., :, None] * v[..., None, :]  # [B, H, K, V]
    q = q * scale
    o = lam[..., 0, None] * jnp.einsum("bhk,bhkv->bhv", q, own)
    o = o + jnp.einsum("bhl,bhk,lbhkv->bhv", lam[..., 1:], q * decay, levels)
    levels = levels * decay[None, ..., None]
    p = _trailing_ones(jnp.asarray(index, jnp.int32))
    lvl = jnp.arange(levels.shape[0])[:, None, None, None, None]
    merged = own + jnp.sum(jnp.where(lvl < p, levels, 0.0), axis=0)
    return o, jnp.where(lvl < p, 0.0, jnp.where(lvl == p, merged, levels))


@partial(jax.jit, static_argnames=("impl", "scale", "chunk_size"))
def _loglinear_xla(q, k, v, g, lam, *, impl, scale, chunk_size):
    if impl == "reference":
        return loglinear_reference(q, k, v, g, lam, scale=scale)
    return loglinear_chunk(q, k, v, g, lam, scale=scale, chunk_size=chunk_size)


def loglinear_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    level_weights: jax.Array,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
) -> jax.Array:
    """Log-linear gated linear attention (Guo et al. 2025): GLA / Mamba-2 with a Fenwick-tree
    hierarchy of ``O(log T)`` states per query, ``O(T log T)`` work.

    ``o_t = scale * sum_{s<=t} lambda_t^{level(t,s)} (q_t . (k_s * exp(G_t - G_s))) v_s``,
    ``level(t, s) = bit_length(t XOR s)`` (0 for ``s = t``; 0-based positions),
    ``G_t = sum_{r<=t} g_r``; equivalently ``o_t = sum_l lambda_t^l q_t S_t^l`` with ``S_t^l``
    the gated state of bucket ``l`` (see the module docstring). ``level_weights = 1``
    everywhere gives :func:`jattn.linear.gla`.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: log-decay (<= 0; -inf resets): ``[B, T, H, K]`` (GLA) or ``[B, T, H]`` (Mamba-2).
      level_weights: ``lambda [B, T, H, L']`` with ``L' >= ceil(log2 T) + 1``
        (:func:`num_levels`); real-valued (the paper uses a softplus projection, >= 0);
        levels past ``num_levels(T)`` are ignored.
      scale: default ``1 / sqrt(K)``.
      chunk_size: a power of two; the chunk form uses ``min(chunk_size, next_pow2(T))``.
      implementation: ``"reference"`` (the ``O(T^2)`` masked form, ``O(T^2 K)`` memory for
        per-channel gates), ``"chunk"`` / ``"xla"`` / None (chunkwise, ``O(T log T)``).
        No recurrent or Pallas form (``NotImplementedError``).

    Returns:
      ``o [B, T, H, V]`` in the inputs' dtype (fp32 arithmetic). No final state: decoding
      would need the Fenwick stack of states, which is not exposed. Differentiable in
      ``q, k, v, g, level_weights``.
    """
    B, T, H, K, V = _checks.check_qkv(q, k, v)
    _checks.check_gate("g", g, B, T, H, K)
    _checks.check_float("level_weights", level_weights)
    L = num_levels(T)
    if level_weights.ndim != 4 or level_weights.shape[:3] != (B, T, H) or (
        level_weights.shape[3] < L
    ):
        raise ValueError(
            f"level_weights must have shape [B, T, H, L] = {(B, T, H)} + (L,) with "
            f"L >= ceil(log2 T) + 1 = {L}, got {level_weights.shape}"
        )
    chunk_size = _checks.check_chunk_size(chunk_size)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two for loglinear_gla, got {chunk_size}")
    _checks.check_implementation(implementation)
    if implementation in ("recurrent", "pallas"):
        raise NotImplementedError(
            f"loglinear_gla has implementations 'reference' and 'chunk' (alias 'xla'), "
            f"not {implementation!r}"
        )
    impl = "reference" if implementation == "reference" else "chunk"
    scale = float(_checks.default_scale(scale, K))
    dtype = _checks.out_dtype(q, k, v)
    if 0 in (B, T, H, V):
        return jnp.zeros((B, T, H, V), dtype)
    o = _loglinear_xla(q, k, v, g, level_weights, impl=impl, scale=scale, chunk_size=chunk_size)
    return o.astype(dtype)
