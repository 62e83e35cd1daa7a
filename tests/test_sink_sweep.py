"""studies.sink_sweep: two mechanisms, two steps each, through the runner; the table, the JSON
rows and the bar plot; reruns reuse finished runs; config overrides reach every run."""

from __future__ import annotations

import json
import os

import pytest

from configs.sink_sweep import MECHANISMS, get_config
from experiments.config import ConfigError
from experiments.tasks.bigram_backcopy import BigramBackcopyTask
from studies import sink_sweep


def test_config_sweeps_the_issue_mechanisms():
    assert set(MECHANISMS) == {"softmax", "sigmoid", "softpick", "fox", "gated", "sinks",
                               "stick_breaking", "diff"}
    c = get_config()
    # several (layer, head) pairs, so Sink_1^0.3 is not all-or-nothing
    assert c.model.num_layers * c.model.num_heads >= 8
    assert get_config("tiny").train_steps < 10


def test_tiny_sweep_writes_table_json_and_plot(tmp_path):
    work = str(tmp_path)
    argv = ["--workdir", work, "--preset", "tiny", "--mechanisms", "softmax", "sigmoid",
            "--config.train_steps=2", "--config.eval_at_start=False"]
    rows = sink_sweep.main(argv)
    assert [r["mechanism"] for r in rows] == ["softmax", "sigmoid"]
    for r in rows:
        assert 0.0 <= r["sink_score"] <= 100.0 and r["eval_loss"] > 0
        assert r["train_steps"] == 2
    with open(os.path.join(work, "sink_sweep.json")) as f:
        assert json.load(f) == rows
    md = open(os.path.join(work, "sink_sweep.md")).read()
    assert "| softmax |" in md and "~18" in md and "~0.4" in md  # Gu et al.'s numbers beside
    assert os.path.getsize(os.path.join(work, "sink_sweep.png")) > 0
    # a rerun reuses the finished runs (same rows, no training)
    again = sink_sweep.main(argv[:7] + ["--plot-only"])
    assert again == rows


def test_bigram_backcopy_accepts_every_softmax_family_mechanism():
    # the task used to allow only softmax/relu/sigmoid; the sweep needs fox, diff, ...
    for mech in MECHANISMS:
        config = get_config("tiny")
        config.model.mechanism = mech
        BigramBackcopyTask(config).validate()
    for bad in ("tanh", "gla"):  # unknown; recurrent (no attention weights for the metrics)
        config = get_config("tiny")
        config.model.mechanism = bad
        with pytest.raises(ConfigError, match="config.model.mechanism"):
            BigramBackcopyTask(config).validate()
