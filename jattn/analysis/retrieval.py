r"""Retrieval heads per (layer, head) from teacher-forced self-attention (Wu et al. 2024,
"Retrieval Head Mechanistically Explains Long-Context Factuality").

Wu et al. decode a needle-in-a-haystack answer and, at each step, call head ``h`` a
*copy-paste* when its most-attended position ``j* = argmax_j p_tj`` is a needle token equal to
the token being produced; a head's score is the fraction of the needle's tokens it copied,
``|g_h ∩ k| / |k|`` (:func:`jattn.analysis.retrieval_score`), and heads above 0.1 are called
retrieval heads. On a synthetic task with a teacher-forced answer the decoding steps are the
query positions of one forward pass: :func:`retrieval_head_scores` reads them off the full
``[L, B, H, T, T]`` attention, counting a step only when the model's own prediction is the
needle token (as in decoding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.analysis._validate import _weights
from jattn.analysis.heads import retrieval_score

__all__ = ["retrieval_head_scores", "retrieval_heads"]


def retrieval_head_scores(weights, tokens, needle_mask, steps, predicted, step_mask=None,
                          ) -> jax.Array:
    r"""Wu et al.'s retrieval score of every head, averaged over the batch.

    For example ``b`` with needle positions ``k_b`` (``needle_mask``), step ``n`` at query
    position ``t = steps[b, n]`` producing ``y = predicted[b, n]``: head ``h`` copies needle
    position ``j* = argmax_j p_h[t, j]`` iff ``needle[j*]`` and ``tokens[j*] == y``; with
    ``g_{b,h}`` the needle positions so copied (a set),

        score_h = mean_b |g_{b,h}| / |k_b|.

    Args:
      weights: ``[B, H, T, T]`` or a stack over layers ``[L, B, H, T, T]``: attention of the
        full sequence (rows = queries).
      tokens: int ``[B, T]``: the sequence.
      needle_mask: bool ``[B, T]``: the needle's tokens (the ones an answer copies).
      steps: int ``[B, N]``: query positions whose output is an answer token.
      predicted: int ``[B, N]``: the token the model produces there (its argmax).
      step_mask: optional bool ``[B, N]``: which steps count (e.g. padding off).

    Returns:
      ``[H]`` (or ``[L, H]``) in ``[0, 1]``.
    """
    w = _weights(weights)
    stacked = w.ndim == 5
    w = w if stacked else w[None]
    _, b, _, t, _ = w.shape
    tokens, steps, predicted = (jnp.asarray(x) for x in (tokens, steps, predicted))
    if tokens.shape != (b, t):
        raise ValueError(f"tokens must have shape [B, T] = {(b, t)}, got {tokens.shape}")
    if jnp.shape(needle_mask) != (b, t):
        raise ValueError(f"needle_mask must have shape [B, T] = {(b, t)}, got "
                         f"{jnp.shape(needle_mask)}")
    if steps.ndim != 2 or steps.shape[0] != b or predicted.shape != steps.shape:
        raise ValueError(f"steps and predicted must have the same shape [B={b}, N], got "
                         f"{steps.shape} and {predicted.shape}")
    if step_mask is not None:
        if jnp.shape(step_mask) != steps.shape:
            raise ValueError(f"step_mask must have shape {steps.shape}, got "
                             f"{jnp.shape(step_mask)}")
        predicted = jnp.where(jnp.asarray(step_mask, bool), predicted, -1)  # -1: no token
    rows = jnp.take_along_axis(w, steps[None, :, None, :, None], axis=3)  # [L, B, H, N, T]
    per_layer = jax.vmap(lambda r: retrieval_score(r, predicted, tokens, needle_mask))(rows)
    scores = per_layer.mean(1)  # [L, H]
    return scores if stacked else scores[0]


def retrieval_heads(scores, threshold: float = 0.1) -> list[tuple[int, int]]:
    """``(layer, head)`` pairs whose score exceeds ``threshold`` (Wu et al.: 0.1), highest
    first; ``scores`` is ``[L, H]`` (not jittable: returns a Python list)."""
    s = jnp.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be [L, H], got shape {s.shape}")
    flat = [(float(s[i, h]), i, h) for i in range(s.shape[0]) for h in range(s.shape[1])]
    return [(i, h) for v, i, h in sorted(flat, key=lambda x: (-x[0], x[1], x[2]))
            if v > threshold]
