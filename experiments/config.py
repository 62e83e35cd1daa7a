"""Validation of the shared experiment keys, and the command-line override syntax.

Config files live in `configs/` (above the runner: they import nothing from `experiments`).
Each defines `get_config(arg: str | None) -> ConfigDict`, starting from
`configs.common.base_config` (the keys every task has) and adding the task's own keys, the
model's under `config.model`. The runner validates the config it is given:
:func:`validate_config` rejects bad values with a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# The mesh axes are those of models.sharding, the one module that resolves logical axes to
# mesh placements (its docstring has the table; configs.common takes its default rules).
from models.sharding import MESH_AXES

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant", "linear")


class ConfigError(ValueError):
    """A config key has a bad value (the message names the key)."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _require(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config.{key}={value!r}: {msg}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the shared keys; raises ConfigError naming the first bad key.

    Task-specific keys are checked by the task itself (`Task.validate`).
    """
    missing = [
        k
        for k in (
            "task",
            "seed",
            "train_steps",
            "batch_size",
            "learning_rate",
            "optimizer",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "eval_every",
            "mesh",
        )
        if k not in config
    ]
    if missing:
        raise ConfigError(f"config is missing required keys: {', '.join(missing)}")
    _require(
        isinstance(config.task, str) and bool(config.task),
        "task",
        "must name a registered task",
        config.task,
    )
    _require(_is_int(config.seed) and config.seed >= 0, "seed", "must be an int >= 0", config.seed)
    for key in ("train_steps", "batch_size", "log_every", "keep_checkpoints"):
        _require(_is_int(config[key]) and config[key] > 0, key, "must be an int > 0", config[key])
    for key in ("checkpoint_every", "eval_every"):
        _require(
            _is_int(config[key]) and config[key] >= 0,
            key,
            "must be an int >= 0 (0 = only at the end)",
            config[key],
        )
    lr = config.learning_rate
    _require(
        isinstance(lr, int | float) and math.isfinite(lr) and lr > 0,
        "learning_rate",
        "must be a finite number > 0",
        lr,
    )
    _require(
        config.optimizer in OPTIMIZERS,
        "optimizer",
        f"must be one of {OPTIMIZERS}",
        config.optimizer,
    )
    if "schedule" in config:
        _require(
            config.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}", config.schedule
        )
    for key, note in (
        ("warmup_steps", ""),
        ("eval_batches", ""),
        ("eval_batch_size", " (0 = batch_size)"),
    ):
        if key in config:
            v = config[key]
            _require(_is_int(v) and v >= 0, key, f"must be an int >= 0{note}", v)
    for key in ("weight_decay", "grad_clip_norm", "min_lr_ratio"):
        if key in config:
            v = config[key]
            _require(
                isinstance(v, int | float) and math.isfinite(v) and v >= 0,
                key,
                "must be a number >= 0",
                v,
            )
    mesh = config.mesh
    _require(
        isinstance(mesh, Mapping | ml_collections.ConfigDict),
        "mesh",
        f"must be a dict with axes {MESH_AXES}",
        mesh,
    )
    unknown = set(mesh.keys()) - set(MESH_AXES)
    _require(
        not unknown, "mesh", f"unknown mesh axes {sorted(unknown)}; allowed {MESH_AXES}", dict(mesh)
    )
    rest = 0
    for axis in MESH_AXES:
        size = mesh.get(axis, 1)
        _require(
            _is_int(size) and (size >= 1 or size == -1),
            f"mesh.{axis}",
            "must be an int >= 1, or -1 for the remaining devices",
            size,
        )
        rest += size == -1
    _require(rest <= 1, "mesh", "at most one axis may be -1", dict(mesh))
    strategy = config.get("context_strategy", "ring")
    _require(strategy in ("ring", "allgather"), "context_strategy", "must be 'ring' or "
             "'allgather' (how attention splits the sequence when mesh.context > 1)", strategy)
    if "logical_axis_rules" in config:
        rules = config.logical_axis_rules
        ok = isinstance(rules, Sequence) and all(
            isinstance(r, Sequence) and len(r) == 2 and isinstance(r[0], str) for r in rules
        )
        _require(
            ok,
            "logical_axis_rules",
            "must be a list of (logical_name, mesh_axis | [mesh_axes] | None)",
            rules,
        )
        for name, target in rules:
            targets = (target,) if target is None or isinstance(target, str) else target
            for t in targets:
                _require(
                    t is None or t in MESH_AXES,
                    "logical_axis_rules",
                    f"rule for {name!r} names unknown mesh axis {t!r}",
                    rules,
                )


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serializable plain dict of the config (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Command-line overrides as a flat dict of dotted keys, for
    ``ConfigDict.update_from_flattened_dict``.

    Takes the runner's syntax, ``--config.model.mechanism=gla``, or the bare form
    ``model.mechanism=gla``. Values: ints, floats and true/false are parsed; anything else
    stays a string (the ConfigDict then rejects a value of the wrong type for its key).

    Raises:
      ValueError: an item is not ``[--config.]KEY=VALUE``.
    """
    out: dict[str, Any] = {}
    for item in items:
        body = item[len("--config."):] if item.startswith("--config.") else item
        key, sep, text = body.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ValueError(f"expected --config.KEY=VALUE, got {item!r}")
        out[key] = {"true": True, "false": False}.get(text.lower(), text)
        for cast in (int, float):
            try:
                out[key] = cast(text)
                break
            except ValueError:
                pass
    return out
