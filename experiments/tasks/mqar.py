r"""Multi-query associative recall (MQAR), as in Zoology (Arora et al. 2023, "Zoology: Measuring
and Improving Recall in Efficient Language Models").

Data. Vocabulary ``V`` (``config.vocab_size``, 8192 in the paper). Keys are drawn from the first
half ``1 .. V/2 - 1`` (0 is never a key), values from the second half ``V/2 .. V - 1``, both
without replacement. An input sequence of ``T = seq_len`` tokens is

    k_1 v_1 k_2 v_2 ... k_P v_P | queries and noise

with ``P = num_kv_pairs`` pairs. The remaining ``T - 2P`` positions hold the ``P`` keys again
(in a random order) at positions ``2P + 2 g_j`` where the gaps ``g_j`` are drawn without
replacement from ``0 .. (T - 2P)/2 - 1`` with the power law ``p(g) ~ (g + 1)^(a - 1)``
(``a = config.power_a = 0.01``: short gaps are far more likely); every other position is a
uniformly random token ("random non-queries"). ``labels[t]`` is the value paired with the key at
``inputs[t]`` when ``t`` is a query position (the model must predict it as the next token) and
``-100`` (ignored) elsewhere. This is Zoology's ``multiquery_ar`` generator; here example ``i``
is a pure function of ``(config.seed, i)`` (counter-based uniforms,
``experiments.data.counter_uniform``; keys, values and gaps by sorting uniforms / Gumbel top-k),
vectorized over a batch. The fixed held-out set uses other counter streams.

Training mixture (``config.train_mix = "64:4,128:8,256:16"``, as Zoology trains): example ``i``
has the size ``sizes[i % len(sizes)]``, padded with random unlabelled tokens up to ``seq_len``
(:func:`mqar_mixture_batch`); the held-out set is always ``(seq_len, num_kv_pairs)``.

Model: ``models.Decoder``, ``model.num_layers`` (2) layers of ``config.model.mechanism`` (any
registered attention mechanism name: ``softmax``, ``gla``, ``deltanet``, ``gated_deltanet``,
``retnet``, ``linear:elu1``, ``based``, ``sliding_window:16``, ...) with an MLP, learned
absolute positions (recurrent cores ignore RoPE, so learned positions give every mechanism the
same information).

Loss: cross-entropy on the labelled positions only (the vocabulary head runs at those positions
only, ``Decoder(gather=)``). ``accuracy`` = fraction of labelled
positions whose argmax is the right value, on the held-out set (``summary.json`` top level).

State size (:func:`state_size`: each layer core's ``state_size(T)``, in floats, for one sequence
of length ``T``; ``H`` heads, ``Hkv`` KV heads, ``Dh`` head dim, ``F`` feature count):

* softmax family (``softmax``, ``sigmoid``, ``relu``, ``sinks``, ``gated``, ...):
  the KV cache, ``2 * T * Hkv * Dh`` (``= 2 T d`` for MHA);
* mask patterns ``sliding_window:W`` (and other patterns): ``2 * min(W, T) * Hkv * Dh``
  (window) or ``2 * T * Hkv * Dh``;
* ``gla``, ``retnet``, ``deltanet``, ``gated_deltanet``, ``kda``: ``H * Dh * Dh`` (``S [H, K, V]``);
* ``linear:<map>``: ``H * F * Dh + H * F`` (state plus normalizer), ``F`` = feature count of the
  map at ``Dh`` (``elu1``/``relu``: ``Dh``; ``taylor``: ``1 + Dh + Dh^2``; ...);
* ``based``: the Taylor branch ``H * F * Dh + H * F`` with ``F = 1 + f + f^2``
  (``f = feature_dim``, 16) plus the window branch ``2 * min(window, T) * Hkv * Dh``.

Cores without a formula (user-registered ones) count the float elements of their decoding cache
(``init_cache(1, T)`` under ``jax.eval_shape``, :func:`cache_size`), which the tests compare
with the formulas.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.config import ConfigError
from experiments.data import BatchedSource, counter_uniform
from experiments.tasks.base import Batch, Metrics, register
from experiments.tasks.recall import IGNORE, RecallTask, recall_loss
from experiments.tasks.recall import labelled_positions as query_positions  # noqa: F401

#: Counter streams of the generator: train and held-out use disjoint ones.
_TRAIN_STREAM, _EVAL_STREAM = 0, 8


# ================================================================================================
# Data.
# ================================================================================================
def check_sizes(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Raise ConfigError unless ``(V, T, P)`` admits Zoology's MQAR layout."""
    if not (isinstance(seq_len, int) and seq_len >= 4 and seq_len % 2 == 0):
        raise ConfigError(f"config.seq_len={seq_len!r}: must be an even int >= 4")
    if not (isinstance(num_kv_pairs, int) and num_kv_pairs >= 1 and 4 * num_kv_pairs <= seq_len):
        raise ConfigError(
            f"config.num_kv_pairs={num_kv_pairs!r}: must be an int in [1, seq_len / 4 = "
            f"{seq_len // 4}] (keys, values and queries must fit)"
        )
    if not (isinstance(vocab_size, int) and vocab_size // 2 - 1 >= num_kv_pairs):
        raise ConfigError(
            f"config.vocab_size={vocab_size!r}: must be an int with vocab_size // 2 - 1 >= "
            f"num_kv_pairs={num_kv_pairs} (distinct keys from the first half)"
        )


def _random_subset(u: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the ``k`` smallest of ``u [n, m]`` in increasing-``u`` order: a
    uniformly random ordered ``k``-subset of ``0 .. m-1`` when ``u`` is i.i.d. uniform."""
    part = np.argpartition(u, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(u, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def mqar_batch(
    indices: np.ndarray,
    *,
    seed: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    stream: int = _TRAIN_STREAM,
) -> dict[str, np.ndarray]:
    """MQAR examples at ``indices``: ``{"inputs": int32 [n, T], "labels": int32 [n, T]}``.

    Row ``r`` depends only on ``(seed, stream, indices[r])``. See the module docstring.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n, t, p = idx.shape[0], int(seq_len), int(num_kv_pairs)
    half = vocab_size // 2
    ctx = 2 * p
    space = (t - ctx) // 2
    keys = 1 + _random_subset(counter_uniform(seed, stream, idx, (half - 1,)), p)
    values = half + _random_subset(counter_uniform(seed, stream + 1, idx, (vocab_size - half,)), p)
    # Gaps without replacement, p(g) ~ a (g+1)^(a-1): Gumbel top-k on log p.
    logp = math.log(power_a) + (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    u = counter_uniform(seed, stream + 2, idx, (space,))
    gumbel = -np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))
    gaps = _random_subset(-(logp[None, :] + gumbel), p)  # p largest perturbed log-probs
    noise = counter_uniform(seed, stream + 3, idx, (t,))
    inputs = np.minimum((noise * vocab_size).astype(np.int64), vocab_size - 1)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    # query j asks for key j (keys are in a random order already); the gaps are in their
    # Gumbel order, so the query order is random too.
    qpos = ctx + 2 * gaps
    rows = np.arange(n)[:, None]
    inputs[rows, qpos] = keys
    labels = np.full((n, t), IGNORE, dtype=np.int64)
    labels[rows, qpos] = values
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}


