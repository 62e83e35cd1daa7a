"""A run's directory: opening it (lock, `--restart`), atomic JSON files, the summary and
config a previous run left there."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from experiments.checkpoint import WorkdirLock, WorkdirUnusable, move_run_aside


def open_workdir(workdir: str, *, restart: bool = False) -> WorkdirLock | None:
    """Creates and locks `workdir` (process 0; returns its lock, None on other processes),
    and moves an old run aside on `restart`.

    Raises WorkdirBusy (another live run holds it) or WorkdirUnusable, on every process.
    """
    is_main = jax.process_index() == 0
    lock, error = None, None
    if is_main:
        try:
            os.makedirs(workdir, exist_ok=True)
            lock = WorkdirLock(workdir)
            lock.acquire()
            if restart:
                backup = move_run_aside(workdir)
                if backup:
                    print(f"[jattn] --restart: moved the previous run's files to {backup}",
                          file=sys.stderr, flush=True)
        except OSError as e:
            error = WorkdirUnusable(f"cannot create or write the workdir {workdir}: {e}")
        except Exception as e:  # noqa: BLE001 - WorkdirBusy: raised below, on all processes
            error = e
        if error is not None and lock is not None:
            lock.release()
    if jax.process_count() > 1:  # the others wait for process 0's verdict
        from jax.experimental import multihost_utils

        ok = multihost_utils.process_allgather(np.int32(error is None))
        if error is None and not np.all(ok):
            error = WorkdirUnusable(f"process 0 could not open the workdir {workdir}")
        if error is None and not is_main:  # a no-op on a shared file system
            try:
                os.makedirs(workdir, exist_ok=True)
            except OSError as e:
                error = WorkdirUnusable(f"cannot create the workdir {workdir}: {e}")
    if error is not None:
        raise error
    return lock


def summary_of_step(workdir: str, step: int) -> dict[str, Any] | None:
    """`workdir/summary.json` if it is the summary of a run ended at `step` (else None)."""
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("step") == step else None


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
