"""End-to-end tests of the experiment runner on the tiny regression task (CPU, seconds).

In-process runs use the 8 simulated CPU devices from tests/conftest.py; subprocess runs
get the same XLA_FLAGS. A persistent compilation cache (per test session) lets repeated
runs of the same config skip XLA compilation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.config import ConfigError
from experiments.trainer import train
from tests import testing as T


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache shared by this module's runs (restored afterwards)."""
    with T.persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def test_trains_logs_and_summarizes(tmp_path):
    summary = train(T.tiny_config(), str(tmp_path))
    loss = T.read_scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == list(range(5, 41, 5))
    assert loss[-1][1] < 0.5 * loss[0][1], loss  # the loss decreases

    on_disk = T.read_summary(tmp_path)
    assert on_disk["step"] == 40 and on_disk["wall_time_s"] > 0
    assert on_disk["final"]["train_loss"] == pytest.approx(loss[-1][1], rel=1e-6)
    assert {"train_loss", "eval_loss", "eval_mae"} <= set(on_disk["final"])
    assert on_disk["config"]["task"] == "regression"
    assert json.loads((tmp_path / "config.json").read_text()) == on_disk["config"]
    assert summary["final"] == on_disk["final"]

    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(
        str(tmp_path), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "perf/step_time_s",
        "perf/tokens_per_s",
        "eval/loss",
        "eval/mae",
    } <= set(tags["scalars"])
    assert "params/up/kernel" in tags["histograms"]
    assert "images/weights/up_kernel" in tags["images"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "30", "40"]  # keep 3


def test_sharded_meshes_match_one_device(tmp_path):
    """data=4,tensor=2 and fsdp=8 give the one-device loss curve within float tolerance, with
    the weights really split (equal losses alone would also hold if nothing were sharded)."""
    from experiments.trainer import Trainer

    P = jax.sharding.PartitionSpec
    curves = {}
    for name, mesh, up_spec in (  # up kernel [8, 32], logical ("embed", "mlp")
        ("one", {"mesh.data": 1}, P(None, None)),
        ("dp_tp", {"mesh.data": 4, "mesh.tensor": 2}, P(None, "tensor")),
        ("fsdp", {"mesh.data": 1, "mesh.fsdp": 8}, P("fsdp", None)),
    ):
        cfg = T.tiny_config(
            train_steps=20, eval_every=0, checkpoint_every=0, eval_batches=0, **mesh
        )
        trainer = Trainer(cfg, str(tmp_path / name))
        summary = trainer.run()
        assert summary["devices"] == 8
        up = trainer.final_state["params"]["up"]["kernel"]
        assert up.sharding.spec == up_spec, name
        assert trainer.final_state["opt_state"][0].mu["up"]["kernel"].sharding.spec == up_spec
        curves[name] = np.array([v for _, v in T.read_scalars(tmp_path / name, "train/loss")])
    np.testing.assert_allclose(curves["dp_tp"], curves["one"], rtol=2e-5)
    np.testing.assert_allclose(curves["fsdp"], curves["one"], rtol=2e-5)


