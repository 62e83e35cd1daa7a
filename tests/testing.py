"""Test helpers: tiny runner configs, subprocess runs, event reading, small attention tiles."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections

REPO = Path(__file__).resolve().parents[1]
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


TINY = {
    "train_steps": 40,
    "batch_size": 16,
    "log_every": 5,
    "eval_every": 20,
    "checkpoint_every": 10,
    "keep_checkpoints": 3,
    "eval_batches": 1,
    "progress_bar": False,
    "mesh.data": 1,  # one device: fastest to compile (the sharding tests set their meshes)
}


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The regression task at test size (a few ms per step); `overrides` use dotted keys."""
    from configs.regression import get_config

    config = get_config()
    for key, value in {**TINY, **overrides}.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def env(num_devices: int = 8) -> dict[str, str]:
    """Subprocess environment: N host CPU devices, the repo on the path."""
    e = dict(os.environ)
    flags = " ".join(
        f for f in e.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
    )
    e["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e["JAX_PLATFORMS"] = "cpu"
    e["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py sets in-process
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        e["JAX_COMPILATION_CACHE_DIR"] = cache
        e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return e


def run_cmd(
    workdir: str | Path, overrides: dict, config: str = "configs/regression.py"
) -> list[str]:
    """The `python -m experiments.run` command line for a config with overrides."""
    cmd = [sys.executable, "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    return cmd


def run_subprocess(
    cmd: list[str], num_devices: int = 8, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Runs a command in the repo root with `env(num_devices)`, capturing output."""
    return subprocess.run(
        cmd, cwd=REPO, env=env(num_devices), capture_output=True, text=True, timeout=timeout
    )


def read_summary(workdir: str | Path) -> dict:
    return json.loads((Path(workdir) / "summary.json").read_text())


def read_scalars(workdir: str | Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag, via TensorBoard's own event reader."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(workdir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@contextlib.contextmanager
def persistent_compilation_cache(directory: str | os.PathLike) -> Iterator[None]:
    """A persistent XLA cache in `directory` for every compile while inside (subprocesses
    started with :func:`env` share it); the previous settings come back on exit."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)


@contextlib.contextmanager
def small_blocks(bq: int = 8, bk: int = 8) -> Iterator[None]:
    """Force the xla attention path onto `bq x bk` tiles, so short sequences (e.g. T=21) span
    several partial/full/padded tiles."""
    from jattn import _blocked

    saved = _blocked.default_block_sizes
    _blocked.default_block_sizes = lambda tq, tk: (min(bq, tq), min(bk, tk))
    try:
        yield
    finally:
        _blocked.default_block_sizes = saved


def loss_curve(config: ml_collections.ConfigDict, workdir, steps: int,
               lower_first: bool = False) -> tuple[Any, dict]:
    """Losses of the runner's train step over the task's first `steps` batches, as an array,
    and `{"batch", "state"}` after the last step (plus `"lowered"`, the first step's lowered
    text, with `lower_first`)."""
    import numpy as np

    from experiments import data as data_lib
    from experiments.sharding import make_global_batch
    from experiments.trainer import Trainer
    from models.sharding import axis_rules

    trainer = Trainer(config, str(workdir))
    b = config.batch_size
    batches = data_lib.host_batches(trainer.task.train_source(), global_batch=b,
                                    num_batches=steps, rows=range(b))
    losses, run = [], {}
    with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
        state = trainer._init()
        for i, local in enumerate(batches):
            batch = make_global_batch(local, trainer.mesh, b, trainer.rules)
            if lower_first and i == 0:
                run["lowered"] = trainer.train_step.lower(state, batch).as_text()
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses), {**run, "batch": batch, "state": state}


def forward_and_decoded(model, tokens, prompt_len: int, policy=None) -> tuple[Any, Any]:
    """``(forward logits, decoded logits)``, both ``[B, T, V]`` and jitted: the decoded ones
    prefill the first ``prompt_len`` tokens (none when 0), then decode one token per step
    (``policy``: a ``models.CachePolicy``; None = the full cache)."""
    import jax.numpy as jnp
    from flax import nnx

    from models import CachePolicy

    policy = CachePolicy() if policy is None else policy
    b, t = tokens.shape
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)
    step = jax.jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i, policy))
    cache = model.init_cache(b, t, policy)
    out = []
    if prompt_len:
        logits, cache = step(state, tokens[:, :prompt_len], cache, jnp.int32(0))
        out.append(logits)
    for i in range(prompt_len, t):
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i))
        out.append(logits)
    return full, jnp.concatenate(out, axis=1)
