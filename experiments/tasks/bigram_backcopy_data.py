"""Bigram-Backcopy data: the bigram chain with trigger backcopies, its exact next-token oracle
and the excess risk of a model against it (Guo et al. 2024; the task and the distribution are
described in :mod:`experiments.tasks.bigram_backcopy`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

BOS = 0


def stationary(p: np.ndarray, iters: int = 10_000, tol: float = 1e-13) -> np.ndarray:
    """Stationary distribution ``pi = pi P`` of a row-stochastic ``p [n, n]`` (power iteration)."""
    pi = np.full(p.shape[0], 1.0 / p.shape[0])
    for _ in range(iters):
        nxt = pi @ p
        nxt /= nxt.sum()
        if np.abs(nxt - pi).sum() < tol:
            return nxt
        pi = nxt
    return pi


def synthetic_bigram(
    num_chars: int, seed: int = 0, zipf_exponent: float = 1.0, row_concentration: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded character bigram matrix ``P [V, V]`` and its unigram marginal ``u [V]``.

    ``P[a, b] ~ pi_b * G_ab`` with ``pi_b ~ (b + 1)^-zipf_exponent`` and ``G_ab ~
    Gamma(row_concentration)`` (smaller = peakier rows), rows normalized; ``u`` is the chain's
    stationary distribution. Characters are re-ordered so ``u`` is decreasing.
    """
    rng = np.random.default_rng((int(seed), 0xB16A))
    pi = (np.arange(num_chars) + 1.0) ** -float(zipf_exponent)
    g = rng.gamma(float(row_concentration), size=(num_chars, num_chars)) + 1e-12
    p = pi[None, :] * g
    p /= p.sum(1, keepdims=True)
    u = stationary(p)
    order = np.argsort(-u, kind="stable")
    p = p[np.ix_(order, order)]
    return p, u[order]


def corpus_bigram(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Characters (sorted), bigram matrix ``P [V, V]`` and unigram ``u [V]`` of a text.

    ``P[a, b]`` = count of ``ab`` / count of ``a.``; a character never followed by another
    gets ``u`` as its row.
    """
    chars = sorted(set(text))
    if len(chars) < 5:
        raise ValueError(f"the corpus has {len(chars)} distinct characters; need at least 5")
    table = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((table[c] for c in text), dtype=np.int64, count=len(text))
    v = len(chars)
    u = np.bincount(ids, minlength=v).astype(np.float64)
    u /= u.sum()
    counts = np.bincount(ids[:-1] * v + ids[1:], minlength=v * v).reshape(v, v).astype(np.float64)
    rows = counts.sum(1, keepdims=True)
    p = np.where(rows > 0, counts / np.maximum(rows, 1.0), u[None, :])
    return chars, p, u


@dataclass(frozen=True)
class BigramBackcopy:
    """The Bigram-Backcopy distribution over token ids ``0 (<s>) .. V``.

    Attributes:
      transition: ``[V+1, V+1]``; row 0 is the unigram ``u``, column 0 is zero.
      triggers: the trigger token ids (most frequent under ``u`` first).
      first: ``[V+1]``, the distribution of ``x_1`` (``u`` without triggers, renormalized).
    """

    transition: np.ndarray
    triggers: tuple[int, ...]
    first: np.ndarray

    @classmethod
    def from_bigram(cls, p: np.ndarray, u: np.ndarray, num_triggers: int = 3) -> BigramBackcopy:
        """From a character bigram ``p [V, V]`` and unigram ``u [V]`` (char ``c`` -> id ``c+1``)."""
        v = p.shape[0]
        t = np.zeros((v + 1, v + 1))
        t[0, 1:] = u / u.sum()
        t[1:, 1:] = p / p.sum(1, keepdims=True)
        order = np.argsort(-u, kind="stable")
        triggers = tuple(int(c) + 1 for c in order[:num_triggers])
        first = t[0].copy()
        first[list(triggers)] = 0.0
        first /= first.sum()
        return cls(t, triggers, first)

    @property
    def num_tokens(self) -> int:
        """``V + 1`` (the model's vocabulary, ``<s>`` included)."""
        return self.transition.shape[0]

    def is_trigger(self) -> np.ndarray:
        """Bool ``[V+1]``."""
        out = np.zeros(self.num_tokens, bool)
        out[list(self.triggers)] = True
        return out

    def oracle_table(self) -> np.ndarray:
        """``[V+1, V+1]``: next-token distribution after token ``a`` at a non-trigger position
        (row 0: after ``<s>``, i.e. ``first``). Trigger rows are unused (backcopy)."""
        t = self.transition.copy()
        t[0] = self.first
        return t

    def _cdfs(self) -> tuple[list[float], list[list[float]]]:
        cache = self.__dict__.get("_cdf_cache")
        if cache is None:
            rows = [np.cumsum(r).tolist() for r in self.oracle_table()]
            for r in rows:
                r[-1] = 1.0 + 1e-9  # u < 1 always lands inside
            cache = (rows[0], rows)
            object.__setattr__(self, "_cdf_cache", cache)
        return cache

    def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """One sequence ``x_0 .. x_{length-1}`` (int32), ``x_0 = <s>``."""
        first, rows = self._cdfs()
        trig = set(self.triggers)
        us = rng.random(length).tolist()
        out = [BOS] * length
        if length > 1:
            out[1] = bisect.bisect_right(first, us[1])
        for t in range(2, length):
            prev = out[t - 1]
            out[t] = out[t - 2] if prev in trig else bisect.bisect_right(rows[prev], us[t])
        return np.asarray(out, np.int32)

    def oracle(self, tokens: np.ndarray) -> np.ndarray:
        """Oracle next-token distributions ``[..., T, V+1]`` given inputs ``tokens [..., T]``
        (position ``t`` predicts ``x_{t+1}``; numpy, for tests and analysis)."""
        tokens = np.asarray(tokens)
        out = self.oracle_table()[tokens]
        trig = self.is_trigger()[tokens]
        prev = np.concatenate([tokens[..., :1], tokens[..., :-1]], axis=-1)
        onehot = np.eye(self.num_tokens)[prev]
        return np.where(trig[..., None], onehot, out)


def excess_risk(
    logits: jax.Array, tokens: jax.Array, table: jax.Array, is_trigger: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-position ``KL(oracle || softmax(logits))`` ``[B, T]`` and the trigger mask ``[B, T]``.

    Args:
      logits: ``[B, T, V+1]`` model outputs at inputs ``tokens [B, T]``.
      table: ``[V+1, V+1]`` :meth:`BigramBackcopy.oracle_table`; is_trigger: bool ``[V+1]``.
    """
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    trig = is_trigger[tokens]
    prev = jnp.concatenate([tokens[:, :1], tokens[:, :-1]], axis=1)
    o = jnp.where(trig[..., None], jax.nn.one_hot(prev, table.shape[0]), table[tokens])
    pos = o > 0
    kl = jnp.sum(jnp.where(pos, o * (jnp.log(jnp.where(pos, o, 1.0)) - logq), 0.0), axis=-1)
    return kl, trig
