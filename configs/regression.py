"""Tiny teacher-student MLP regression: the runner's smoke/test config (seconds on CPU).

    python -m experiments.run --config configs/regression.py --workdir /tmp/reg

"""

import ml_collections

from configs.common import base_config, model_config

# What ARG may be (`--config FILE:ARG`), listed by `python -m experiments.run --help`.
ARGS = "an integer: the number of training steps (default 200)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: optional number of steps, e.g. `configs/regression.py:40`."""
    config = base_config(task="regression")
    config.model = model_config(dim=8, hidden=32, teacher_hidden=16)  # the task's own MLP
    config.data = ml_collections.ConfigDict({"noise": 0.01})
    config.train_steps = int(arg) if arg else 200
    config.batch_size = 32
    config.learning_rate = 3e-3
    config.optimizer = "adam"
    config.log_every = 10
    config.eval_every = 50
    config.checkpoint_every = 50
    config.eval_batches = 2
    return config
