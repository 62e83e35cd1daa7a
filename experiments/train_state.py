"""The train state and the pure train step over it (jitted and sharded by the Trainer).

State (a pytree of global arrays, created sharded by a jitted init):
`{"step", "rng", "params", "opt_state", "rest"}` where `params` are the model's
`nnx.Param`s and `rest` its other variables (RNG counters, statistics), both as pure
dicts (`nnx.to_pure_dict`), PRNG keys stored as raw key data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.tasks.base import Task


def is_key(x: Any) -> bool:
    """Whether `x` is an array of typed PRNG keys."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
    """PRNG keys as raw key data (uint32), so the state is plain arrays (jit, orbax)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def data_to_keys(tree: Any, template: Any) -> Any:
    """Inverse of `keys_to_data`: key data back to keys where `template` holds keys."""
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if is_key(t) else x,
        tree,
        template,
    )


def split_model(model: nnx.Module) -> tuple[Any, dict, dict]:
    """`(graphdef, params, rest)`: the model's `nnx.Param`s and its other variables, both as
    pure dicts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def make_train_step(
    task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
    model_of: Callable[[dict, dict], nnx.Module],
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """The pure train step `(state, batch) -> (new state, float32 metrics)`: the task's loss
    and its gradient at `state`'s parameters, one optimizer update; the step's PRNG key is
    `fold_in(state["rng"], step)`. `model_of(params, rest)` merges the model."""

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

        def loss_fn(params: dict):
            model = model_of(params, state["rest"])
            loss, metrics = task.loss(model, batch, rng)
            _, _, new_rest = split_model(model)
            return loss, (metrics, keys_to_data(new_rest))

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

    return train_step


def make_eval_step(
    task: Task, model_of: Callable[[dict, dict], nnx.Module]
) -> Callable[[dict, dict, dict], dict]:
    """The pure eval step `(params, rest, batch) -> {metric: float32 scalar}` (one batch)."""

    def eval_step(params: dict, rest: dict, batch: dict) -> dict:
        metrics = task.eval_metrics(model_of(params, rest), batch)
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    return eval_step


def make_eval_images(
    task: Task, model_of: Callable[[dict, dict], nnx.Module]
) -> Callable[[dict, dict, dict], dict]:
    """`(params, rest, batch) -> {tag: image}`: the task's eval images of one batch."""

    def images(params: dict, rest: dict, batch: dict) -> dict:
        return task.eval_images(model_of(params, rest), batch)

    return images
