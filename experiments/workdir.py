"""The workdir of a run: the errors that stop a run from starting in it (:class:`RunError`
and its kinds), :class:`WorkdirLock` (one live run per workdir), :func:`move_run_aside`
(`--restart`: the old run goes to a timestamped backup folder) and :func:`disk_full_cause`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time


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
