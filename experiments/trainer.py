"""The training loop: sharded jitted steps, eval, logging, checkpoint/resume.

One training step after another (`Trainer._train_steps`), each followed by whatever is due:
a log, an eval, parameter histograms, a checkpoint. Metrics go through one
`experiments.metrics.MetricLogger`; the state pytree and the pure train step are in
`experiments.train_state`, the workdir's lock and files in `experiments.workdir`.

Determinism: data example `i` depends on `(seed, i)`; the step's PRNG key is
`fold_in(key(seed), step)`; the partial window of train metrics is checkpointed. A run
resumed from a checkpoint therefore produces bitwise the same losses on CPU as an
uninterrupted run.

Context parallelism (`config.mesh.context > 1`): see `experiments.context_axis`.

Checkpoints hold global arrays and are restored into the shardings of the current mesh
(`abstract_state`), so a run saved on one mesh shape resumes on another (e.g. saved with
`mesh.context=4`, resumed with `mesh.fsdp=8`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import data as data_lib
from experiments.checkpoint import Checkpointer, Restored, replicated_to_host
from experiments.config import ConfigError, config_to_dict, validate_config
from experiments.context_axis import with_context_axis
from experiments.metrics import MetricLogger, final_metrics, param_histograms
from experiments.metrics import format_metrics as format_metrics  # re-exported for run.py
from experiments.optim import make_optimizer
from experiments.sharding import data_parallel_size, make_global_batch, make_mesh, named
from experiments.tasks import get_task
from experiments.tasks.base import Task
from experiments.train_state import (
    data_to_keys,
    keys_to_data,
    make_eval_images,
    make_eval_step,
    make_train_step,
    split_model,
)
from experiments.workdir import (
    changed_config_keys,
    open_workdir,
    summary_of_step,
    write_json_atomic,
)
from models.sharding import DEFAULT_RULES, axis_rules, partition_specs


class Trainer:
    """Builds everything for one config and runs (or resumes) training.

    Args:
      config: the resolved config (validated here).
      workdir: run directory: TensorBoard events, `config.json`, `summary.json`,
        `checkpoints/`. Locked for the run's lifetime (one live run per workdir).
      restart: move a previous run's files in `workdir` into a timestamped backup folder
        and start from step 0 (instead of resuming).
    """

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
    ) -> None:
        validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.restart = restart
        self.task: Task = get_task(config.task)(config)
        self.task.validate()
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(config.mesh)
        self.rules = tuple(tuple(r) for r in config.get("logical_axis_rules", DEFAULT_RULES))
        dp = data_parallel_size(self.mesh, self.rules)
        if config.batch_size % dp:
            raise ConfigError(
                f"config.batch_size={config.batch_size}: must be divisible by the "
                f"data-parallel size mesh.data * mesh.fsdp = {dp}"
            )
        self.eval_batch_size = config.get("eval_batch_size", 0) or config.batch_size
        if self.eval_batch_size % dp:
            raise ConfigError(
                f"config.eval_batch_size={self.eval_batch_size}: must be divisible by the "
                f"data-parallel size {dp}"
            )
        self.replicated = NamedSharding(self.mesh, P())
        # the mesh axis that splits the sequence inside Decoder models (None: not split)
        self.context_axis = "context" if self.mesh.shape["context"] > 1 else None
        self._build()  # outside jax.set_mesh: nnx.eval_shape would apply logical names raw

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        config, task = self.config, self.task

        def build() -> nnx.Module:
            with nnx.use_eager_sharding(False):
                return self._with_context_axis(task.build_model(nnx.Rngs(config.seed)))

        abstract = nnx.eval_shape(build)
        self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
        self._rest_template = nnx.to_pure_dict(abs_rest)
        # One path (models.sharding) places parameters, optimizer moments (below: each
        # follows its parameter), activations (constraints inside the models) and the batch.
        param_sh = named(self.mesh, nnx.to_pure_dict(partition_specs(abs_params, self.rules,
                                                                      self.mesh)))
        rest_sh = named(self.mesh, nnx.to_pure_dict(partition_specs(abs_rest, self.rules,
                                                                     self.mesh)))
        self.tx, self.schedule = make_optimizer(config)
        abs_params_pure = nnx.to_pure_dict(abs_params)
        abs_opt = jax.eval_shape(self.tx.init, abs_params_pure)
        opt_sh = optax.tree_map_params(
            self.tx,
            lambda _, sh: sh,
            abs_opt,
            param_sh,
            transform_non_params=lambda _: self.replicated,
        )
        self.state_shardings = {
            "step": self.replicated,
            "rng": self.replicated,
            "params": param_sh,
            "opt_state": opt_sh,
            "rest": rest_sh,
        }
        self.param_count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abs_params_pure)))

        tx = self.tx

        def init_state() -> dict:
            model = build()
            _, params, rest = split_model(model)
            key = jax.random.key(config.seed)
            return {
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
                "params": params,
                "opt_state": tx.init(params),
                "rest": keys_to_data(rest),
            }

        self._init = jax.jit(init_state, out_shardings=self.state_shardings)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(init_state),
            self.state_shardings,
        )
        self._build_steps()

    def _build_steps(self) -> None:
        """The jitted functions of a run: train step, eval step, eval images, histograms."""
        task, tx, schedule, graphdef = self.task, self.tx, self.schedule, self.graphdef
        template = self._rest_template

        def model_of(params: dict, rest: dict) -> nnx.Module:
            return nnx.merge(graphdef, params, data_to_keys(rest, template))

        self.model_of = model_of
        self.train_step = jax.jit(
            make_train_step(task, tx, schedule, model_of),
            # the batch keeps make_global_batch's placement (rows over data x fsdp, the
            # sequence over context: one spec per array, by its shape)
            in_shardings=(self.state_shardings, None),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )

        self.eval_step = jax.jit(make_eval_step(task, model_of), out_shardings=self.replicated)
        self.images_fn = jax.jit(make_eval_images(task, model_of), out_shardings=self.replicated)
        self.histograms_fn = jax.jit(param_histograms, out_shardings=self.replicated)

    def _with_context_axis(self, model: nnx.Module) -> nnx.Module:
        """`model` split over this mesh's context axis (`experiments.context_axis`)."""
        return with_context_axis(model, self.context_axis, self.mesh.shape["context"],
                                 self.config)

    # ------------------------------------------------------------------ helpers
    @property
    def total_steps(self) -> int:
        return int(self.config.train_steps)

    def _host(self, tree: Any) -> Any:
        return jax.tree.map(replicated_to_host, tree)

    def model(self, state: dict) -> nnx.Module:
        """The nnx model holding `state`'s parameters."""
        return self.model_of(state["params"], state["rest"])

    def evaluate(self, state: dict, batches: list[dict]) -> dict[str, float]:
        """Mean of the task's eval metrics over the fixed eval batches."""
        if not batches:
            return {}
        per_batch = [self.eval_step(state["params"], state["rest"], b) for b in batches]
        host = self._host(per_batch)
        return {k: float(np.mean([m[k] for m in host])) for k in host[0]}

    def _warn(self, msg: str) -> None:
        if self.is_main:
            print(f"[jattn] WARNING: {msg}", file=sys.stderr, flush=True)

    def _due(self, step: int, every: int) -> bool:
        """Whether a periodic action (log, eval, checkpoint) runs after `step`: every
        `every` steps (0: never) and after the last step."""
        return step == self.total_steps or (every > 0 and step % every == 0)

    # ------------------------------------------------------------------ data
    def _new_data_iterator(self, steps: int) -> Any:
        """A fresh iterator over max(train_steps, `steps`) batches (a checkpoint past
        train_steps must still fit); batch `s` is the same whatever the length."""
        config = self.config
        return data_lib.train_iterator(
            self.task.train_source(),
            global_batch=config.batch_size,
            num_steps=max(self.total_steps, steps),
            rows=data_lib.rows_for_process(self.mesh, config.batch_size),
            threads=int(config.get("data_threads", 2)),
        )

    def _next_batch(self, data_it: Any, step: int) -> dict:
        """The global batch of `step` from this process's rows."""
        try:
            local = next(data_it)
        except StopIteration:
            raise RuntimeError(
                f"the data iterator ended before step {step} of {self.total_steps} (its state: "
                f"{data_it.get_state()}); the checkpoint's data position does not fit "
                "this run"
            ) from None
        return make_global_batch(local, self.mesh, self.config.batch_size, self.rules)

    def _eval_batches(self) -> list[dict]:
        """The fixed eval batches (`config.eval_batches` of them), as global arrays."""
        config = self.config
        eval_source = self.task.eval_source()
        if eval_source is None or config.get("eval_batches", 0) <= 0:
            return []
        local = data_lib.eval_batches(
            eval_source,
            global_batch=self.eval_batch_size,
            num_batches=int(config.eval_batches),
            rows=data_lib.rows_for_process(self.mesh, self.eval_batch_size),
        )
        return [make_global_batch(b, self.mesh, self.eval_batch_size, self.rules) for b in local]

    # ------------------------------------------------------------------ workdir
    def run(self) -> dict[str, Any]:
        """Trains to `config.train_steps` (resuming if possible); returns the summary."""
        lock = open_workdir(self.workdir, restart=self.restart)
        try:
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ main loop
    def _run(self) -> dict[str, Any]:
        ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            keep=self.config.keep_checkpoints,
            async_save=bool(self.config.get("async_checkpointing", True)),
        )
        try:
            return self._train(ckpt)
        except BaseException:  # e.g. a full disk: leave no half-written checkpoint behind
            ckpt.discard_partial()
            raise

    def _train(self, ckpt: Checkpointer) -> dict[str, Any]:
        """Restores (or initializes), trains the remaining steps, writes the summary."""
        t_start = time.time()
        config_dict = config_to_dict(self.config)
        # a different model is an incompatibility, not corruption: stop before touching files
        ckpt.check_compatible(self.abstract_state, config_dict)
        restored = ckpt.restore_latest(self.abstract_state, self._new_data_iterator,
                                       report=self._warn)
        if restored is not None and restored.step >= self.total_steps:
            done = self._summary_of_finished_run(restored.step)
            if done is not None:
                ckpt.close()
                self.final_state = restored.state
                return done
        if self.is_main:
            write_json_atomic(os.path.join(self.workdir, "config.json"), config_dict)
        logger = self._metric_logger()
        if restored is not None:
            state, start, data_it = self._resume(restored, ckpt.directory, logger, config_dict)
        else:  # nothing (usable) to resume: fresh state and fresh data from example 0
            state, start, data_it = self._init(), 0, self._new_data_iterator(self.total_steps)
            self._print_run_header()
        eval_batches = self._eval_batches()
        if start == 0 and self.config.get("eval_at_start", False):  # step 0 of eval curves
            self._evaluate_and_log(state, 0, eval_batches, logger)

        t_loop = time.perf_counter()
        state, last_eval = self._train_steps(state, start, data_it, eval_batches, ckpt, logger,
                                             config_dict)
        if last_eval is None:  # resumed at the very end: evaluate the final state again
            last_eval = self._eval_metrics(state, max(self.total_steps, start), eval_batches)
        ckpt.close()
        summary = {
            "final": final_metrics(logger.last_train, last_eval),
            "step": max(self.total_steps, start),
            "wall_time_s": time.time() - t_start,
            "loop_time_s": time.perf_counter() - t_loop,  # incl. eval and checkpoint writes
            "resumed_from": start if restored is not None else None,
            "param_count": self.param_count,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "mesh": dict(self.mesh.shape),
            "config": config_dict,
        }
        return self._finish(summary, state, logger)

    def _train_steps(
        self,
        state: dict,
        start: int,
        data_it: Any,
        eval_batches: list[dict],
        ckpt: Checkpointer,
        logger: MetricLogger,
        config_dict: dict[str, Any],
    ) -> tuple[dict, dict[str, float] | None]:
        """Steps `start + 1 .. train_steps`, each followed by the log, eval, histograms and
        checkpoint that are due. Returns the final state and the last eval (None if none)."""
        config = self.config
        histogram_every = int(config.get("histogram_every", 0)) or int(config.eval_every)
        last_eval = None
        logger.begin_steps(start)
        for step in range(start + 1, self.total_steps + 1):
            state, metrics = self.train_step(state, self._next_batch(data_it, step))
            logger.train_step(metrics)
            if self._due(step, config.log_every):
                logger.log_train(step)
            with logger.side_work():
                if self._due(step, config.eval_every):
                    last_eval = self._evaluate_and_log(state, step, eval_batches, logger)
                if self._due(step, histogram_every):  # on every process, written by process 0
                    logger.histograms(self._host(self.histograms_fn(state["params"])), step)
                if self._due(step, config.checkpoint_every):
                    ckpt.save(step, state, data_it, {**logger.checkpoint_meta(),
                                                     "config": config_dict})
                    logger.flush()
            logger.advance()
        logger.end_steps()
        return state, last_eval

    # ------------------------------------------------------------------ loop parts
    def _metric_logger(self) -> MetricLogger:
        config = self.config
        return MetricLogger(
            self.workdir,
            enabled=self.is_main,
            progress_bar=bool(config.get("progress_bar", True)),
            total_steps=self.total_steps,
            description=config.task,
            headline=self.task.headline_metrics,
            tokens_per_step=config.batch_size * self.task.tokens_per_example(),
        )

    def _resume(
        self, restored: Restored, directory: str, logger: MetricLogger, config_dict: dict
    ) -> tuple[dict, int, Any]:
        """Continues from a verified checkpoint: (state, step, data iterator)."""
        changed = changed_config_keys(restored.meta.get("config", {}), config_dict)
        if changed:
            shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
            self._warn(f"the config differs from the checkpoint's ({shown}); resuming anyway")
        logger.restore(restored.meta, restored.step)
        if self.is_main:
            print(f"[jattn] resumed from step {restored.step} ({directory})", file=sys.stderr)
        return restored.state, restored.step, restored.data_iterator

    def _print_run_header(self) -> None:
        if self.is_main:
            print(f"[jattn] task={self.config.task} params={self.param_count:,} "
                  f"devices={jax.device_count()} mesh={dict(self.mesh.shape)} "
                  f"processes={jax.process_count()}", file=sys.stderr)

    def _eval_metrics(self, state: dict, step: int, batches: list[dict]) -> dict[str, float]:
        """The eval metrics on the fixed batches plus the task's periodic (host) metrics."""
        metrics = self.evaluate(state, batches)
        metrics.update(self.task.periodic_metrics(self.model(state), step))
        return metrics

    def _evaluate_and_log(
        self, state: dict, step: int, batches: list[dict], logger: MetricLogger
    ) -> dict[str, float]:
        """Eval metrics (logged) and the task's images of the first eval batch."""
        metrics = self._eval_metrics(state, step, batches)
        logger.log_eval(step, metrics)
        if batches:
            logger.images(self._host(self.images_fn(state["params"], state["rest"], batches[0])),
                          step)
        return metrics

    # ------------------------------------------------------------------ end of run
    def _summary_of_finished_run(self, step: int) -> dict[str, Any] | None:
        """For a checkpoint at or past train_steps: says so; `summary.json` if it is the
        summary of the run ended at `step` (else None: summarize that checkpoint again)."""
        if self.is_main:
            print(f"[jattn] the workdir's latest checkpoint is step {step} >= "
                  f"config.train_steps={self.total_steps}: the run is done, nothing to train "
                  "(raise train_steps to continue it)", file=sys.stderr, flush=True)
        return summary_of_step(self.workdir, step)

    def _finish(self, summary: dict[str, Any], state: dict, logger: MetricLogger) -> dict:
        """Adds the task's summary fields; writes figures and `summary.json` (process 0)."""
        model = self.model(state)
        summary.update(self.task.summary_fields(model, logger.history))
        if self.is_main:
            figures = self.task.write_figures(self.workdir, model, logger.history)
            if figures:
                summary["figures"] = [os.path.relpath(f, self.workdir) for f in figures]
            write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)
        logger.close()
        self.final_state = state
        return summary


def train(
    config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
) -> dict[str, Any]:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the summary dict.

    `restart=True` moves a previous run in `workdir` aside (see `Trainer`) and starts over.
    """
    return Trainer(config, workdir, restart=restart).run()
