"""The training loop: sharded jitted steps, eval, logging, checkpoint/resume.

State (a pytree of global arrays, created sharded by a jitted init):
`{"step", "rng", "params", "opt_state", "rest"}` where `params` are the model's
`nnx.Param`s and `rest` its other variables (RNG counters, statistics), both as pure
dicts (`nnx.to_pure_dict`), PRNG keys stored as raw key data.

Determinism: data example `i` depends on `(seed, i)`; the step's PRNG key is
`fold_in(key(seed), step)`; the partial window of train metrics is checkpointed. A run
resumed from a checkpoint therefore produces bitwise the same losses on CPU as an
uninterrupted run.

Context parallelism: with `config.mesh.context > 1` the batch's sequence dimension is split
over the `context` mesh axis, and a task model that is a `models.Decoder` gets
`context_axis="context"` automatically (`models.decoder.set_context_parallel`, strategy
`config.context_strategy`, default "ring"): every attention layer then runs split along the
sequence. It is set on the built model, not in `config.model`, so the model config (and the
checkpoint's compatibility check) is the same on every mesh. A Decoder whose mechanism cannot
run split raises a ConfigError; other models (ViT, MLPs) are left as they are (XLA partitions
them automatically around the split batch).

Checkpoints hold global arrays and are restored into the shardings of the current mesh
(`abstract_state`), so a run saved on one mesh shape resumes on another (e.g. saved with
`mesh.context=4`, resumed with `mesh.fsdp=8`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
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
from experiments.checkpoint import (
    Checkpointer,
    WorkdirLock,
    WorkdirUnusable,
    move_run_aside,
    replicated_to_host,
)
from experiments.config import ConfigError, config_to_dict, validate_config
from experiments.optim import make_optimizer, path_str
from experiments.sharding import data_parallel_size, make_global_batch, make_mesh, named
from experiments.tasks import get_task
from experiments.tasks.base import Task
from experiments.tb import SummaryWriter, upscale
from models.decoder import Decoder, set_context_parallel
from models.sharding import DEFAULT_RULES, axis_rules, partition_specs

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 30


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to `path` via a temporary file and `os.replace` (never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: no half-written temporary file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``k=v, ...`` with 4 significant digits (the runner's log lines)."""
    return ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())


# Points per curve that a checkpoint keeps of the scalar history (a run logging every step
# for 1M steps would otherwise write tens of MB of JSON at every checkpoint).
HISTORY_POINTS_KEPT = 2000


def thin_curve(points: list, max_points: int) -> list:
    """At most `max_points` of `points`, evenly spaced, the first and the last kept."""
    if len(points) <= max_points:
        return list(points)
    keep = np.unique(np.linspace(0, len(points) - 1, max_points).round().astype(int))
    return [points[i] for i in keep]


def changed_config_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each (dotted) key whose value differs between two config dicts
    (both as `config_to_dict` makes them: plain JSON values)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{c}" for c in changed_config_keys(a, b)]
        elif a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    return str(x)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree: Any, template: Any) -> Any:
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        tree,
        template,
    )


