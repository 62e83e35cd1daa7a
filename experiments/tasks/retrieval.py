r"""Long-range retrieval on a ``models.Decoder``: passkey / needle-in-a-haystack
(``num_facts = 1``) and multi-query associative recall at long range (``num_facts > 1``).

Data: :mod:`experiments.tasks.retrieval_data` (facts ``k v_1 .. v_L`` at random depths in
filler tokens, a query ``Q k`` per fact at the end; the model must recall the ``L`` value
tokens). Model: ``models.Decoder`` built from ``config.model`` (any registered mechanism:
``softmax``, ``moba``, ``nsa``, ``dsa``, ...; RoPE by default, so KV-cache policies that
re-rotate keys, e.g. StreamingLLM, apply).

Loss: cross-entropy on the labelled positions only (the vocabulary head runs there only), plus
the model's auxiliary losses (DSA's indexer KL). Metrics on the held-out set:
``accuracy`` (labelled tokens whose argmax is right) and ``exact`` (facts whose ``L`` value
tokens are all right). ``summary.json`` adds the training throughput ``train_tokens_per_s``
(median over the logged windows after the first, which holds the compile).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.config import ConfigError
from experiments.data import BatchedSource
from experiments.tasks.base import Batch, Metrics, register
from experiments.tasks.recall import RecallTask, recall_loss
from experiments.tasks.retrieval_data import check_sizes, retrieval_batch

#: Counter streams of the generator: train and held-out use disjoint ones.
TRAIN_STREAM, EVAL_STREAM = 0, 16


@register("retrieval")
class Retrieval(RecallTask):
    """Passkey / long-range multi-query recall on a ``models.Decoder``."""

    headline_metrics = ("accuracy", "exact")

    def validate(self) -> None:
        c = self.config
        check_sizes(c.vocab_size, c.seq_len, c.num_facts, c.value_len)
        from models.registry import mechanism_kind

        try:
            mechanism_kind(c.model.mechanism)
        except ValueError as e:
            raise ConfigError(f"config.model.mechanism={c.model.mechanism!r}: {e}") from None

    # --- data ------------------------------------------------------------------------
    def data_kwargs(self, stream: int) -> dict:
        c = self.config
        return dict(seed=int(c.seed), vocab_size=int(c.vocab_size), seq_len=int(c.seq_len),
                    num_facts=int(c.num_facts), value_len=int(c.value_len), stream=stream)

    def _source(self, n: int, stream: int) -> BatchedSource:
        kw = self.data_kwargs(stream)

        def batch(indices):
            b = retrieval_batch(indices, **kw)
            return {"inputs": b["inputs"], "labels": b["labels"]}

        return BatchedSource(batch, n)

    def train_source(self) -> BatchedSource:
        c = self.config
        return self._source(c.train_steps * c.batch_size, TRAIN_STREAM)

    def eval_source(self) -> BatchedSource:
        return self._source(1 << 20, EVAL_STREAM)

    def eval_examples(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` held-out examples with every field (``source``, ``needle``, ...)."""
        return retrieval_batch(np.arange(n), **self.data_kwargs(EVAL_STREAM))

    def tokens_per_example(self) -> int:
        return int(self.config.seq_len)

    def answers_per_example(self) -> int:
        return int(self.config.num_facts) * int(self.config.value_len)

    # --- loss (the model and its attention images: RecallTask) -------------------
    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        loss, right, n = recall_loss(model, batch["inputs"], batch["labels"],
                                     self.answers_per_example())
        per_fact = right.reshape(right.shape[0], int(self.config.num_facts), -1)
        return loss, {"accuracy": jnp.sum(right) / n,
                      "exact": jnp.mean(jnp.all(per_fact, axis=-1))}


    # --- end of run ------------------------------------------------------------------
    def summary_fields(self, model, history: Mapping[str, list]) -> dict[str, Any]:
        c = self.config
        last = {tag: float(history[f"eval/{tag}"][-1][1]) if history.get(f"eval/{tag}")
                else None for tag in ("accuracy", "exact")}
        perf = [float(v) for _, v in history.get("perf/tokens_per_s", [])]
        return {
            **last,
            "train_tokens_per_s": float(np.median(perf[1:] or perf)) if perf else None,
            "mechanism": c.model.mechanism,
            "seq_len": int(c.seq_len),
            "num_facts": int(c.num_facts),
            "value_len": int(c.value_len),
        }

    def write_figures(self, workdir: str, model, history) -> list[str]:
        from experiments.plots import plot_curves

        path = os.path.join(workdir, "accuracy.png")
        plot_curves(history, ("train/accuracy", "eval/accuracy", "eval/exact"), path,
                    ylabel="retrieval accuracy")
        return [path]
