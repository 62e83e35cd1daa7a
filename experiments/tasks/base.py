"""The one interface through which tasks plug into the runner.

A task is a subclass of :class:`Task` registered under a name:

    @register("my_task")
    class MyTask(Task):
        def build_model(self, rngs): ...           # an nnx.Module
        def train_source(self): ...                # grain.MapDataset of examples
        def loss(self, model, batch, rng): ...     # (scalar loss, {metric: scalar})

and selected by `config.task = "my_task"`. If the name is not registered yet,
:func:`get_task` imports `experiments.tasks.<name>` (so a new task is one new module).

Data: `train_source()` returns a `grain.MapDataset` whose element `i` is a dict of numpy
arrays (one example, no batch dim). Synthetic tasks compute example `i` from
`(config.seed, i)` only, e.g. `np.random.default_rng((seed, i))`, which makes data
deterministic, shardable over hosts and resumable. The runner repeats a short source,
shards it over hosts and batches it; the batch a loss sees is a dict of arrays
`[batch_size, ...]` sharded over the (data, fsdp) mesh axes.

Everything else is optional: eval metrics (default: the loss and its metrics on
`eval_source()`), attention-map images for TensorBoard, periodic host-side metrics,
extra summary fields and PNG figures written at the end.

Hooks that take a model run on every process (they may call jitted, sharded code);
hooks that write files (`write_figures`) run on process 0 only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
from flax import nnx

from experiments.config import ConfigError
from experiments.data import BatchedSource

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


INITS = ("models", "pytorch")


def apply_init(model: nnx.Module, rngs: nnx.Rngs, init: str) -> nnx.Module:
    """``config.model.init``: ``"models"`` keeps the model's own initializers; ``"pytorch"``
    re-initializes with PyTorch's defaults (:func:`models.layers.pytorch_default_init`), the
    state papers with PyTorch code start from. Returns the model."""
    if init == "pytorch":
        from models.layers import pytorch_default_init

        pytorch_default_init(model, rngs)
    elif init != "models":
        raise ConfigError(f"config.model.init={init!r}: must be one of {INITS}")
    return model


class Task:
    """Base class of experiment tasks. Subclasses override the methods they need.

    Attributes:
      config: the full resolved experiment config.
    """

    #: Set by :func:`register`.
    name: str = ""

    #: Eval metric names (keys of `eval_metrics` or `periodic_metrics`) that say how the run
    #: goes at a glance: shown beside the loss in the progress bar. Default: none.
    headline_metrics: tuple[str, ...] = ()

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config

    # --- config ----------------------------------------------------------------------
    def validate(self) -> None:
        """Checks task-specific config keys; raise ConfigError naming the key."""

    # --- model -----------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """Builds the model. Called under `jax.jit` (and `nnx.eval_shape`) on the mesh.

        Parameters may carry logical axis names (`nnx.with_partitioning(init, ("embed",
        "mlp"))`); the runner maps them to mesh axes with `config.logical_axis_rules`.
        """
        raise NotImplementedError

    # --- data ------------------------------------------------------------------------
    def train_source(self) -> grain.MapDataset | BatchedSource:
        """Training examples: element `i` is a dict of numpy arrays, a function of (seed, i).

        Return a `grain.MapDataset` (one Python call per example), or for cheap synthetic
        data an `experiments.data.BatchedSource` (one vectorized call per batch; see
        `experiments.data.counter_normal`).
        """
        raise NotImplementedError

    def eval_source(self) -> grain.MapDataset | BatchedSource | None:
        """Held-out examples (a fixed set; the runner takes the first `eval_batches` batches).

        Default: None (no eval metrics beyond the periodic ones).
        """
        return None

    def tokens_per_example(self) -> int:
        """Tokens (or items) per example, for the tokens/s throughput figure."""
        return 1

    # --- training --------------------------------------------------------------------
    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """Scalar training loss and extra scalar metrics (e.g. accuracy). Traced under jit.

        Args:
          model: the model (merged from the current parameters).
          batch: dict of global arrays `[batch_size, ...]`.
          rng: a PRNG key for this step (fold_in of the run's key and the step).
        """
        raise NotImplementedError

    # --- evaluation ------------------------------------------------------------------
    def eval_metrics(self, model: nnx.Module, batch: Batch) -> Metrics:
        """Scalar metrics on one eval batch (averaged over batches). Traced under jit.

        Default: the training loss and its metrics, with a fixed rng.
        """
        loss, metrics = self.loss(model, batch, jax.random.key(0))
        return {"loss": loss, **metrics}

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Images for TensorBoard at eval, e.g. attention maps. Traced under jit.

        Return `{tag: [H, W]}` (a colormapped heat map) or `{tag: [H, W, 3]}` in [0, 1].
        Computed on the first eval batch. Default: none.
        """
        del model, batch
        return {}

    def periodic_metrics(self, model: nnx.Module, step: int) -> dict[str, float]:
        """Extra host-side scalars at each eval (e.g. probes of the weights). Default: none."""
        del model, step
        return {}

    # --- end of run ------------------------------------------------------------------
    def summary_fields(
        self, model: nnx.Module, history: Mapping[str, list[tuple[int, float]]]
    ) -> dict[str, Any]:
        """Extra JSON-serializable fields for `summary.json` (beside `final`, `step`, ...).

        Args:
          history: every logged scalar, `{tag: [(step, value), ...]}`; in a resumed run the
            curves before the resume come from the checkpoint, thinned to at most
            `experiments.metrics.HISTORY_POINTS_KEPT` points each.
        """
        del model, history
        return {}

    def write_figures(
        self,
        workdir: str,
        model: nnx.Module,
        history: Mapping[str, list[tuple[int, float]]],
    ) -> list[str]:
        """Writes PNG figures into `workdir` (process 0 only); returns their paths."""
        del workdir, model, history
        return []


TASKS: dict[str, type[Task]] = {}


def register(name: str):
    """Class decorator registering a Task subclass under `name`."""

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register({name!r}) expects a Task subclass, got {cls!r}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type[Task]:
    """The Task class registered as `name`, importing `experiments.tasks.<name>` if needed."""
    if name not in TASKS:
        try:
            importlib.import_module(f"experiments.tasks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"experiments.tasks.{name}":
                raise
    if name not in TASKS:
        raise ConfigError(
            f"config.task={name!r}: unknown task; registered: {sorted(TASKS)} (a task "
            f"module experiments/tasks/{name}.py registering it would be imported)"
        )
    return TASKS[name]
