"""What every config shares: the runner's keys, the `config.model` subtree, the test preset.

A config file in `configs/` defines ``get_config(arg: str | None) -> ConfigDict``, big_vision
style: it starts from :func:`base_config`, puts the model's fields in one ``config.model``
subtree built by :func:`model_config`, and adds its task's data keys at the top level:

    def get_config(arg=None):
        config = base_config(task="char_lm")
        config.model = model_config(d_model=64, num_layers=2, mechanism="softmax")
        return config

Configs sit above the runner: they import `models` (the default logical-axis rules) but never
`experiments`; the runner validates whatever config it is given
(`experiments.config.validate_config`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from models.sharding import DEFAULT_RULES

# Old spellings of a model field -> the one name every config uses (rejected by model_config).
RENAMED = {
    "normalizer": "mechanism",
    "attention": "mechanism",
    "position": "positions",
    "posemb": "positions",
}

# Test-sized run: a few steps, logs and checkpoints every step or two, no progress bar.
TINY_RUN = {
    "batch_size": 8,
    "eval_batch_size": 8,
    "train_steps": 4,
    "log_every": 2,
    "eval_every": 2,
    "checkpoint_every": 4,
    "histogram_every": 4,
    "progress_bar": False,
}


def base_config(task: str = "") -> ml_collections.ConfigDict:
    """The keys every experiment shares, with their defaults.

    Args:
      task: registered task name (see `experiments.tasks`).
    """
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.train_steps = 1000
    c.batch_size = 32
    c.learning_rate = 1e-3
    c.optimizer = "adamw"  # adamw | adam | sgd
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.momentum = 0.9  # sgd only (0 = plain SGD)
    c.weight_decay = 0.0
    # Parameters whose path contains one of these substrings are not decayed.
    c.no_decay = ("bias", "norm", "scale", "embed")
    c.schedule = "constant"  # cosine | constant | linear (decay after warmup)
    c.warmup_steps = 0
    c.min_lr_ratio = 0.0  # cosine/linear end value, as a fraction of learning_rate
    c.grad_clip_norm = 0.0  # 0 = off

    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.log_every = 50
    c.eval_every = 200
    c.eval_batches = 4
    c.eval_batch_size = 0  # 0 = batch_size
    c.histogram_every = 0  # 0 = at every eval
    c.progress_bar = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "tensor": 1})
    c.context_strategy = "ring"  # with mesh.context > 1: "ring" or "allgather" (jattn.attention)
    c.logical_axis_rules = DEFAULT_RULES
    c.data_threads = 2  # grain prefetch threads per host (0 = read in the main thread)
    return c


def model_config(**fields: Any) -> ml_collections.ConfigDict:
    """The ``config.model`` subtree: the model's fields, one name per concept in every config.

    For `models.Decoder` / `models.ViT` tasks the keys are the fields of `models.DecoderConfig`
    (ViT: ``size``, ``patch_size`` and `models.ViTConfig` fields), which the runner's one builder
    (`experiments.tasks.model_config`) turns into the model's config; sizes the data decides
    (vocabulary, ``max_len``, classes, image size) come from the task, not from here. Other
    tasks keep their own model's fields here. The shared names:

    * ``mechanism``: attention mechanism (`models.mechanism_names()`; never ``normalizer`` or
      ``attention``);
    * ``positions``: ``"rope" | "alibi" | "learned" | "none"`` (ViT: ``"learned" | "sincos2d"
      | "none"``; never ``position`` or ``posemb``);
    * ``implementation``: `jattn.attention` implementation, ``""`` = best for the platform,
      or ``"reference" | "xla" | "pallas"`` (``"pallas"`` is the one GPU/TPU kernel spelling);
    * ``init``: ``"models"`` (the models' own init) or ``"pytorch"`` (PyTorch defaults,
      `experiments.tasks.base.apply_init`).

    Raises:
      ValueError: a field uses an old spelling (``normalizer``, ``posemb``, ...).
    """
    old = sorted(set(fields) & set(RENAMED))
    if old:
        raise ValueError(
            f"model_config: {', '.join(f'{k!r} is spelled {RENAMED[k]!r}' for k in old)}"
        )
    if fields.get("implementation", "") is None:
        fields["implementation"] = ""  # one spelling for "best available" (a str flag)
    return ml_collections.ConfigDict(fields)


def parse_tokens(arg: str | None, allowed: tuple[str, ...], config_name: str) -> list[str]:
    """The comma-separated ARG tokens of ``configs/<config_name>.py:<arg>``, checked."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    for t in tokens:
        if t not in allowed:
            raise ValueError(
                f"configs/{config_name}.py:{arg}: unknown token {t!r}; choose from {allowed}"
            )
    return tokens


def tiny(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """The shared ``tiny`` preset (tests: seconds on CPU): :data:`TINY_RUN` then `overrides`
    (dotted keys reach into subtrees: ``**{"model.d_model": 16}``)."""
    return set_fields(config, **{**TINY_RUN, **overrides})


def set_fields(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """Sets a group of keys in one call (dotted keys reach into subtrees:
    ``**{"model.d_model": 16}``), so a config reads as a few named groups (optimizer, logging)
    rather than one assignment per line. Types are checked as for ``config.key = value``."""
    config.update_from_flattened_dict(fields)
    return config


def adamw_cosine_run(
    config: ml_collections.ConfigDict, *, steps: int, batch_size: int, learning_rate: float,
    weight_decay: float, logs: int, evals: int, checkpoints: int, **fields: Any,
) -> ml_collections.ConfigDict:
    """A run of `steps` AdamW steps on a cosine schedule (5% warmup, gradient clip 1.0) with
    about `logs` log lines, `evals` evaluations and `checkpoints` checkpoints spread over it;
    `fields` are further keys (:func:`set_fields`)."""
    return set_fields(
        config, train_steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        optimizer="adamw", weight_decay=weight_decay, schedule="cosine",
        warmup_steps=max(steps // 20, 1), grad_clip_norm=1.0, log_every=max(steps // logs, 1),
        eval_every=max(steps // evals, 1), checkpoint_every=max(steps // checkpoints, 1),
        **fields,
    )
