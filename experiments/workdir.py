"""The workdir of a run: opening it (:func:`open_workdir`: the lock, `--restart`), the errors
that stop a run from starting in it (:class:`RunError` and its kinds), :class:`WorkdirLock` (one
live run per workdir), :func:`move_run_aside` (`--restart`: the old run goes to a timestamped
backup folder), :func:`disk_full_cause`, atomic JSON files and the summary and config a previous
run left there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class RunError(Exception):
    """The run cannot start in this workdir; the message says why and how to proceed."""


class CheckpointIncompatible(RunError):
    """The workdir's checkpoints belong to a different model (shapes or model config)."""


class WorkdirBusy(RunError):
    """Another live run holds the workdir's lock."""


class WorkdirUnusable(RunError):
    """The workdir cannot be created or written."""


def disk_full_cause(e: BaseException | None) -> BaseException | None:
    """The "no space left on device" error that `e` is, was raised from or wraps; or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e):  # wrapped by tensorstore / orbax
            return e
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                if (cause := disk_full_cause(x)) is not None:
                    return cause
        e = e.__cause__ or e.__context__
    return None


class WorkdirLock:
    """An exclusive `fcntl.flock` on `DIR/.lock`, held for a run's lifetime (process 0).

    The kernel drops a flock when its process dies (even by kill -9), so a stale `.lock`
    file never blocks a later run; a second *live* run gets :class:`WorkdirBusy`. The file
    holds the owner's pid and host (for the message) and is never deleted: deleting it
    would let two runs lock two different files of the same name.
    """

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusy(
                f"workdir {os.path.dirname(self.path)} is in use by another run ({owner}); "
                "wait for it to finish or stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


BACKUP_PREFIX = "restart-backup-"


def move_run_aside(workdir: str) -> str | None:
    """Moves a previous run's files (all but the lock and earlier backups) into
    `workdir/restart-backup-<UTC time>/`; returns that folder, or None if there was nothing.
    """
    names = [
        n for n in sorted(os.listdir(workdir)) if n != ".lock" and not n.startswith(BACKUP_PREFIX)
    ]
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    backup = os.path.join(workdir, BACKUP_PREFIX + stamp)
    suffix = 1
    while os.path.exists(backup):
        backup = os.path.join(workdir, f"{BACKUP_PREFIX}{stamp}-{suffix}")
        suffix += 1
    os.makedirs(backup)
    for n in names:
        os.replace(os.path.join(workdir, n), os.path.join(backup, n))
    return backup


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
