"""Context parallelism for the runner: split a built model's attention along the sequence.

With `config.mesh.context > 1` the batch's sequence dimension is split over the `context`
mesh axis, and a task model that is a `models.Decoder` gets `context_axis="context"`
automatically (`models.decoder.set_context_parallel`, strategy `config.context_strategy`,
default "ring"): every attention layer then runs split along the sequence. It is set on the
built model, not in `config.model`, so the model config (and the checkpoint's compatibility
check) is the same on every mesh. A Decoder whose mechanism cannot run split raises a
ConfigError; other models (ViT, MLPs) are left as they are (XLA partitions them automatically
around the split batch).
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from experiments.config import ConfigError
from models.decoder import Decoder, set_context_parallel


def with_context_axis(model: nnx.Module, context_axis: str | None, context_size: int,
                      config: ml_collections.ConfigDict) -> nnx.Module:
    """`model` with the sequence split over `context_axis` in its attention.

    Only a `Decoder` that does not name a context axis itself is changed; `context_axis=None`
    (a mesh without a context split) returns `model` as it is. `context_size` (the mesh's
    `context` size) only goes into the error message.
    """
    if context_axis is None or not isinstance(model, Decoder):
        return model
    if model.cfg.context_axis is not None:  # the task chose (e.g. another strategy)
        return model
    strategy = config.get("context_strategy", "ring")
    try:
        return set_context_parallel(model, context_axis, strategy)
    except ValueError as e:
        raise ConfigError(
            f"config.mesh.context={context_size}: the model cannot run "
            f"context-parallel: {e}") from None
