"""The experiment runner.

    python -m experiments.run --config configs/NAME.py[:ARG] --workdir DIR [--config.k=v ...]

Modules:
  run         absl entry point (config flags, `jax.distributed.initialize`).
  trainer     the loop: jitted init (parameters created sharded), jitted train step with
              donation, eval, TensorBoard, checkpoints, resume, `summary.json`.
  tasks       the Task interface (`tasks/base.py`) and registry; one module per task.
  config      the keys every experiment shares (`base_config`) and their validation.
  sharding    mesh (data, fsdp, tensor), logical axis rules -> PartitionSpecs, batches.
  data        grain pipelines: each host reads its rows of every global batch.
  checkpoint  orbax CheckpointManager + grain iterator state, verified restore/fallback.
  optim       optax optimizers, schedules, clipping, weight-decay masks.
  tb          TensorBoard event writer (scalars, histograms, images) without TensorFlow.
  plots       PNG figures for tasks.  testing: helpers for the runner's tests.
  loading     `experiments.load(workdir) -> (model, config, step)`: a trained run's model.

Adding a task: write `experiments/tasks/<name>.py` with a `@register("<name>")` subclass
of `Task` (build_model, train_source, loss; optionally eval_source, eval_metrics,
eval_images, periodic_metrics, summary_fields, write_figures) and a
`configs/<name>.py` whose `get_config` starts from `experiments.config.base_config`.
"""

# Not a module named `load`: `import experiments.load` would rebind this name to the module.
from experiments.loading import load  # noqa: E402

__all__ = ["load"]