def _split(model: nnx.Module) -> tuple[Any, dict, dict]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


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

        tx, schedule, graphdef = self.tx, self.schedule, self.graphdef
        template = self._rest_template

        def init_state() -> dict:
            model = build()
            _, params, rest = _split(model)
            key = jax.random.key(config.seed)
            return {
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
                "params": params,
                "opt_state": tx.init(params),
                "rest": _keys_to_data(rest),
            }

        self._init = jax.jit(init_state, out_shardings=self.state_shardings)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(init_state),
            self.state_shardings,
        )

        def model_of(params: dict, rest: dict) -> nnx.Module:
            return nnx.merge(graphdef, params, _data_to_keys(rest, template))

        self.model_of = model_of

        def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
            step = state["step"]
            rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

            def loss_fn(params: dict):
                model = model_of(params, state["rest"])
                loss, metrics = task.loss(model, batch, rng)
                _, _, new_rest = _split(model)
                return loss, (metrics, _keys_to_data(new_rest))

            (loss, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"]
            )
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new_state = {
                "step": step + 1,
                "rng": state["rng"],
                "params": params,
                "opt_state": opt_state,
                "rest": rest,
            }
            out = {
                "loss": loss,
                **metrics,
                "grad_norm": optax.tree.norm(grads),
                "learning_rate": jnp.asarray(schedule(step), jnp.float32),
            }
            return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)

        self.train_step = jax.jit(
            train_step,
            # the batch keeps make_global_batch's placement (rows over data x fsdp, the
            # sequence over context: one spec per array, by its shape)
            in_shardings=(self.state_shardings, None),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )

        def eval_step(params: dict, rest: dict, batch: dict) -> dict:
            metrics = task.eval_metrics(model_of(params, rest), batch)
            return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

        self.eval_step = jax.jit(eval_step, out_shardings=self.replicated)

        def images(params: dict, rest: dict, batch: dict) -> dict:
            return task.eval_images(model_of(params, rest), batch)

        self.images_fn = jax.jit(images, out_shardings=self.replicated)

        def histograms(params: dict) -> dict:
            out = {}
            for path, x in jax.tree.leaves_with_path(params):
                if x.size < 2:
                    continue
                x = x.astype(jnp.float32).reshape(-1)
                lo, hi = x.min(), x.max()
                width = jnp.maximum(hi - lo, 1e-12) / HISTOGRAM_BINS
                idx = jnp.clip(((x - lo) / width).astype(jnp.int32), 0, HISTOGRAM_BINS - 1)
                counts = jnp.zeros((HISTOGRAM_BINS,), jnp.float32).at[idx].add(1.0)
                out[path_str(path)] = {
                    "counts": counts,
                    "edges": lo + width * jnp.arange(HISTOGRAM_BINS + 1, dtype=jnp.float32),
                    "stats": jnp.stack([lo, hi, x.sum(), jnp.sum(x * x)]),
                }
            return out

        self.histograms_fn = jax.jit(histograms, out_shardings=self.replicated)

    def _with_context_axis(self, model: nnx.Module) -> nnx.Module:
        """`model` with the sequence split over `context` in its attention (a Decoder on a
        mesh with context > 1 that does not name a context axis itself); see the module
        docstring."""
        if self.context_axis is None or not isinstance(model, Decoder):
            return model
        if model.cfg.context_axis is not None:  # the task chose (e.g. another strategy)
            return model
        strategy = self.config.get("context_strategy", "ring")
        try:
            return set_context_parallel(model, self.context_axis, strategy)
        except ValueError as e:
            raise ConfigError(
                f"config.mesh.context={self.mesh.shape['context']}: the model cannot run "
                f"context-parallel: {e}") from None

    # ------------------------------------------------------------------ helpers
    def _host(self, tree: Any) -> Any:
        return jax.tree.map(replicated_to_host, tree)

    def _host_metrics(self, metrics: list[dict]) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in m.items()} for m in self._host(metrics)]

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

    # ------------------------------------------------------------------ main loop
    def _existing_summary(self, step: int) -> dict[str, Any] | None:
        """`summary.json` if it is the summary of the run ended at `step` (else None)."""
        path = os.path.join(self.workdir, "summary.json")
        try:
            with open(path) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) and summary.get("step") == step else None

    def run(self) -> dict[str, Any]:
        """Trains to `config.train_steps` (resuming if possible); returns the summary."""
        lock = self._open_workdir()
        try:
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _open_workdir(self) -> WorkdirLock | None:
        """Creates and locks the workdir (process 0), and moves an old run aside on restart.

        Raises WorkdirBusy (another live run holds it) or WorkdirUnusable, on every process.
        """
        lock, error = None, None
        if self.is_main:
            try:
                os.makedirs(self.workdir, exist_ok=True)
                lock = WorkdirLock(self.workdir)
                lock.acquire()
                if self.restart:
                    backup = move_run_aside(self.workdir)
                    if backup:
                        print(f"[jattn] --restart: moved the previous run's files to {backup}",
                              file=sys.stderr, flush=True)
            except OSError as e:
                error = WorkdirUnusable(f"cannot create or write the workdir {self.workdir}: {e}")
            except Exception as e:  # noqa: BLE001 - WorkdirBusy: raised below, on all processes
                error = e
            if error is not None and lock is not None:
                lock.release()
        if jax.process_count() > 1:  # the others wait for process 0's verdict
            from jax.experimental import multihost_utils

            ok = multihost_utils.process_allgather(np.int32(error is None))
            if error is None and not np.all(ok):
                error = WorkdirUnusable(f"process 0 could not open the workdir {self.workdir}")
            if error is None and not self.is_main:  # a no-op on a shared file system
                try:
                    os.makedirs(self.workdir, exist_ok=True)
                except OSError as e:
                    error = WorkdirUnusable(f"cannot create the workdir {self.workdir}: {e}")
        if error is not None:
            raise error
        return lock

    def _run(self) -> dict[str, Any]:
        config, task = self.config, self.task
        t_start = time.time()
        total = int(config.train_steps)
        config_dict = config_to_dict(config)
        history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        rows = data_lib.rows_for_process(self.mesh, config.batch_size)

        def new_data_iterator(steps: int) -> Any:
            """A fresh iterator over max(train_steps, `steps`) batches (a checkpoint past
            train_steps must still fit); batch `s` is the same whatever the length."""
            return data_lib.train_iterator(
                task.train_source(),
                global_batch=config.batch_size,
                num_steps=max(total, steps),
                rows=rows,
                threads=int(config.get("data_threads", 2)),
            )

        ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            keep=config.keep_checkpoints,
            async_save=bool(config.get("async_checkpointing", True)),
        )
        try:
            return self._train(ckpt, config_dict, history, new_data_iterator, t_start)
        except BaseException:  # e.g. a full disk: leave no half-written checkpoint behind
            ckpt.discard_partial()
            raise

    def _train(
        self,
        ckpt: Checkpointer,
        config_dict: dict[str, Any],
        history: dict[str, list[tuple[int, float]]],
        new_data_iterator: Callable[[int], Any],
        t_start: float,
    ) -> dict[str, Any]:
        config, task = self.config, self.task
        total = int(config.train_steps)

        def report(msg: str) -> None:
            if self.is_main:
                print(f"[jattn] WARNING: {msg}", file=sys.stderr, flush=True)

        # a different model is an incompatibility, not corruption: stop before touching files
        ckpt.check_compatible(self.abstract_state, config_dict)
        restored = ckpt.restore_latest(self.abstract_state, new_data_iterator, report=report)
        if restored is not None and restored.step >= total:
            if self.is_main:
                print(f"[jattn] the workdir's latest checkpoint is step {restored.step} >= "
                      f"config.train_steps={total}: the run is done, nothing to train (raise "
                      "train_steps to continue it)", file=sys.stderr, flush=True)
            done = self._existing_summary(restored.step)
            if done is not None:
                ckpt.close()
                self.final_state = restored.state
                return done
        if self.is_main:
            write_json_atomic(os.path.join(self.workdir, "config.json"), config_dict)
        writer = SummaryWriter(self.workdir, enabled=self.is_main)

        def log_scalars(values: Mapping[str, float], step: int, prefix: str) -> None:
            writer.scalars(values, step, prefix=prefix)
            for k, v in values.items():
                history[prefix + k].append((step, float(v)))

        window: list[dict[str, float]] = []  # host metrics of steps since the last log
        last_train: dict[str, float] = {}
        if restored is not None:
            state = restored.state
            start = restored.step
            data_it = restored.data_iterator
            window = [dict(m) for m in restored.meta.get("window", [])]
            # the curves so far, so a resumed run's summary and figures cover the whole run
            for tag, points in restored.meta.get("history", {}).items():
                history[tag] = [(int(s), float(v)) for s, v in points if int(s) <= start]
            last_train = dict(restored.meta.get("last_train", {}))
            changed = changed_config_keys(restored.meta.get("config", {}), config_dict)
            if changed:
                shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
                report(f"the config differs from the checkpoint's ({shown}); resuming anyway")
            writer.restart(start + 1)
            if self.is_main:
                print(f"[jattn] resumed from step {start} ({ckpt.directory})", file=sys.stderr)
        else:  # nothing (usable) to resume: fresh state and fresh data from example 0
            state = self._init()
            start = 0
            data_it = new_data_iterator(total)
        if self.is_main and start == 0:
            print(
                f"[jattn] task={config.task} params={self.param_count:,} "
                f"devices={jax.device_count()} mesh={dict(self.mesh.shape)} "
                f"processes={jax.process_count()}",
                file=sys.stderr,
            )

        eval_rows = data_lib.rows_for_process(self.mesh, self.eval_batch_size)
        eval_source = task.eval_source()
        eval_batches: list[dict] = []
        if eval_source is not None and config.get("eval_batches", 0) > 0:
            for b in data_lib.eval_batches(
                eval_source,
                global_batch=self.eval_batch_size,
                num_batches=int(config.eval_batches),
                rows=eval_rows,
            ):
                eval_batches.append(
                    make_global_batch(b, self.mesh, self.eval_batch_size, self.rules))

        tokens_per_step = config.batch_size * task.tokens_per_example()
        hist_every = int(config.get("histogram_every", 0)) or int(config.eval_every)
        last_eval: dict[str, float] | None = None

        def run_eval(state: dict, step: int) -> dict[str, float]:
            metrics = self.evaluate(state, eval_batches)
            metrics.update(task.periodic_metrics(self.model(state), step))
            log_scalars(metrics, step, "eval/")
            if self.is_main and not config.get("progress_bar", True):  # headless: a log line
                print(f"[jattn] step {step} eval: {format_metrics(metrics)}", file=sys.stderr,
                      flush=True)
            if eval_batches:
                imgs = self._host(self.images_fn(state["params"], state["rest"], eval_batches[0]))
                for tag, img in imgs.items():
                    writer.image(f"images/{tag}", upscale(np.asarray(img, np.float32)), step)
            return metrics

        def due(step: int, every: int) -> bool:
            return step == total or (every > 0 and step % every == 0)

        if start == 0 and config.get("eval_at_start", False):  # step-0 point of eval curves
            run_eval(state, 0)

        pbar = None
        if self.is_main and config.get("progress_bar", True):
            from tqdm import tqdm

            pbar = tqdm(
                total=total,
                initial=start,
                desc=config.task,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

        pending: list[dict] = []  # device metrics since the last log
        t_window = time.perf_counter()
        steps_in_window = 0
        side_time = 0.0
        t_loop = time.perf_counter()
        for step in range(start + 1, total + 1):
            try:
                local = next(data_it)
            except StopIteration:
                raise RuntimeError(
                    f"the data iterator ended before step {step} of {total} (its state: "
                    f"{data_it.get_state()}); the checkpoint's data position does not fit "
                    "this run"
                ) from None
            batch = make_global_batch(local, self.mesh, config.batch_size, self.rules)
            state, metrics = self.train_step(state, batch)
            pending.append(metrics)
            steps_in_window += 1
            if due(step, config.log_every):
                window.extend(self._host_metrics(pending))
                pending = []
                elapsed = time.perf_counter() - t_window - side_time
                last_train = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                last_train["learning_rate"] = window[-1]["learning_rate"]
                window = []
                perf = {
                    "step_time_s": elapsed / steps_in_window,
                    "tokens_per_s": tokens_per_step * steps_in_window / elapsed,
                }
                log_scalars(last_train, step, "train/")
                log_scalars(perf, step, "perf/")
                if pbar is not None:
                    pbar.set_postfix(loss=f"{last_train['loss']:.4g}", refresh=False)
                elif self.is_main:  # no progress bar (batch jobs, logs to a file): a line
                    print(f"[jattn] step {step}: {format_metrics(last_train)}, "
                          f"step_time_s={perf['step_time_s']:.4g}", file=sys.stderr, flush=True)
                t_window = time.perf_counter()
                steps_in_window = 0
                side_time = 0.0
            t_side = time.perf_counter()
            if due(step, config.eval_every):
                last_eval = run_eval(state, step)
            if due(step, hist_every):  # computed on every process, written by process 0
                hists = self._host(self.histograms_fn(state["params"]))
                for name, h in hists.items():
                    vmin, vmax, tot, tot_sq = (float(v) for v in h["stats"])
                    writer.histogram(
                        f"params/{name}",
                        h["counts"],
                        h["edges"],
                        step,
                        vmin=vmin,
                        vmax=vmax,
                        total=tot,
                        total_sq=tot_sq,
                    )
            if due(step, config.checkpoint_every):
                window.extend(self._host_metrics(pending))
                pending = []
                meta = {"window": window, "last_train": last_train, "config": config_dict,
                        "history": {k: [list(p) for p in thin_curve(v, HISTORY_POINTS_KEPT)]
                                    for k, v in history.items()}}
                ckpt.save(step, state, data_it, meta)
                writer.flush()
            side_time += time.perf_counter() - t_side  # eval/checkpoint time: not a step's
            if pbar is not None:
                pbar.update(1)
        if pbar is not None:
            pbar.close()

        if last_eval is None:  # resumed at the very end: evaluate the final state again
            last_eval = self.evaluate(state, eval_batches)
            last_eval.update(task.periodic_metrics(self.model(state), max(total, start)))
        ckpt.close()
        loop_time = time.perf_counter() - t_loop

        final: dict[str, float] = {"train_loss": last_train.get("loss", float("nan"))}
        final.update({f"train_{k}": v for k, v in last_train.items() if k != "loss"})
        final.update({f"eval_{k}": v for k, v in last_eval.items()})
        model = self.model(state)
        summary: dict[str, Any] = {
            "final": final,
            "step": max(total, start),
            "wall_time_s": time.time() - t_start,
            "loop_time_s": loop_time,  # the training loop incl. eval and checkpoint writes
            "resumed_from": start if restored is not None else None,
            "param_count": self.param_count,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "mesh": dict(self.mesh.shape),
            "config": config_dict,
        }
        summary.update(task.summary_fields(model, history))
        if self.is_main:
            figures = task.write_figures(self.workdir, model, history)
            if figures:
                summary["figures"] = [os.path.relpath(f, self.workdir) for f in figures]
            write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)
        writer.close()
        self.final_state = state
        return summary


def train(
    config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
) -> dict[str, Any]:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the summary dict.

    `restart=True` moves a previous run in `workdir` aside (see `Trainer`) and starts over.
    """
    return Trainer(config, workdir, restart=restart).run()