def test_params_are_sharded_per_rules(tmp_path):
    from experiments.trainer import Trainer

    trainer = Trainer(
        T.tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), str(tmp_path)
    )
    with jax.set_mesh(trainer.mesh):
        state = trainer._init()
    kernel = state["params"]["up"]["kernel"]  # logical ("embed", "mlp")
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = state["opt_state"][0].mu["up"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec


def _final_metrics(workdir) -> dict:
    return T.read_summary(workdir)["final"]


KILL_RUN = {
    "train_steps": 120,
    "checkpoint_every": 10,
    "log_every": 5,
    "eval_every": 60,
    "keep_checkpoints": 2,
    "progress_bar": False,
}


def _run_and_kill(cmd, workdir: Path, when: str, rng: random.Random) -> str:
    """Starts a run and kill -9s it at a moment given by `when`.

    Returns "finished" (it ended first), "killed", or "killed_during_write" (a temporary
    orbax checkpoint directory was present at the kill).
    """
    proc = subprocess.Popen(
        cmd, cwd=T.REPO, env=T.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = workdir / "checkpoints"
    seen = set(os.listdir(ckpt)) if ckpt.exists() else set()
    deadline = time.time() + 120
    delay = rng.uniform(0.0, 0.3)
    t_first = None
    try:
        while proc.poll() is None and time.time() < deadline:
            names = set(os.listdir(ckpt)) if ckpt.exists() else set()
            if when == "during_write" and any("tmp" in n for n in names - seen):
                break
            if when == "random" and any(n.isdigit() for n in names - seen):
                t_first = t_first or time.time()
                if time.time() - t_first >= delay:
                    break
            time.sleep(0.001)
        if proc.poll() is not None:
            return "finished"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = any("tmp" in n for n in os.listdir(ckpt))
        return "killed_during_write" if partial else "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill9_and_resume_gives_identical_metrics(tmp_path):
    """kill -9 at a random moment and during a checkpoint write; the resumed run's final
    metrics equal an uninterrupted run's bitwise."""
    reference = train(T.tiny_config(**KILL_RUN), str(tmp_path / "ref"))["final"]

    workdir = tmp_path / "killed"
    cmd = T.run_cmd(workdir, {**T.TINY, **KILL_RUN})
    rng = random.Random(1234)
    outcomes = [_run_and_kill(cmd, workdir, w, rng) for w in ("random", "during_write")]
    assert "finished" not in outcomes, outcomes
    assert "killed_during_write" in outcomes, outcomes
    done = T.run_subprocess(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stderr
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
    assert _final_metrics(workdir) == reference


@pytest.mark.slow
def test_kill9_many_times(tmp_path):
    """Five kills (random moments and checkpoint writes), then completion: same metrics."""
    run = {**KILL_RUN, "train_steps": 240}
    reference = train(T.tiny_config(**run), str(tmp_path / "ref"))["final"]
    workdir = tmp_path / "killed"
    cmd = T.run_cmd(workdir, {**T.TINY, **run})
    rng = random.Random(7)
    for when in ("random", "during_write", "random", "during_write", "random"):
        _run_and_kill(cmd, workdir, when, rng)
    done = T.run_subprocess(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _final_metrics(workdir) == reference


def _corrupt_data_files(step_dir: Path) -> None:
    """Flips bytes in every array data file of a checkpoint (keeps sizes and names)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files, list((step_dir / "state").rglob("*"))
    for p in files:
        raw = bytearray(p.read_bytes())
        for i in range(len(raw) // 2, len(raw)):
            raw[i] ^= 0xFF
        p.write_bytes(bytes(raw))


def test_without_progress_bar_prints_a_line_per_log_and_eval(tmp_path, capsys):
    capsys.readouterr()
    train(T.tiny_config(train_steps=20, log_every=10, eval_every=20, progress_bar=False),
          str(tmp_path))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[jattn] step")]
    assert [ln.split(":")[0] for ln in lines] == [
        "[jattn] step 10", "[jattn] step 20", "[jattn] step 20 eval"]
    assert "loss=" in lines[0] and "step_time_s=" in lines[0] and "eval: loss=" in lines[2]


def test_progress_bar_shows_the_headline_metric_and_a_line_per_eval(tmp_path, capsys):
    """Issue 23: the bar's postfix carries the task's headline eval metric (regression: mae)
    beside the loss, and each eval prints one line above the bar."""
    capsys.readouterr()
    train(T.tiny_config(train_steps=20, log_every=5, eval_every=10, progress_bar=True),
          str(tmp_path))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[jattn] step")]
    assert [ln.split(":")[0] for ln in lines] == ["[jattn] step 10 eval", "[jattn] step 20 eval"]
    assert all("mae=" in ln for ln in lines)
    final_bar = [seg for seg in err.replace("\r", "\n").splitlines() if "20/20" in seg][-1]
    assert "loss=" in final_bar and "mae=" in final_bar, final_bar


def test_growing_train_steps_continues_the_run_and_names_the_change(tmp_path, capsys):
    """Long runs grow in stages (rerun with a larger train_steps): the stages end where one
    uninterrupted run ends, and the warning says which key changed."""
    cfg = dict(eval_every=0, checkpoint_every=10)
    whole = train(T.tiny_config(train_steps=20, **cfg), str(tmp_path / "whole"))
    train(T.tiny_config(train_steps=10, **cfg), str(tmp_path / "staged"))
    capsys.readouterr()
    staged = train(T.tiny_config(train_steps=20, **cfg), str(tmp_path / "staged"))
    err = capsys.readouterr().err
    assert staged["resumed_from"] == 10 and staged["step"] == 20
    assert staged["final"] == whole["final"]
    assert "config differs" in err and "train_steps: 10 -> 20" in err
    capsys.readouterr()
    train(T.tiny_config(train_steps=20, **cfg), str(tmp_path / "staged"))  # same config again
    assert "config differs" not in capsys.readouterr().err


def test_checkpoint_keeps_a_thinned_history_with_first_and_last_points(tmp_path, monkeypatch):
    import experiments.metrics as metrics

    monkeypatch.setattr(metrics, "HISTORY_POINTS_KEPT", 8)
    train(T.tiny_config(train_steps=30, log_every=1, eval_every=0, checkpoint_every=30),
          str(tmp_path))
    meta = json.loads((tmp_path / "checkpoints" / "30" / "meta" / "metadata").read_text())
    steps = [s for s, _ in meta["history"]["train/loss"]]
    assert len(steps) == 8 and steps[0] == 1 and steps[-1] == 30 and steps == sorted(steps)
    # a resumed run goes on from the thinned curve: restored, extended, thinned again
    summary = train(T.tiny_config(train_steps=32, log_every=1, eval_every=0, checkpoint_every=32),
                    str(tmp_path))
    assert summary["resumed_from"] == 30
    meta = json.loads((tmp_path / "checkpoints" / "32" / "meta" / "metadata").read_text())
    assert [s for s, _ in meta["history"]["train/loss"]] == metrics.thin_curve(
        steps + [31, 32], 8)


def test_corrupted_latest_checkpoint_falls_back(tmp_path, capsys):
    cfg = dict(train_steps=30, eval_every=0, checkpoint_every=10, keep_checkpoints=3)
    reference = train(T.tiny_config(**cfg), str(tmp_path))["final"]
    ckpt = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["10", "20", "30"]
    _corrupt_data_files(ckpt / "30")  # silent bit rot: caught by the fingerprint
    shutil.rmtree(ckpt / "20" / "state")  # a missing item: caught by the loader
    (tmp_path / "summary.json").unlink()
    capsys.readouterr()

    summary = train(T.tiny_config(**cfg), str(tmp_path))
    err = capsys.readouterr().err
    assert "checkpoint step 30" in err and "checkpoint step 20" in err
    assert "falling back" in err
    assert summary["resumed_from"] == 10
    assert summary["final"] == reference
    assert len(os.listdir(tmp_path / "checkpoints_corrupt")) == 2


def test_unknown_config_key_is_rejected_by_the_cli(tmp_path):
    out = T.run_subprocess(T.run_cmd(tmp_path, {"learning_rat": 0.1}))
    assert out.returncode != 0
    assert "unknown config key 'learning_rat'" in out.stderr
    out = T.run_subprocess(T.run_cmd(tmp_path, {"batch_size": "abc"}))
    assert out.returncode != 0 and "batch_size" in out.stderr


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"optimizer": "lion"}, "config.optimizer"),
        ({"batch_size": 0}, "config.batch_size"),
        ({"learning_rate": -1.0}, "config.learning_rate"),
        ({"mesh.data": 16}, "config.mesh"),
        ({"mesh.data": 2, "mesh.tensor": -1, "mesh.fsdp": -1}, "config.mesh"),
        ({"context_strategy": "zigzag"}, "config.context_strategy"),
        ({"mesh.data": 8, "batch_size": 12}, "config.batch_size"),
        ({"task": "no_such_task"}, "config.task"),
        ({"schedule": "exp"}, "config.schedule"),
        ({"warmup_steps": -1}, "config.warmup_steps"),
        ({"eval_batches": -1}, "config.eval_batches"),
        ({"eval_batch_size": -1}, "config.eval_batch_size"),
        ({"logical_axis_rules": (("embed", "model"),)}, "config.logical_axis_rules"),
        ({"model.hidden": 0}, "config.model.hidden"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(T.tiny_config(**overrides), str(tmp_path))


def test_two_process_distributed_run_trains_and_checkpoints(tmp_path):
    """Two `jax.distributed` processes on CPU (1 device each) over a localhost coordinator."""
    portpicker = pytest.importorskip("portpicker")
    port = portpicker.pick_unused_port()
    overrides = {
        **T.TINY,
        "train_steps": 20,
        "eval_every": 10,
        "checkpoint_every": 10,
        "mesh.data": -1,
    }
    procs = []
    for pid in range(2):
        cmd = T.run_cmd(tmp_path / "mp", overrides) + [
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=T.REPO,
                env=T.env(1),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summary = T.read_summary(tmp_path / "mp")
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert sorted(os.listdir(tmp_path / "mp" / "checkpoints")) == ["10", "20"]
    data_dir = tmp_path / "mp" / "checkpoints" / "20" / "data"
    data_files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    loss = T.read_scalars(tmp_path / "mp", "train/loss")
    assert len(loss) == 4 and loss[-1][1] < loss[0][1], loss


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Per-host data: 2 processes x 1 device see the same global batches as 1 x 2 devices."""
    portpicker = pytest.importorskip("portpicker")
    port = portpicker.pick_unused_port()
    overrides = {**T.TINY, "train_steps": 20, "checkpoint_every": 10, "mesh.data": -1}
    procs = [
        subprocess.Popen(
            T.run_cmd(tmp_path / "mp", overrides)
            + [
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={pid}",
            ],
            cwd=T.REPO,
            env=T.env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    multi = T.read_scalars(tmp_path / "mp", "train/loss")
    train(T.tiny_config(**{**overrides, "mesh.data": 2}), str(tmp_path / "sp"))
    single = T.read_scalars(tmp_path / "sp", "train/loss")
    np.testing.assert_allclose([v for _, v in multi], [v for _, v in single], rtol=1e-5)
