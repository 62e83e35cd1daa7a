"""Orbax checkpoints of the train state + grain iterator state, verified on restore.

Layout of `DIR/checkpoints/<step>/`: `state/` (params, optimizer state, step, rng, other
model variables; an orbax PyTree), `data/` (the grain iterator state, one JSON per
process, grain's own orbax handler) and `meta/` (JSON: step, a fingerprint of the state,
the partial train-metric window, the config).

Atomicity: orbax writes each checkpoint into a temporary directory and renames it when
every item is committed, so an interrupted (killed) save never becomes a step; leftover
temporary directories are removed when the manager starts.

Verification: `meta` holds a fingerprint (per-leaf wrapping sums of the raw bits) of the
saved state and a hash of the data-iterator state. On restore both are recomputed; a
checkpoint that fails to load or whose fingerprints differ is reported, moved to
`DIR/checkpoints_corrupt/`, and the previous one is tried. Each attempt restores into a
fresh data iterator, so a failed attempt leaves nothing half-restored.

Compatibility is not corruption: before anything is read or moved, every checkpoint's
stored array shapes and config are compared with the run's; a checkpoint of a different
model (other shapes, or another `task` / `model.*` config) raises
:class:`CheckpointIncompatible` and no file is touched.

The workdir itself (lock, `--restart` backups, run errors) is :mod:`experiments.workdir`;
its names stay importable from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grain
import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from experiments.workdir import (  # re-exported: callers import these from here
    BACKUP_PREFIX,  # noqa: F401
    CheckpointIncompatible,
    RunError,  # noqa: F401
    WorkdirBusy,  # noqa: F401
    WorkdirLock,  # noqa: F401
    WorkdirUnusable,  # noqa: F401
    disk_full_cause,  # noqa: F401
    move_run_aside,  # noqa: F401
)

log = logging.getLogger(__name__)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Position-weighted wrapping uint32 sum of the raw bits of one array (jittable)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:  # pragma: no cover - exotic dtypes
        bits = x.astype(jnp.uint32)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.uint32)
    out = jnp.stack([_leaf_fingerprint(x) for x in leaves])
    if not jax.sharding.get_abstract_mesh().empty:  # replicated, readable on every process
        out = jax.lax.with_sharding_constraint(out, jax.sharding.PartitionSpec())
    return out


def fingerprint(tree: Any) -> list[int]:
    """Per-leaf uint32 fingerprints of a pytree of (possibly sharded) arrays."""
    return [int(v) for v in replicated_to_host(_fingerprint_leaves(tree)).reshape(-1)]


def replicated_to_host(x: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-process) array as numpy, read from a local shard."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if not x.is_fully_replicated:
        raise ValueError(f"expected a replicated array, got sharding {x.sharding}")
    return np.asarray(x.addressable_data(0))


def data_fingerprint(data_state: Any) -> str:
    """sha256 of a data-iterator state (`iterator.get_state()`, a JSON-able dict)."""
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def _flat_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """`{"params.up.kernel": (shape, dtype)}` of a state tree or of orbax's metadata of one
    (namedtuples as their fields, sequences by index; empty nodes have no entries)."""
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {prefix: (tuple(int(d) for d in tree.shape), str(np.dtype(tree.dtype)))}
    if hasattr(tree, "_asdict"):  # optax states are namedtuples; orbax stores them as dicts
        tree = tree._asdict()
    if isinstance(tree, Mapping):
        items = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list | tuple):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:  # None, EmptyState, ...
        return {}
    out = {}
    for k, v in items:
        out.update(_flat_shapes(v, f"{prefix}.{k}" if prefix else k))
    return out


# Config keys that define the model: a checkpoint saved under other values is another model.
MODEL_CONFIG_KEYS = ("task", "model")


def _changed(old: Any, new: Any, key: str) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changed(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{key}.{k}")
        return out
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def incompatibilities(
    stored_shapes: Mapping[str, tuple], run_shapes: Mapping[str, tuple],
    stored_config: Mapping[str, Any] | None, run_config: Mapping[str, Any] | None,
) -> list[str]:
    """Why a checkpoint cannot be this run's: the differing model config keys, then the
    differing arrays (parameters first; the optimizer state mirrors them)."""
    out = []
    if stored_config is not None and run_config is not None:
        for key in MODEL_CONFIG_KEYS:
            out += _changed(stored_config.get(key, "<unset>"), run_config.get(key, "<unset>"), key)
    paths = sorted(
        set(stored_shapes) | set(run_shapes), key=lambda p: (not p.startswith("params."), p)
    )
    for path in paths:
        a, b = stored_shapes.get(path), run_shapes.get(path)
        if a != b:
            show = lambda x: "absent" if x is None else f"{x[1]}{list(x[0])}"  # noqa: E731
            out.append(f"array {path}: {show(a)} -> {show(b)}")
    return out


@dataclass
class _FrozenIteratorState:
    """What grain's checkpoint handler saves: a snapshot of `iterator.get_state()`."""

    state: dict

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=4).encode()


@dataclass
class Restored:
    """A verified checkpoint: the train state, its step, its meta dict and a fresh data
    iterator positioned where the checkpoint was saved."""

    step: int
    state: Any
    meta: dict
    data_iterator: Any


