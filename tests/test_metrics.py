"""experiments.metrics.MetricLogger alone (no training): history and its thinning, the train
window a checkpoint carries, what it writes to TensorBoard and to the console."""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest

import experiments.metrics as metrics
from experiments.metrics import MetricLogger, thin_curve, window_means


def _train_metrics(loss: float, lr: float = 0.1) -> dict:
    """One step's metrics as the train step returns them (replicated float32 arrays)."""
    return {"loss": jnp.float32(loss), "learning_rate": jnp.float32(lr)}


def _headless(tmp_path, **kwargs) -> tuple[MetricLogger, io.StringIO]:
    out = io.StringIO()
    return MetricLogger(str(tmp_path), progress_bar=False, stream=out, **kwargs), out


def test_thin_curve_keeps_first_last_and_at_most_n():
    points = [(s, float(s)) for s in range(1, 101)]
    thinned = thin_curve(points, 7)
    assert len(thinned) == 7 and thinned[0] == points[0] and thinned[-1] == points[-1]
    assert thinned == sorted(thinned)
    assert thin_curve(points[:5], 7) == points[:5]


def test_history_is_whole_in_memory_and_thinned_in_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "HISTORY_POINTS_KEPT", 5)
    logger, _ = _headless(tmp_path)
    for step in range(1, 21):
        logger.scalars({"loss": 1.0 / step}, step, "train/")
    assert [s for s, _ in logger.history["train/loss"]] == list(range(1, 21))
    kept = logger.checkpoint_meta()["history"]["train/loss"]
    assert [s for s, _ in kept] == [s for s, _ in thin_curve(logger.history["train/loss"], 5)]
    assert len(kept) == 5 and kept[0] == [1, 1.0] and kept[-1] == [20, 1.0 / 20]

    # a run resumed at step 12 from a checkpoint holding points past it keeps those <= 12
    resumed, _ = _headless(tmp_path / "resumed")
    resumed.restore({"history": {"train/loss": [[s, 0.5] for s in (1, 6, 12, 18)]}}, 12)
    resumed.scalars({"loss": 0.25}, 13, "train/")
    assert resumed.history["train/loss"] == [(1, 0.5), (6, 0.5), (12, 0.5), (13, 0.25)]
    resumed.close()
    logger.close()


def test_train_window_means_and_a_checkpointed_partial_window(tmp_path):
    """Means over the steps since the last log (learning rate: the last step's); a checkpoint
    between logs carries the partial window, so the resumed run logs the same means."""
    whole, _ = _headless(tmp_path / "whole")
    for i, loss in enumerate([4.0, 2.0, 3.0]):
        whole.train_step(_train_metrics(loss, lr=0.1 * (i + 1)))
    means = whole.log_train(3)
    assert means == pytest.approx({"loss": 3.0, "learning_rate": 0.3})
    assert whole.history["train/loss"] == [(3, 3.0)]

    first, _ = _headless(tmp_path / "first")
    for i, loss in enumerate([4.0, 2.0]):
        first.train_step(_train_metrics(loss, lr=0.1 * (i + 1)))
    meta = first.checkpoint_meta()
    assert [m["loss"] for m in meta["window"]] == [4.0, 2.0]
    resumed, _ = _headless(tmp_path / "resumed")
    resumed.restore(meta, 2)
    resumed.train_step(_train_metrics(3.0, lr=0.3))
    assert resumed.log_train(3) == means
    assert window_means([{"a": 1.0}, {"a": 2.0}]) == {"a": 1.5}  # no learning rate: fine
    for logger in (whole, first, resumed):
        logger.close()


def test_writes_scalars_images_and_histograms_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    logger, _ = _headless(tmp_path, tokens_per_step=64)
    logger.begin_steps(0)
    logger.train_step(_train_metrics(1.0))
    logger.log_train(1)
    logger.log_eval(1, {"loss": 0.5, "acc": 0.75})
    logger.images({"attention/layer0": np.eye(4, dtype=np.float32)}, 1)
    hists = metrics.param_histograms({"w": jnp.arange(10.0)})
    logger.histograms(hists, 1)
    logger.close()

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    assert {"train/loss", "train/learning_rate", "perf/step_time_s", "perf/tokens_per_s",
            "eval/loss", "eval/acc"} == set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("eval/acc")] == [0.75]
    (image,) = acc.Images("images/attention/layer0")
    assert image.width >= 128  # upscaled from 4x4
    (hist,) = acc.Histograms("params/w")
    assert hist.histogram_value.num == 10 and hist.histogram_value.max == 9.0


def test_headless_console_prints_a_line_per_log_and_per_eval(tmp_path):
    logger, out = _headless(tmp_path)
    logger.begin_steps(0)
    logger.train_step(_train_metrics(2.0))
    logger.log_train(1)
    logger.log_eval(1, {"loss": 1.5})
    logger.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[jattn] step 1: learning_rate=0.1, loss=2, step_time_s=")
    assert lines[1] == "[jattn] step 1 eval: loss=1.5"


def test_progress_bar_postfix_shows_loss_then_headline_metrics(tmp_path):
    out = io.StringIO()
    logger = MetricLogger(str(tmp_path), progress_bar=True, total_steps=2, description="bb",
                          headline=("attn_sink", "not_produced"), stream=out)
    logger.begin_steps(0)
    for step in (1, 2):
        logger.train_step(_train_metrics(2.0 / step))
        logger.log_train(step)
        logger.log_eval(step, {"loss": 1.0, "attn_sink": 0.25 * step, "value_norm": 3.0})
        logger.advance()
    logger.close()
    text = out.getvalue()
    evals = [ln for ln in text.splitlines() if ln.startswith("[jattn] step")]
    assert evals == [  # one line per eval, no per-log lines while the bar shows the loss
        "[jattn] step 1 eval: loss=1, attn_sink=0.25, value_norm=3",
        "[jattn] step 2 eval: loss=1, attn_sink=0.5, value_norm=3",
    ]
    final_bar = [seg for seg in text.replace("\r", "\n").splitlines() if "2/2" in seg][-1]
    assert final_bar.rstrip().endswith("step/s, loss=1, attn_sink=0.5]"), final_bar


def test_other_processes_write_nothing_but_keep_the_history(tmp_path):
    out = io.StringIO()
    logger = MetricLogger(str(tmp_path), enabled=False, progress_bar=True, stream=out)
    logger.begin_steps(0)
    logger.train_step(_train_metrics(1.0))
    logger.log_train(1)
    logger.log_eval(1, {"loss": 1.0})
    logger.close()
    assert out.getvalue() == "" and list(tmp_path.iterdir()) == []
    assert logger.history["eval/loss"] == [(1, 1.0)]
