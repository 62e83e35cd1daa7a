r"""Synthetic long-range retrieval data: needle-in-a-haystack / passkey and multi-query
associative recall over filler tokens.

Vocabulary ``V`` (``vocab_size``): token 0 is the query marker ``Q``; keys are
``1 .. K`` with ``K = V // 4``; values are ``K + 1 .. 2K``; filler tokens are the rest,
``2K + 1 .. V - 1``. An example of ``T`` tokens with ``P = num_facts`` facts and values of
``L = value_len`` tokens is

    filler ... k_1 v_11 .. v_1L ... filler ... k_P v_P1 .. v_PL ... filler | Q k_i v_i1 .. v_iL ...

The haystack (the first ``T - P (L + 2)`` tokens) holds the ``P`` facts ``k v_1 .. v_L`` at
random non-overlapping depths (uniform over the arrangements), keys distinct, value tokens
drawn uniformly (with replacement); every other haystack token is uniform filler. The tail
asks each key once, in a random order: ``Q k v_1 .. v_L`` per query. ``labels[t]`` is the next
token wherever it is a value being recalled (at the query's key and at its first ``L - 1``
value tokens), ``-100`` elsewhere, so a causal model is trained and scored on recalling the
``L`` value tokens of each asked fact. ``P = 1`` is the passkey / needle-in-a-haystack test;
``P > 1`` is multi-query associative recall at long range (Zoology's MQAR puts queries right
after the pairs; here they come after the haystack, so every recall spans a random distance).

``source[t]`` is the haystack position of the value token that ``labels[t]`` asks for (-1 when
unlabelled) and ``needle`` marks the facts' value tokens (what a retrieval head copies, Wu et
al. 2024). Example ``i`` is a pure function of ``(seed, stream, i)`` (counter-based uniforms).
"""

from __future__ import annotations

import numpy as np

from experiments.config import ConfigError
from experiments.data import counter_uniform

IGNORE = -100
QUERY = 0


def token_ranges(vocab_size: int) -> dict[str, tuple[int, int]]:
    """``{"keys": (lo, hi), "values": ..., "filler": ...}``: half-open token ranges."""
    k = vocab_size // 4
    return {"keys": (1, 1 + k), "values": (1 + k, 1 + 2 * k), "filler": (1 + 2 * k, vocab_size)}


def query_len(num_facts: int, value_len: int) -> int:
    """Tokens of the query tail: ``P (L + 2)``."""
    return num_facts * (value_len + 2)


def check_sizes(vocab_size: int, seq_len: int, num_facts: int, value_len: int) -> None:
    """Raise ConfigError unless ``(V, T, P, L)`` admits the layout."""
    for name, n, low in (("vocab_size", vocab_size, 16), ("seq_len", seq_len, 8),
                         ("num_facts", num_facts, 1), ("value_len", value_len, 1)):
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise ConfigError(f"config.{name}={n!r}: must be an int >= {low}")
    if num_facts > vocab_size // 4:
        raise ConfigError(f"config.num_facts={num_facts}: at most vocab_size // 4 = "
                          f"{vocab_size // 4} (distinct keys)")
    need = 2 * num_facts * (value_len + 1) + num_facts
    if seq_len < need:
        raise ConfigError(f"config.seq_len={seq_len}: too short for {num_facts} facts and their "
                          f"queries with value_len={value_len} (needs >= {need})")


def _ordered_subset(u: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the ``k`` smallest of ``u [n, m]``, in increasing-``u`` order."""
    part = np.argpartition(u, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(u, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def retrieval_batch(indices: np.ndarray, *, seed: int, vocab_size: int, seq_len: int,
                    num_facts: int, value_len: int, stream: int = 0) -> dict[str, np.ndarray]:
    """Examples at ``indices``: int32 ``inputs``, ``labels``, ``source`` ``[n, T]``, bool
    ``needle [n, T]`` and float ``depth [n, P]`` (each fact's key position / haystack length,
    in query order). Row ``r`` depends only on ``(seed, stream, indices[r])``."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n, t, p, ln = idx.shape[0], int(seq_len), int(num_facts), int(value_len)
    ranges = token_ranges(vocab_size)
    rows = np.arange(n)[:, None]

    def uniform_tokens(which: str, s: int, shape: tuple) -> np.ndarray:
        lo, hi = ranges[which]
        u = counter_uniform(seed, stream + s, idx, shape)
        return lo + np.minimum((u * (hi - lo)).astype(np.int64), hi - lo - 1)

    keys = ranges["keys"][0] + _ordered_subset(
        counter_uniform(seed, stream, idx, (ranges["keys"][1] - ranges["keys"][0],)), p)
    values = uniform_tokens("values", 1, (p, ln))  # [n, P, L]
    inputs = uniform_tokens("filler", 2, (t,))
    # depths: P facts of L + 1 tokens among F filler tokens = stars and bars over F + P slots
    hay = t - query_len(p, ln)
    free = hay - p * (ln + 1)
    slots = np.sort(_ordered_subset(counter_uniform(seed, stream + 3, idx, (free + p,)), p), 1)
    starts = slots + np.arange(p)[None, :] * ln  # each earlier fact holds L more tokens
    inputs[rows, starts] = keys  # fact j (haystack order) holds keys[:, j], values[:, j]
    needle = np.zeros((n, t), bool)
    value_pos = starts[:, :, None] + 1 + np.arange(ln)[None, None, :]  # [n, P, L]
    inputs[rows[:, :, None], value_pos] = values
    needle[rows[:, :, None], value_pos] = True
    # queries: a random order of the facts
    order = _ordered_subset(counter_uniform(seed, stream + 4, idx, (p,)), p)  # [n, P]
    q0 = hay + np.arange(p)[None, :] * (ln + 2)  # query starts, [1, P]
    inputs[rows, q0] = QUERY
    inputs[rows, q0 + 1] = np.take_along_axis(keys, order, 1)
    asked = np.take_along_axis(values, order[:, :, None], 1)  # [n, P, L]
    ans_pos = q0[:, :, None] + 2 + np.arange(ln)[None, None, :]  # [1, P, L]
    inputs[rows[:, :, None], ans_pos] = asked
    labels = np.full((n, t), IGNORE, np.int64)
    source = np.full((n, t), -1, np.int64)
    labels[rows[:, :, None], ans_pos - 1] = asked  # predicted at the previous position
    source[rows[:, :, None], ans_pos - 1] = np.take_along_axis(value_pos, order[:, :, None], 1)
    depth = np.take_along_axis(starts, order, 1) / max(hay - 1, 1)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32),
            "source": source.astype(np.int32), "needle": needle, "depth": depth}
