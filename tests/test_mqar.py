"""MQAR (Zoology, Arora et al. 2023): the generator's layout, determinism, the state-size
formulas, a tiny run through the runner, and (slow) softmax attention solving the CPU preset."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("models")

from experiments.config import ConfigError  # noqa: E402
from experiments.tasks.mqar import (  # noqa: E402
    IGNORE,
    cache_size,
    check_sizes,
    mqar_batch,
    mqar_mixture_batch,
    parse_mix,
    query_positions,
    state_size,
)

SIZES = [(64, 32, 4), (256, 64, 16), (8192, 256, 16), (16, 16, 4)]


@pytest.mark.parametrize("vocab,seq_len,pairs", SIZES)
def test_queries_answered_at_the_next_position(vocab, seq_len, pairs):
    b = mqar_batch(np.arange(50), seed=3, vocab_size=vocab, seq_len=seq_len, num_kv_pairs=pairs)
    x, y = b["inputs"], b["labels"]
    assert x.shape == y.shape == (50, seq_len) and x.dtype == y.dtype == np.int32
    half, ctx = vocab // 2, 2 * pairs
    for row_x, row_y in zip(x, y, strict=True):
        keys, values = row_x[0:ctx:2], row_x[1:ctx:2]
        assert np.all((keys >= 1) & (keys < half)), "keys from the first half (0 excluded)"
        assert np.all((values >= half) & (values < vocab)), "values from the second half"
        assert len(set(keys)) == pairs and len(set(values)) == pairs  # without replacement
        assert np.all(row_y[:ctx] == IGNORE)
        pos = np.flatnonzero(row_y != IGNORE)
        assert len(pos) == pairs and np.all(pos >= ctx) and np.all((pos - ctx) % 2 == 0)
        assert np.all(pos <= seq_len - 2)  # the answer is the *next* token, still in range
        paired = dict(zip(keys.tolist(), values.tolist(), strict=True))
        # each query is a key seen earlier; its label is that key's value; every key is asked
        assert sorted(row_x[pos].tolist()) == sorted(keys.tolist())
        for p in pos:
            assert row_y[p] == paired[int(row_x[p])]
        assert np.all((row_x >= 0) & (row_x < vocab))


def test_query_positions_are_the_labelled_positions():
    b = mqar_batch(np.arange(20), seed=1, vocab_size=256, seq_len=64, num_kv_pairs=8)
    pos = np.asarray(query_positions(b["labels"], 8))
    for row_y, row_p in zip(b["labels"], pos, strict=True):
        assert row_p.tolist() == np.flatnonzero(row_y != IGNORE).tolist()
    labels = np.full((1, 10), IGNORE, np.int32)
    labels[0, 4] = 7  # fewer labels than asked: padded with unlabelled positions
    padded = np.asarray(query_positions(labels, 3))[0]
    assert padded[0] == 4 and np.all(labels[0, padded[1:]] == IGNORE)


def test_power_law_gaps_prefer_short_gaps():
    b = mqar_batch(np.arange(2000), seed=0, vocab_size=512, seq_len=128, num_kv_pairs=4)
    gaps = (np.nonzero(b["labels"] != IGNORE)[1] - 8) // 2  # 60 candidate gaps
    counts = np.bincount(gaps, minlength=60)
    assert counts[:10].sum() > counts[-10:].sum() * 1.5


def test_deterministic_in_seed_and_index():
    kw = dict(vocab_size=128, seq_len=64, num_kv_pairs=8)
    a = mqar_batch(np.array([5, 9, 2]), seed=1, **kw)
    b = mqar_batch(np.array([2, 7, 5]), seed=1, **kw)  # example 5 alone/with others: the same
    np.testing.assert_array_equal(a["inputs"][0], b["inputs"][2])
    np.testing.assert_array_equal(a["labels"][2], b["labels"][0])
    c = mqar_batch(np.array([5]), seed=2, **kw)
    assert not np.array_equal(a["inputs"][0], c["inputs"][0])
    d = mqar_batch(np.array([5]), seed=1, stream=8, **kw)  # the held-out stream differs
    assert not np.array_equal(a["inputs"][0], d["inputs"][0])


def test_mixture_rows_are_mqar_examples_of_their_size_then_noise():
    sizes = parse_mix("16:2,32:4,64:8")
    assert sizes == [(16, 2), (32, 4), (64, 8)]
    idx = np.arange(30)
    b = mqar_mixture_batch(idx, sizes=sizes, seq_len=64, seed=4, vocab_size=128)
    assert b["inputs"].shape == b["labels"].shape == (30, 64)
    for j, (t, p) in enumerate(sizes):
        rows = idx[idx % 3 == j]
        own = mqar_batch(rows, seed=4, vocab_size=128, seq_len=t, num_kv_pairs=p)
        np.testing.assert_array_equal(b["inputs"][rows, :t], own["inputs"])
        np.testing.assert_array_equal(b["labels"][rows, :t], own["labels"])
        assert np.all(b["labels"][rows, t:] == IGNORE)
        assert np.all((b["labels"][rows] != IGNORE).sum(1) == p)
    with pytest.raises(ConfigError, match="train_mix"):
        parse_mix("64-4")


def test_bad_train_mix_is_a_config_error(tmp_path):
    from experiments.trainer import train

    with pytest.raises(ConfigError, match="train_mix item 32:4: T=32 > config.seq_len=16"):
        train(_config(train_mix="16:2,32:4"), str(tmp_path))
    summary = train(_config(train_mix="8:2,16:2"), str(tmp_path / "ok"))  # a valid mixture
    assert 0.0 <= summary["accuracy"] <= 1.0 and np.isfinite(summary["final"]["train_loss"])


def test_bad_sizes_name_the_key():
    with pytest.raises(ConfigError, match="num_kv_pairs"):
        check_sizes(8192, 64, 17)
    with pytest.raises(ConfigError, match="vocab_size"):
        check_sizes(8, 64, 4)
    with pytest.raises(ConfigError, match="seq_len"):
        check_sizes(8192, 63, 4)


def _dcfg(mechanism, d=32, heads=2, **kw):
    from models import DecoderConfig

    return DecoderConfig(
        vocab_size=64,
        d_model=d,
        num_layers=2,
        num_heads=heads,
        mechanism=mechanism,
        positions="learned",
        max_len=16,
        **kw,
    )


@pytest.mark.parametrize(
    "mechanism,expected",
    [
        ("softmax", 2 * 16 * 32),  # KV cache 2 T d
        ("gla", 2 * 16 * 16),  # H K V
        ("deltanet", 2 * 16 * 16 + 3 * 3 * 32),  # + the short convs' W - 1 = 3 inputs of q, k, v
        ("gated_deltanet", 2 * 16 * 16 + 3 * 3 * 32),
        ("retnet", 2 * 16 * 16),
        ("linear:elu1", 2 * 16 * 16 + 2 * 16),  # H F V + normalizer H F, F = Dh
        ("sliding_window:8", 2 * 8 * 32),  # window < T
    ],
)
def test_state_size_formulas(mechanism, expected):
    cfg = _dcfg(mechanism)
    assert state_size(cfg, 16) == [expected, expected]
    if not mechanism.startswith("sliding_window"):
        assert cache_size(cfg, 16) == [expected, expected]  # = the decoding cache's floats


def test_state_size_gqa_taylor_and_based():
    assert state_size(_dcfg("softmax", num_kv_heads=1), 16)[0] == 2 * 16 * 16
    f = 1 + 16 + 16 * 16  # Taylor features at Dh = 16
    assert state_size(_dcfg("linear:taylor"), 16)[0] == 2 * f * 16 + 2 * f
    f = 1 + 16 + 16 * 16  # based: feature_dim 16, plus a window of min(64, T) = 16
    assert state_size(_dcfg("based"), 16) == cache_size(_dcfg("based"), 16)
    assert state_size(_dcfg("based"), 16)[0] == 2 * f * 16 + 2 * f + 2 * 16 * 32


def _config(arg="tiny", **overrides):
    from configs.mqar import get_config

    config = get_config(arg)
    config.progress_bar = False
    config.mesh.data = 1
    config.update_from_flattened_dict(overrides)
    return config


def test_config_presets():
    from configs.mqar import get_config

    for arg, (t, p) in {"64": (64, 4), "128": (128, 8), "256": (256, 16)}.items():
        c = get_config(arg)
        assert (c.seq_len, c.num_kv_pairs, c.vocab_size, c.model.num_layers) == (t, p, 8192, 2)
        assert all(tt <= t for tt, _ in parse_mix(c.train_mix))  # a mixture up to its size
    assert parse_mix(get_config("256").train_mix) == [(64, 4), (128, 8), (256, 16)]
    assert get_config("cpu").vocab_size <= 1024
    with pytest.raises(ValueError, match="unknown token"):
        get_config("huge")


def test_tiny_run_writes_accuracy_and_state_size(tmp_path):
    from experiments.trainer import train

    config = _config(**{"model.mechanism": "gla"})
    summary = train(config, str(tmp_path))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= on_disk["accuracy"] <= 1.0
    assert on_disk["state_size"] == 16 * 16  # 1 head, Dh = d = 16
    assert on_disk["accuracy"] == summary["accuracy"] == summary["final"]["eval_accuracy"]


def test_resumed_run_reports_the_whole_accuracy_curve(tmp_path):
    from experiments.trainer import train

    train(_config(), str(tmp_path))  # 4 steps, eval at 2 and 4, checkpoint at 4
    summary = train(_config(train_steps=6), str(tmp_path))
    assert summary["resumed_from"] == 4
    assert [p["step"] for p in summary["accuracy_curve"]] == [2, 4, 6]


def test_unknown_mechanism_is_a_config_error(tmp_path):
    from experiments.trainer import train

    with pytest.raises(ConfigError, match="mechanism"):
        train(_config(**{"model.mechanism": "nope"}), str(tmp_path))


@pytest.mark.slow
def test_softmax_solves_cpu_preset(tmp_path):
    from experiments.trainer import train

    summary = train(_config("cpu"), str(tmp_path))
    assert summary["accuracy"] > 0.95


@pytest.mark.slow
def test_softmax_solves_256_16_with_the_size_mixture(tmp_path):
    """The acceptance run: > 99% at (T=256, 16 pairs), vocab 256, ~10 min on 2 CPU cores."""
    from experiments.trainer import train

    config = _config("256,cpu", schedule="constant", train_steps=1000, eval_every=250,
                     checkpoint_every=1000, eval_batches=1, eval_batch_size=256)
    summary = train(config, str(tmp_path))
    assert (summary["seq_len"], summary["num_kv_pairs"]) == (256, 16)
    assert summary["accuracy"] > 0.99


def test_sweep_table_and_plot_from_summaries(tmp_path):
    from studies import mqar_sweep

    for mech, d, size, acc in [("softmax", 32, 4096, 0.9), ("gla", 32, 1024, 0.1)]:
        run = tmp_path / mqar_sweep.run_name(mech, d)
        run.mkdir()
        summary = {
            "mechanism": mech,
            "d_model": d,
            "state_size_per_layer": [size, size],
            "accuracy": acc,
            "seq_len": 64,
            "num_kv_pairs": 4,
            "vocab_size": 256,
            "step": 10,
            "wall_time_s": 1.0,
            "config": {"learning_rate": 3e-3},
        }
        (run / "summary.json").write_text(json.dumps(summary))
    rows = mqar_sweep.main(
        [
            "--workdir",
            str(tmp_path),
            "--mechanisms",
            "softmax",
            "gla",
            "--d-models",
            "32",
            "--plot-only",
        ]
    )
    assert [(r["mechanism"], r["state_size"], r["accuracy"]) for r in rows] == [
        ("softmax", 4096, 0.9),
        ("gla", 1024, 0.1),
    ]
    assert (tmp_path / "mqar_sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "mqar_sweep.json").read_text()) == rows
