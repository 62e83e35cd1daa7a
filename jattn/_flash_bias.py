"""Low-rank attention bias as extra feature columns: ``attention(..., bias_factors=(u, w))``.

FlashBias (Wu et al., "FlashBias: Fast Computation of Attention with Bias", 2025): a bias of
rank ``R``, ``bias_ij = u_i . w_j``, need not exist as a ``[Tq, Tk]`` array. Since

    scale * q_i . k_j + u_i . w_j  =  [scale * q_i, u_i] . [k_j, w_j]

it folds exactly into the queries and keys as ``R`` extra feature columns, after which the call
is plain attention with ``scale = 1``: every implementation (the Pallas kernel included) serves
it at ``O(T R)`` extra memory, and gradients reach ``u`` and ``w`` through the concatenation.
The fold changes how ``s`` is computed, not its value, so it holds for every normalizer that is
a function of the scores (softmax, the elementwise family, softpick, stick-breaking); for any
other (a newly registered row-wise normalizer this module does not know) the bias is added per
tile instead, by a score_mod closing over ``u`` and ``w`` (the blocked xla path never forms
``[Tq, Tk]``). The reference implementation materializes ``u w^T`` (the oracle).

Precision: the folded columns take q's dtype, so with bf16 inputs the bias is rounded to bf16
like the scores (products accumulate in fp32 either way).
"""

from __future__ import annotations

import jax.numpy as jnp

from jattn import normalizers as normalizers_lib
from jattn import score_mods as score_mods_lib

__all__ = ["check", "dense_bias", "foldable", "fold", "as_score_mod", "apply"]

# Row-wise normalizers whose weights depend on the scores only (so the fold is exact).
_SCORE_ONLY_ROWWISE = ("softpick", "stick_breaking")


def check(bias_factors, b: int, hq: int, hkv: int, tq: int, tk: int):
    """``(u, w)`` validated: u ``[B|1, Hq|1, Tq, R]``, w ``[B|1, Hq|Hkv|1, Tk, R]``, floating."""
    want = (f"bias_factors must be a pair (u, w) with u [B|1={b}, Hq|1={hq}, Tq={tq}, R] and w "
            f"[B|1={b}, Hq|Hkv|1={hq}|{hkv}, Tk={tk}, R] (bias = u @ w^T)")
    if not isinstance(bias_factors, tuple | list) or len(bias_factors) != 2:
        raise TypeError(f"{want}, got {type(bias_factors).__name__}")
    u, w = (jnp.asarray(x) if hasattr(x, "shape") else x for x in bias_factors)
    for name, x, t, heads in (("u", u, tq, (1, hq)), ("w", w, tk, (1, hkv, hq))):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{want}; {name} is {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{want}; {name} has dtype {x.dtype} (must be floating)")
        if (x.ndim != 4 or x.shape[0] not in (1, b) or x.shape[1] not in heads
                or x.shape[2] != t or x.shape[3] < 1):
            raise ValueError(f"{want}; got {name} of shape {tuple(x.shape)}")
    if u.shape[3] != w.shape[3]:
        raise ValueError(f"{want}; the ranks differ: u has R={u.shape[3]}, w has R={w.shape[3]}")
    return u, w


def _w_heads(w, hq: int, hkv: int):
    """w with Hq heads (a Hkv-headed w repeated over each group)."""
    if w.shape[1] == hkv and hkv not in (1, hq):
        return jnp.repeat(w, hq // hkv, axis=1)
    return w


def dense_bias(u, w, hq: int, hkv: int):
    """``u @ w^T`` in fp32, ``[B|1, Hq|1, Tq, Tk]`` (a ``Hkv``-headed w is repeated over each
    group of query heads; 1-sized batch/head axes broadcast)."""
    u32, w32 = u.astype(jnp.float32), _w_heads(w, hq, hkv).astype(jnp.float32)
    return jnp.einsum("bhqr,bhkr->bhqk", u32, w32)


def foldable(normalizer) -> bool:
    """Whether ``normalizer``'s weights depend on the scores only (the fold is then exact)."""
    norm = normalizers_lib.get(normalizer)
    return norm.softmax or norm.fn is not None or norm.rowwise in _SCORE_ONLY_ROWWISE


def fold(q, k, v, u, w, scale: float):
    """``(q', k', v')`` with ``q' = [scale q, u]``, ``k' = [k, w]`` (use with ``scale = 1``).

    q ``[B, Tq, Hq, Dk]``, k/v ``[B, Tk, Hkv, .]``. A w with ``Hq > Hkv`` heads differs per
    query head, so k and v are repeated to ``Hq`` heads; with 1 or ``Hkv`` heads they are not.
    """
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    r = u.shape[3]
    if w.shape[1] == hq and hq != hkv:
        k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
        hkv = hq
    u_cols = jnp.broadcast_to(u.transpose(0, 2, 1, 3), (b, tq, hq, r)).astype(q.dtype)
    w_cols = jnp.broadcast_to(w.transpose(0, 2, 1, 3), (b, tk, hkv, r)).astype(k.dtype)
    q2 = jnp.concatenate([q * jnp.asarray(scale, q.dtype), u_cols], axis=-1)
    k2 = jnp.concatenate([k, w_cols], axis=-1)
    return q2, k2, v


def as_score_mod(u, w, hq: int, hkv: int):
    """A score_mod adding ``u_i . w_j`` (the tiled bias, for normalizers the fold does not
    cover): the blocked path evaluates it per tile, never forming ``[Tq, Tk]``."""
    w = _w_heads(w, hq, hkv)
    u32, w32 = u.astype(jnp.float32), w.astype(jnp.float32)
    bu, hu, bw, hw = u.shape[0], u.shape[1], w.shape[0], w.shape[1]

    def low_rank_bias(s, b, h, q_idx, kv_idx):
        ui = u32[b if bu > 1 else 0, h if hu > 1 else 0, q_idx]
        wj = w32[b if bw > 1 else 0, h if hw > 1 else 0, kv_idx]
        return s + jnp.sum(ui * wj, axis=-1)

    return low_rank_bias


def apply(q, k, v, bias_factors, *, scale, bias, normalizer, score_mod, implementation):
    """Route ``bias_factors`` into a plain attention call: ``(q, k, v, scale, bias, score_mod)``.

    ``reference``: the dense ``u w^T`` joins ``bias`` (the oracle). Otherwise folded into q/k
    (:func:`fold`, then ``scale = 1``) when :func:`foldable`, else a tiled score_mod applied
    before the caller's ``score_mod`` (the order of ``bias`` then ``score_mod``).
    """
    b, tq, hq, dk = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    u, w = check(bias_factors, b, hq, hkv, tq, tk)
    if implementation == "reference":
        dense = dense_bias(u, w, hq, hkv)
        return q, k, v, scale, (dense if bias is None else bias + dense), score_mod
    if not foldable(normalizer):
        low_rank = as_score_mod(u, w, hq, hkv)
        mod = low_rank if score_mod is None else score_mods_lib.compose(low_rank, score_mod)
        return q, k, v, scale, bias, mod
    scale = 1.0 / float(dk) ** 0.5 if scale is None else scale
    q2, k2, v2 = fold(q, k, v, u, w, scale)
    return q2, k2, v2, 1.0, bias, score_mod