def parse_mix(spec: str) -> list[tuple[int, int]]:
    """``"64:4,128:8,256:16"`` -> ``[(64, 4), (128, 8), (256, 16)]`` (``""`` -> ``[]``)."""
    out = []
    for item in (spec or "").split(","):
        if item.strip():
            t, _, p = item.partition(":")
            try:
                out.append((int(t), int(p)))
            except ValueError:
                raise ConfigError(
                    f"config.train_mix={spec!r}: expected 'T:P,T:P,...' such as "
                    f"'64:4,128:8,256:16', got item {item!r}") from None
    return out


def mqar_mixture_batch(
    indices: np.ndarray, *, sizes: list[tuple[int, int]], seq_len: int, seed: int,
    vocab_size: int, power_a: float = 0.01, stream: int = _TRAIN_STREAM,
) -> dict[str, np.ndarray]:
    """Zoology's training mixture: example ``i`` is an MQAR example of size
    ``sizes[i % len(sizes)] = (T_i, P_i)`` (:func:`mqar_batch` with the same ``seed, stream``)
    in positions ``0 .. T_i - 1``, followed by uniformly random tokens up to ``seq_len``
    (unlabelled). A causal model's predictions at the first ``T_i`` positions are exactly its
    predictions on the ``T_i``-token example, so one batch mixes sequence lengths and pair
    counts, and every position of a learned table still gets trained by the longest size.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    pad = counter_uniform(seed, stream + 4, idx, (seq_len,))
    inputs = np.minimum((pad * vocab_size).astype(np.int64), vocab_size - 1).astype(np.int32)
    labels = np.full((idx.shape[0], seq_len), IGNORE, dtype=np.int32)
    which = idx % len(sizes)
    for j, (t, p) in enumerate(sizes):
        rows = np.flatnonzero(which == j)
        if rows.size:
            part = mqar_batch(idx[rows], seed=seed, vocab_size=vocab_size, seq_len=t,
                              num_kv_pairs=p, power_a=power_a, stream=stream)
            inputs[rows, :t] = part["inputs"]
            labels[rows, :t] = part["labels"]
    return {"inputs": inputs, "labels": labels}


# ================================================================================================
# State size.
# ================================================================================================
def state_size(model_config, seq_len: int) -> list[int]:
    """Per-layer recurrent state / KV-cache size (floats per sequence) of a DecoderConfig:
    each layer's ``Core.state_size(seq_len)`` (see the module docstring for the formulas).
    The model is traced abstractly (no parameters are drawn)."""
    from models import Decoder

    sizes: list[int] = []

    def build():
        model = Decoder(model_config, rngs=nnx.Rngs(0))
        sizes.extend(layer.attn.core.state_size(int(seq_len)) for layer in model.layers)

    jax.eval_shape(build)
    return sizes


def cache_size(model_config, seq_len: int) -> list[int]:
    """Per-layer element count of ``Decoder.init_cache(1, seq_len)`` (abstract; no FLOPs).

    Counts the float tensors of each layer's decoding cache (integer bookkeeping such as slot
    positions is excluded). For ``based`` the window branch's cache is allocated at full
    length here, so this differs from :func:`state_size` when ``T > window``.
    """
    from models import Decoder

    model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
    caches = jax.eval_shape(
        lambda: [layer.attn.init_cache(1, seq_len, _policy()) for layer in model.layers]
    )
    return [
        int(
            sum(
                math.prod(x.shape)
                for x in jax.tree.leaves(c)
                if jnp.issubdtype(x.dtype, jnp.floating)
            )
        )
        for c in caches
    ]


def _policy():
    from models.kv_cache import CachePolicy

    return CachePolicy()


# ================================================================================================
# The task.
# ================================================================================================
@register("mqar")
class MQAR(RecallTask):
    """Zoology's multi-query associative recall on a ``models.Decoder``."""

    headline_metrics = ("accuracy",)

    def validate(self) -> None:
        c = self.config
        check_sizes(c.vocab_size, c.seq_len, c.num_kv_pairs)
        for t, p in parse_mix(c.get("train_mix", "")):
            try:
                check_sizes(c.vocab_size, t, p)
            except ConfigError as e:
                raise ConfigError(f"config.train_mix item {t}:{p}: {e}") from None
            if t > c.seq_len:
                raise ConfigError(f"config.train_mix item {t}:{p}: T={t} > config.seq_len="
                                  f"{c.seq_len} (shorter sizes are padded up to seq_len)")
        from models.registry import mechanism_kind

        m = c.model
        try:
            mechanism_kind(m.mechanism)
        except ValueError as e:
            raise ConfigError(f"config.model.mechanism={m.mechanism!r}: {e}") from None
        if not (isinstance(m.d_model, int) and m.d_model > 0 and m.d_model % m.num_heads == 0):
            raise ConfigError(
                f"config.model.d_model={m.d_model!r}: must be a positive int divisible by "
                f"config.model.num_heads={m.num_heads}"
            )

    # --- data ------------------------------------------------------------------------
    def _source(self, n: int, stream: int) -> BatchedSource:
        c = self.config
        kw = dict(
            seed=int(c.seed),
            vocab_size=int(c.vocab_size),
            seq_len=int(c.seq_len),
            num_kv_pairs=int(c.num_kv_pairs),
            power_a=float(c.get("power_a", 0.01)),
            stream=stream,
        )
        return BatchedSource(lambda indices: mqar_batch(indices, **kw), n)

    def train_source(self) -> BatchedSource:
        c = self.config
        n = c.train_steps * c.batch_size
        sizes = parse_mix(c.get("train_mix", ""))
        if not sizes:
            return self._source(n, _TRAIN_STREAM)
        kw = dict(sizes=sizes, seq_len=int(c.seq_len), seed=int(c.seed),
                  vocab_size=int(c.vocab_size), power_a=float(c.get("power_a", 0.01)),
                  stream=_TRAIN_STREAM)
        return BatchedSource(lambda indices: mqar_mixture_batch(indices, **kw), n)

    def _max_pairs(self) -> int:
        c = self.config
        return max([int(c.num_kv_pairs)] + [p for _, p in parse_mix(c.get("train_mix", ""))])

    def eval_source(self) -> BatchedSource:
        return self._source(1 << 20, _EVAL_STREAM)

    def tokens_per_example(self) -> int:
        return int(self.config.seq_len)

    # --- loss (the model and its attention images: RecallTask) -------------------
    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        # a row has at most _max_pairs() labelled positions: the head runs on those only
        loss, right, n = recall_loss(model, batch["inputs"], batch["labels"], self._max_pairs())
        return loss, {"accuracy": jnp.sum(right) / n}


    # --- end of run ------------------------------------------------------------------
    def summary_fields(self, model, history: Mapping[str, list]) -> dict[str, Any]:
        curve = [(int(s), float(v)) for s, v in history.get("eval/accuracy", [])]
        if curve:
            acc = curve[-1][1]
        else:  # resumed at the very end: evaluate the held-out set again
            acc = self.held_out_accuracy(model)
        c = self.config
        sizes = state_size(self.model_config(), int(c.seq_len))
        self._curve = curve
        return {
            "accuracy": acc,
            "state_size": sizes[0] if len(set(sizes)) == 1 else sizes,
            "state_size_per_layer": sizes,
            "accuracy_curve": [{"step": s, "accuracy": a} for s, a in curve],
            "mechanism": c.model.mechanism,
            "d_model": int(c.model.d_model),
            "seq_len": int(c.seq_len),
            "num_kv_pairs": int(c.num_kv_pairs),
            "vocab_size": int(c.vocab_size),
        }

    def held_out_accuracy(self, model) -> float:
        c = self.config
        bs = int(c.get("eval_batch_size", 0) or c.batch_size)
        src = self._source(1 << 20, _EVAL_STREAM)
        hits = total = 0
        fwd = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))
        for b in range(int(c.get("eval_batches", 1))):
            batch = src.fn(np.arange(b * bs, (b + 1) * bs))
            pred = np.asarray(fwd(model, jnp.asarray(batch["inputs"])))
            mask = batch["labels"] != IGNORE
            hits += int(np.sum(mask & (pred == batch["labels"])))
            total += int(np.sum(mask))
        return hits / max(total, 1)

    def write_figures(self, workdir: str, model, history) -> list[str]:
        from experiments.plots import plot_curves

        path = os.path.join(workdir, "accuracy.png")
        plot_curves(history, ("train/accuracy", "eval/accuracy"), path, ylabel="MQAR accuracy")
        return [path]
