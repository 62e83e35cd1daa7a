"""What the recall tasks (MQAR, retrieval) share: a token Decoder sized by the data, the loss on
labelled positions only, and the attention maps they log.

Recall tasks label a few positions per row (the answers) with everything else ``IGNORE``; the
vocabulary head runs on those positions only (the head over all ``T`` positions costs about
``T / count`` times more at a large vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.tasks.base import Batch, Task, apply_init
from experiments.tasks.model_config import decoder_config
from models.intermediates import capture_intermediates

IGNORE = -100  # label of a position that is not scored


def labelled_positions(labels: jax.Array, count: int) -> jax.Array:
    """int32 ``[B, count]``: the labelled positions of each row in increasing order (rows with
    fewer labels are padded with positions whose label is ``IGNORE``)."""
    t = labels.shape[1]
    key = jnp.where(labels != IGNORE, 0, t) + jnp.arange(t, dtype=jnp.int32)
    return jnp.sort(key, axis=1)[:, :count] % t


def recall_loss(model: nnx.Module, inputs: jax.Array, labels: jax.Array,
                count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(loss, right [B, count], n)``: mean cross-entropy over the labelled positions (plus the
    model's auxiliary losses), which of the ``count`` gathered positions are labelled and
    predicted right, and the number of labelled positions (at least 1)."""
    pos = labelled_positions(labels, count)
    logits = model(inputs, gather=pos).astype(jnp.float32)
    labels = jnp.take_along_axis(labels, pos, axis=1)
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    n = jnp.maximum(jnp.sum(mask), 1)
    loss = jnp.sum(jnp.where(mask, ce, 0.0)) / n
    if hasattr(model, "aux_loss"):
        loss = loss + model.aux_loss()
    return loss, mask & (jnp.argmax(logits, -1) == safe), n


def attention_images(model: nnx.Module, inputs: jax.Array) -> dict[str, jax.Array]:
    """``attention/layer{i}``: the head-averaged attention map of the first example, per layer
    whose core records ``attention_weights``."""
    _, inter = capture_intermediates(model, inputs[:1])
    return {f"attention/layer{i}": jnp.mean(layer["attention_weights"][0], axis=0)
            for i, layer in enumerate(inter["layers"]) if "attention_weights" in layer}


class RecallTask(Task):
    """A task on a ``models.Decoder`` of ``config.vocab_size`` tokens and ``config.seq_len``
    positions that logs its attention maps."""

    def model_config(self):
        c = self.config
        return decoder_config(c.model, vocab_size=int(c.vocab_size), max_len=int(c.seq_len))

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from models import Decoder

        return apply_init(Decoder(self.model_config(), rngs=rngs), rngs,
                          self.config.model.get("init", "models"))

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        return attention_images(model, batch["inputs"])