class Checkpointer:
    """CheckpointManager in `directory` with verification and fallback on restore.

    Args:
      directory: the checkpoints directory (`DIR/checkpoints`).
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread (the device->host copy stays blocking).
    """

    def __init__(self, directory: str, *, keep: int, async_save: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.corrupt_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "meta"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
        """Starts saving `state`, the iterator position and `meta` as checkpoint `step`.

        `meta` gets the state's fingerprint added. Returns once the state is copied to
        host memory (with async saving); the files are committed in the background.
        """
        data_state = data_iterator.get_state()
        meta = dict(
            meta,
            step=int(step),
            fingerprint=fingerprint(state),
            data_fingerprint=data_fingerprint(data_state),
            saved_at=time.time(),
        )
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def _quarantine(self, step: int) -> None:
        """Moves a bad checkpoint out of the manager's directory (process 0), then syncs."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            if os.path.exists(src):
                os.makedirs(self.corrupt_dir, exist_ok=True)
                dst = os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}")
                shutil.move(src, dst)
                log.warning("moved corrupted checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jattn_quarantine_{step}")
        self.manager.reload()

    def _stored_model(self, step: int) -> tuple[dict, dict | None] | None:
        """(array shapes, config) that checkpoint `step` records, or None if unreadable."""
        try:
            metadata = self.manager.item_metadata(step)
            shapes = _flat_shapes(metadata["state"].tree)
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            config = meta["meta"].get("config")
        except Exception:  # noqa: BLE001 - unreadable: corruption, judged when restoring
            return None
        return shapes, config if isinstance(config, Mapping) else None

    def check_compatible(self, abstract_state: Any, run_config: Mapping[str, Any]) -> None:
        """Raises CheckpointIncompatible if a readable checkpoint is of another model.

        Reads only metadata; touches no file. Every checkpoint is checked before any is
        restored or quarantined, so a changed model never makes healthy checkpoints look
        corrupted.
        """
        run_shapes = _flat_shapes(abstract_state)
        for step in reversed(self.all_steps()):
            stored = self._stored_model(step)
            if stored is None:
                continue
            why = incompatibilities(stored[0], run_shapes, stored[1], run_config)
            if why:
                shown = "; ".join(why[:6]) + (f"; ... ({len(why)} in all)" if len(why) > 6 else "")
                workdir = os.path.dirname(self.directory)
                raise CheckpointIncompatible(
                    f"the checkpoints in {self.directory} are of a different model than this "
                    f"config (checkpoint step {step} -> this run: {shown}). Nothing was changed. "
                    f"Use a new --workdir for this config, or rerun with --restart (in Python: "
                    f"train(..., restart=True)) to move the old run into "
                    f"{workdir}/{BACKUP_PREFIX}<time>/ and start over; to resume "
                    f"the old run, use its config ({workdir}/config.json)"
                )

    def _restore_verified(
        self, step: int, abstract_state: Any, new_data_iterator: Callable[[int], Any]
    ) -> Restored:
        """Restores checkpoint `step` into a fresh data iterator and verifies it (raises)."""
        data_iterator = new_data_iterator(step)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta, state = out["meta"], out["state"]
        if int(meta["step"]) != step:
            raise ValueError(f"meta says step {meta['step']}")
        got = fingerprint(state)
        want = list(meta["fingerprint"])
        if got != want:
            bad = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
            raise ValueError(f"state fingerprint mismatch in {len(bad)} of {len(got)} arrays")
        if "data_fingerprint" in meta:  # checkpoints before it existed: not checked
            data_state = data_iterator.get_state()
            if data_fingerprint(data_state) != meta["data_fingerprint"]:
                raise ValueError(f"data-iterator state {data_state} does not match its fingerprint")
        return Restored(step=step, state=state, meta=meta, data_iterator=data_iterator)

    def restore_latest(
        self,
        abstract_state: Any,
        new_data_iterator: Callable[[int], Any],
        report: Callable[[str], None] = print,
    ) -> Restored | None:
        """Restores the newest checkpoint that loads and verifies; None if there is none.

        Args:
          abstract_state: `jax.ShapeDtypeStruct` tree (with shardings) of the state.
          new_data_iterator: `step -> a fresh grain iterator` able to hold position `step`;
            each attempt restores into a new one, so a failed attempt leaves no trace.
          report: called with a message for each corrupted checkpoint that is skipped.
        """
        for step in reversed(self.all_steps()):
            ok, error = True, None
            try:
                restored = self._restore_verified(step, abstract_state, new_data_iterator)
            except Exception as e:  # noqa: BLE001 - any failure means: fall back
                ok, error = False, e
            if jax.process_count() > 1:  # every process falls back together, or none does
                ok = bool(np.min(multihost_utils.process_allgather(np.int32(ok))))
            if ok:
                return restored
            detail = "it failed on another process"
            if error is not None:
                detail = f"{type(error).__name__}: {str(error)[:300]}"
            msg = (
                f"checkpoint step {step} in {self.directory} is corrupted or unreadable "
                f"({detail}); falling back to the previous one"
            )
            log.warning(msg)
            report(msg)
            self._quarantine(step)
        return None

    def discard_partial(self) -> None:
        """After a failed save: waits for pending writes (ignoring their errors) and removes
        orbax's temporary directories, so nothing half-written is left (process 0)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failure is being reported by the caller
            pass
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
