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
in the query's own chunk form the masked intra-chunk part (levels ``0..log2 C``); a key in an
earlier chunk has ``level = log2 C + bit_length(n_t XOR n_s)`` with ``n`` the chunk index, a
Fenwick tree over chunks. A scan over chunks carries ``ceil(log2 N)`` chunk-level states, each
decayed to the current chunk's start; after chunk ``n`` the levels below ``p + 1`` (``p`` the
number of trailing one bits of ``n``) merge, with chunk ``n``'s own summary, into level
``p + 1``. Work ``O(T C K + T log(T / C) K V)``, state memory ``O(log(T / C) K V)``.

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
    """The chunkwise form (module docstring), fp32; ``[B, T, H, V]``."""
    B, T, H, K = q.shape
    C = min(chunk_size, 1 << max(0, math.ceil(math.log2(max(T, 1)))))
    N = -(-T // C)
    log_c = C.bit_length() - 1
    M = max(1, math.ceil(math.log2(N))) if N > 1 else 1  # chunk-level states carried
    need = log_c + 1 + M
    lam = lam.astype(jnp.float32)
    if lam.shape[-1] < need:  # levels beyond ceil(log2 T) never occur: weight 0
        lam = jnp.pad(lam, [(0, 0)] * 3 + [(0, need - lam.shape[-1])])
    lam = lam[..., :need]
    xs = {
        "q": _to_chunks(q.astype(jnp.float32) * scale, N, C),
        "k": _to_chunks(k.astype(jnp.float32), N, C),
        "v": _to_chunks(v.astype(jnp.float32), N, C),
        "g": _to_chunks(jnp.maximum(g.astype(jnp.float32), LOG_DECAY_FLOOR), N, C),
        "lam": _to_chunks(lam, N, C),
        "n": jnp.arange(N, dtype=jnp.int32),
    }
    local = jnp.arange(C)
    intra_onehot = jax.nn.one_hot(fenwick_levels(local[:, None], local[None, :]), log_c + 1)
    scalar = g.ndim == 3
    V = v.shape[-1]

    def chunk_step(S, x):  # S [M, B, H, K, V]: chunk-level states at this chunk's start
        G = jnp.cumsum(x["g"], axis=2)  # [B, H, C(, K)]
        A = intra_chunk_scores(x["q"], x["k"], G, strict=False)  # [B, H, C, C]
        W = jnp.einsum("bhtl,tsl->bhts", x["lam"][..., : log_c + 1], intra_onehot)
        o = jnp.einsum("bhts,bhsv->bhtv", A * W, x["v"])
        Gk = G[..., None] if scalar else G
        q_dec = x["q"] * jnp.exp(Gk)  # decay from the chunk start (<= 1)
        o = o + jnp.einsum("bhtm,bhtk,mbhkv->bhtv", x["lam"][..., log_c + 1 :], q_dec, S)
        # Advance: decay every state over this chunk, then merge levels < p+1 with the chunk.
        G_end = Gk[..., -1:, :]  # [B, H, 1, K or 1]
        own = jnp.einsum("bhtk,bhtv->bhkv", x["k"] * jnp.exp(G_end - Gk), x["v"])
        S = S * jnp.exp(G_end[:, :, 0, :, None])[None]
        p = _trailing_ones(x["n"])
        lvl = jnp.arange(M)[:, None, None, None, None]
        merged = own + jnp.sum(jnp.where(lvl < p, S, 0.0), axis=0)
        S = jnp.where(lvl < p, 0.0, jnp.where(lvl == p, merged, S))
        return S, o

    S0 = jnp.zeros((M, B, H, K, V), jnp.float32)
    _, o = lax.scan(jax.checkpoint(chunk_step), S0, xs)
    return _from_chunks(o, T)


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
