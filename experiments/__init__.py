"""The experiment runner.

    python -m experiments.run --config configs/NAME.py[:ARG] --workdir DIR [--config.k=v ...]

Modules:
  run         absl entry point (config flags, `jax.distributed.initialize`).
  trainer     the loop: jitted init (parameters created sharded), jitted train step with
              donation, eval, checkpoints, resume, `summary.json`.
  train_state the state pytree and the pure train / eval steps the trainer jits.
  metrics     MetricLogger: metric history (thinned in checkpoints), TensorBoard, console
              (progress bar with the task's headline metrics, a line per eval).
  workdir     a run's directory: lock, `--restart`, atomic JSON, the previous summary.
  tasks       the Task interface (`tasks/base.py`) and registry; one module per task.
  config      validation of the shared keys (`validate_config`), `--config.k=v` parsing.
  sharding    mesh (data, fsdp, context, tensor) and batch placement (specs: models.sharding).
  data        grain pipelines: each host reads its rows of every global batch.
  checkpoint  orbax CheckpointManager + grain iterator state, verified restore/fallback.
  optim       optax optimizers, schedules, clipping, weight-decay masks.
  tb          TensorBoard event writer (scalars, histograms, images) without TensorFlow.
  plots       PNG figures for tasks.
  loading     `experiments.load(workdir) -> (model, config, step)`: a trained run's model.

Adding a task: write `experiments/tasks/<name>.py` with a `@register("<name>")` subclass
of `Task` (build_model, train_source, loss; optionally eval_source, eval_metrics,
eval_images, periodic_metrics, summary_fields, write_figures) and a
`configs/<name>.py` whose `get_config` starts from `configs.common.base_config` (configs sit
above the runner; paper studies that run several configs live in `studies/`, above both).
"""

# Not a module named `load`: `import experiments.load` would rebind this name to the module.
from experiments.loading import load  # noqa: E402

__all__ = ["load"]
