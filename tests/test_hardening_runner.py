"""Runner hardening (issue 15, items 13-19): a workdir misused by a careless user must give
a clear refusal or the uninterrupted result, never silent damage or a stuck workdir.

Tiny regression runs (20-30 steps, seconds); CLI behaviour through real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.checkpoint import CheckpointIncompatible, WorkdirBusy
from experiments.trainer import train
from tests import testing as T

CFG = {"train_steps": 20, "eval_every": 0, "checkpoint_every": 10, "data_threads": 0}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache shared by this module's runs and subprocesses."""
    with T.persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest), but the lock file (it
    names its current holder)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _flip_array_bytes(step_dir: Path) -> None:
    """Silent bit rot: flips the second half of every array data file of a checkpoint."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for p in files:
        raw = bytearray(p.read_bytes())
        for i in range(len(raw) // 2, len(raw)):
            raw[i] ^= 0xFF
        p.write_bytes(bytes(raw))


def _set_next_index(step_dir: Path, value: int) -> None:
    data = step_dir / "data" / "process_0-of-1.json"
    state = json.loads(data.read_text())
    state["next_index"] = value
    data.write_text(json.dumps(state, indent=4))


# ---------------------------------------------------------------- 13: changed model
def test_changed_model_is_an_incompatibility_that_touches_nothing(tmp_path):
    workdir = tmp_path / "run"
    train(T.tiny_config(**CFG), str(workdir))
    before = _snapshot(workdir)

    with pytest.raises(CheckpointIncompatible) as info:
        train(T.tiny_config(**CFG, **{"model.hidden": 64}), str(workdir))
    msg = str(info.value)
    assert "model.hidden: 32 -> 64" in msg and "params.up.kernel" in msg
    assert "--restart" in msg and "--workdir" in msg
    assert _snapshot(workdir) == before  # checkpoints, config.json, summary: untouched
    assert not (workdir / "checkpoints_corrupt").exists()

    cmd = T.run_cmd(workdir, {**T.TINY, **CFG, "model.hidden": 64})
    out = T.run_subprocess(cmd, num_devices=1)
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(_error_lines(out.stderr)) == 1 and "model.hidden" in out.stderr
    assert _snapshot(workdir) == before

    out = T.run_subprocess(cmd + ["--restart"], num_devices=1)  # explicit: move aside, start over
    assert out.returncode == 0, out.stderr[-3000:]
    assert "moved the previous run's files to" in out.stderr
    backups = [p for p in workdir.iterdir() if p.name.startswith("restart-backup-")]
    assert len(backups) == 1 and _snapshot(backups[0]) == before
    summary = T.read_summary(workdir)
    assert summary["resumed_from"] is None and summary["config"]["model"]["hidden"] == 64


@pytest.mark.parametrize(
    "overrides",
    [{"optimizer": "sgd", "momentum": 0.0}, {"optimizer": "adamw", "grad_clip_norm": 1.0}],
)
def test_same_model_resumes_whatever_the_optimizer_state_layout(tmp_path, overrides):
    """The shape check must not call a checkpoint of the same model incompatible (optax
    states with empty entries, chains)."""
    train(T.tiny_config(**{**CFG, "train_steps": 10, **overrides}), str(tmp_path))
    summary = train(T.tiny_config(**{**CFG, **overrides}), str(tmp_path))
    assert summary["resumed_from"] == 10


# ---------------------------------------------------------------- 14: all corrupted
def test_all_checkpoints_corrupted_starts_fresh_with_fresh_data(tmp_path, capsys):
    reference = train(T.tiny_config(**CFG), str(tmp_path / "ref"))["final"]
    workdir = tmp_path / "run"
    train(T.tiny_config(**CFG), str(workdir))
    for step in ("10", "20"):
        _flip_array_bytes(workdir / "checkpoints" / step)
    (workdir / "summary.json").unlink()
    capsys.readouterr()

    summary = train(T.tiny_config(**CFG), str(workdir))
    err = capsys.readouterr().err
    assert "checkpoint step 20" in err and "checkpoint step 10" in err
    assert summary["resumed_from"] is None
    assert summary["final"] == reference  # data from example 0, not from a failed restore's
    assert len(os.listdir(workdir / "checkpoints_corrupt")) == 2


# ---------------------------------------------------------------- 15: lowered train_steps
def test_lowered_train_steps_is_done_not_corruption(tmp_path, capsys):
    first = train(T.tiny_config(**CFG), str(tmp_path))
    ckpts = _snapshot(tmp_path / "checkpoints")
    capsys.readouterr()

    again = train(T.tiny_config(**{**CFG, "train_steps": 10}), str(tmp_path))
    assert "nothing to train" in capsys.readouterr().err
    assert again == T.read_summary(tmp_path) and again["step"] == 20
    assert again["final"] == first["final"]
    assert not (tmp_path / "checkpoints_corrupt").exists()
    assert _snapshot(tmp_path / "checkpoints") == ckpts

    (tmp_path / "summary.json").unlink()  # killed after the last checkpoint: summarize it
    again = train(T.tiny_config(**{**CFG, "train_steps": 10}), str(tmp_path))
    assert again["step"] == 20 and again["final"] == first["final"]
    assert T.read_summary(tmp_path)["step"] == 20
    assert not (tmp_path / "checkpoints_corrupt").exists()


# ---------------------------------------------------------------- 16: workdir lock
def test_a_live_run_locks_the_workdir_and_kill9_releases_it(tmp_path):
    holder_code = (
        "import sys, time\n"
        "from experiments.checkpoint import WorkdirLock\n"
        "WorkdirLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(tmp_path)],
        cwd=T.REPO, env=T.env(1), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
            train(T.tiny_config(**CFG), str(tmp_path))
        out = T.run_subprocess(T.run_cmd(tmp_path, {**T.TINY, **CFG}), num_devices=1)
        assert out.returncode == 2, out.stderr[-3000:]
        (line,) = _error_lines(out.stderr)
        assert "in use by another run" in line and f"pid {holder.pid}" in line
        assert not (tmp_path / "checkpoints").exists()  # the refused runs wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup; the kernel drops the flock
        holder.wait()
    assert (tmp_path / ".lock").exists()  # a stale lock file does not block
    assert train(T.tiny_config(**CFG), str(tmp_path))["step"] == 20


# ---------------------------------------------------------------- 17: data state fingerprint
def test_edited_data_iterator_state_is_detected(tmp_path, capsys):
    cfg = {**CFG, "train_steps": 30}
    reference = train(T.tiny_config(**cfg), str(tmp_path / "ref"))["final"]
    workdir = tmp_path / "run"
    train(T.tiny_config(**cfg), str(workdir))
    shutil.rmtree(workdir / "checkpoints" / "30")
    (workdir / "summary.json").unlink()
    _set_next_index(workdir / "checkpoints" / "20", 30)  # out of range for steps 21..30
    _set_next_index(workdir / "checkpoints" / "10", 5)  # in range: silently shifted data
    capsys.readouterr()

    summary = train(T.tiny_config(**cfg), str(workdir))
    err = capsys.readouterr().err
    assert err.count("data-iterator state") >= 2, err
    assert summary["resumed_from"] is None and summary["final"] == reference


def test_exhausted_data_iterator_is_a_clear_error(tmp_path):
    """A checkpoint from before the data fingerprint existed, with an out-of-range data
    position: a clear error naming the step, not a bare StopIteration."""
    cfg = {**CFG, "train_steps": 30}
    train(T.tiny_config(**{**cfg, "train_steps": 20}), str(tmp_path))
    step_dir = tmp_path / "checkpoints" / "20"
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta.pop("data_fingerprint", None)
    meta_file.write_text(json.dumps(meta))
    _set_next_index(step_dir, 30)
    with pytest.raises(RuntimeError, match="data iterator ended before step 21 of 30"):
        train(T.tiny_config(**cfg), str(tmp_path))


# ---------------------------------------------------------------- 18: full disk
def test_full_disk_is_one_line_leaves_nothing_half_written_and_resumes(tmp_path):
    cfg = {**CFG, "train_steps": 30}
    reference = train(T.tiny_config(**cfg), str(tmp_path / "ref"))["final"]
    workdir = tmp_path / "run"
    launcher = tmp_path / "full_disk_at_step_20.py"
    launcher.write_text(textwrap.dedent("""
        import errno
        import grain.checkpoint
        from absl import app
        from experiments import run

        save = grain.checkpoint.CheckpointHandler.save

        def full_disk(self, directory, *args, **kwargs):  # the disk fills up at step 20
            if "/checkpoints/20." in str(directory):
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
            return save(self, directory, *args, **kwargs)

        grain.checkpoint.CheckpointHandler.save = full_disk
        app.run(run.main, flags_parser=run.parse_flags)
    """))
    cmd = T.run_cmd(workdir, {**T.TINY, **cfg})
    out = T.run_subprocess([sys.executable, str(launcher)] + cmd[3:], num_devices=1)
    assert out.returncode == 1, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    assert "No space left on device" in line and "rerun" in line
    assert len(out.stderr.splitlines()) < 12, out.stderr  # no traceback, no log dump
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]  # no tmp directory
    assert not [p for p in workdir.rglob("*tmp*")]

    out = T.run_subprocess(cmd, num_devices=1)  # space freed: rerun resumes
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 10" in out.stderr
    assert T.read_summary(workdir)["final"] == reference


# ---------------------------------------------------------------- 19: CLI errors
@pytest.mark.parametrize(
    "case",
    ["missing_config", "unwritable_workdir", "negative_d_model", "unknown_mechanism"],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, case):
    workdir = tmp_path / "run"
    char_lm = {"train_steps": 2, "progress_bar": False, "mesh.data": 1}
    if case == "missing_config":
        cmd, expect = T.run_cmd(workdir, {}, config="configs/no_such.py"), "no_such.py"
    elif case == "unwritable_workdir":
        (tmp_path / "a_file").write_text("")
        workdir = tmp_path / "a_file" / "run"  # unwritable even for root
        cmd, expect = T.run_cmd(workdir, {**T.TINY, **CFG}), str(workdir)
    elif case == "negative_d_model":
        overrides = {**char_lm, "model.d_model": -8}
        cmd, expect = T.run_cmd(workdir, overrides, config="configs/char_lm.py:tiny"), "d_model"
    else:
        overrides = {**char_lm, "model.mechanism": "sofmax"}
        cmd, expect = T.run_cmd(workdir, overrides, config="configs/char_lm.py:tiny"), "sofmax"
    out = T.run_subprocess(cmd, num_devices=1)
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    assert expect in line, line
