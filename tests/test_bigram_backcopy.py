"""Bigram-Backcopy (Guo et al. 2024): the data generator, the exact oracle risk, the task
through the runner, ReLU attention weights, and (slow) the sink forming on CPU."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("models")

from experiments.config import ConfigError  # noqa: E402
from experiments.tasks.bigram_backcopy import (  # noqa: E402
    BOS,
    BigramBackcopy,
    BigramBackcopyTask,
    corpus_bigram,
    excess_risk,
    synthetic_bigram,
)


def _config(arg: str = "tiny", **overrides):
    from configs.bigram_backcopy import get_config

    config = get_config(arg)
    config.progress_bar = False
    config.mesh.data = 1
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def dist() -> BigramBackcopy:
    p, u = synthetic_bigram(20, seed=3)
    return BigramBackcopy.from_bigram(p, u, num_triggers=3)


@pytest.fixture(scope="module")
def samples(dist) -> np.ndarray:
    return np.stack([dist.sample(np.random.default_rng((7, i)), 257) for i in range(300)])


def test_distribution_structure(dist):
    t = dist.transition
    assert t.shape == (21, 21)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-12)
    assert np.all(t[:, BOS] == 0)  # nothing transitions into <s>
    u = t[0, 1:]
    assert dist.triggers == tuple(int(i) + 1 for i in np.argsort(-u)[:3])
    assert np.all(dist.first[list(dist.triggers)] == 0) and dist.first[BOS] == 0
    np.testing.assert_allclose(dist.first.sum(), 1.0)
    # u is the chain's stationary distribution (the unigram marginal of the bigram chain)
    np.testing.assert_allclose(u @ t[1:, 1:], u, atol=1e-10)


def test_generator_backcopies_exactly_and_never_emits_bos(dist, samples):
    x = samples
    assert x.dtype == np.int32 and np.all(x[:, 0] == BOS)
    assert np.all(x[:, 1:] != BOS)
    trig = dist.is_trigger()[x]
    assert not trig[:, 1].any()  # x_1 ~ unigram without triggers
    assert trig.mean() > 0.1  # the test sees many backcopies
    after = np.argwhere(trig[:, 1:-1]) + [0, 1]  # (row, t) with x_t a trigger, t + 1 in range
    assert len(after) > 1000
    np.testing.assert_array_equal(x[after[:, 0], after[:, 1] + 1], x[after[:, 0], after[:, 1] - 1])
    assert not (trig[:, 1:] & trig[:, :-1]).any()  # two triggers never follow each other


def test_generator_is_deterministic_in_seed_and_index(dist):
    a = dist.sample(np.random.default_rng((0, 5)), 257)
    np.testing.assert_array_equal(a, dist.sample(np.random.default_rng((0, 5)), 257))
    assert not np.array_equal(a, dist.sample(np.random.default_rng((0, 6)), 257))
    assert not np.array_equal(a, dist.sample(np.random.default_rng((1, 5)), 257))
    task = BigramBackcopyTask(_config())
    src = task.train_source()
    np.testing.assert_array_equal(src[3]["tokens"], task.train_source()[3]["tokens"])
    assert src[3]["tokens"].shape == (33,)
    assert not np.array_equal(src[3]["tokens"], task.eval_source()[3]["tokens"])


def test_bigram_frequencies_match_p(dist, samples):
    """Pooled chi-square over (a -> b) cells at non-trigger positions t >= 1."""
    x = samples
    trig = dist.is_trigger()[x]
    src, dst = x[:, 1:-1], x[:, 2:]
    keep = ~trig[:, 1:-1]
    v = dist.num_tokens
    counts = np.bincount(src[keep] * v + dst[keep], minlength=v * v).reshape(v, v)
    n_rows = counts.sum(1, keepdims=True)
    expected = n_rows * dist.transition
    cells = expected >= 5
    stat = float(np.sum((counts[cells] - expected[cells]) ** 2 / expected[cells]))
    df = int(cells.sum()) - int((n_rows[:, 0] > 0).sum())
    assert df > 100
    assert stat < df + 5 * math.sqrt(2 * df), (stat, df)
    assert counts[cells].sum() > 0.99 * counts.sum() - counts[~cells].sum()
    # x_1 follows `first`
    first = np.bincount(x[:, 1], minlength=v) / len(x)
    assert np.abs(first - dist.first).sum() < 0.35


def test_oracle_risk_of_the_oracle_is_zero(dist, samples):
    tokens = samples[:8, :-1]
    oracle = dist.oracle(tokens)
    np.testing.assert_allclose(oracle.sum(-1), 1.0, rtol=1e-12)
    # the next token always has positive oracle probability
    nxt = samples[:8, 1:]
    assert np.all(np.take_along_axis(oracle, nxt[..., None], -1) > 0)
    table = jnp.asarray(dist.oracle_table(), jnp.float32)
    is_trig = jnp.asarray(dist.is_trigger())
    logits = jnp.log(jnp.asarray(oracle, jnp.float32))  # -inf where the oracle is 0
    kl, trig = excess_risk(logits, jnp.asarray(tokens), table, is_trig)
    assert float(jnp.max(jnp.abs(kl))) < 1e-5
    np.testing.assert_array_equal(np.asarray(trig), dist.is_trigger()[tokens])
    # a uniform model pays log(V+1) - H(oracle) at each position; at triggers that is log(V+1)
    kl_u, _ = excess_risk(jnp.zeros(logits.shape), jnp.asarray(tokens), table, is_trig)
    at_trig = np.asarray(kl_u)[dist.is_trigger()[tokens]]
    np.testing.assert_allclose(at_trig, math.log(dist.num_tokens), rtol=1e-5)


def test_corpus_bigram(tmp_path):
    text = "the cat sat on the mat. a hat, a bat.\n" * 20
    chars, p, u = corpus_bigram(text)
    assert chars == sorted(set(text))
    d = BigramBackcopy.from_bigram(p, u)
    top = [chars[t - 1] for t in d.triggers]
    assert top[0] == " " and set(top) <= {" ", "a", "t"}
    i, j = chars.index("t"), chars.index("h")
    assert p[i, j] == pytest.approx(text.count("th") / sum(text.count("t" + c) for c in chars))
    path = tmp_path / "c.txt"
    path.write_text(text)
    task = BigramBackcopyTask(_config(corpus=str(path)))
    task.validate()
    assert task.distribution().num_tokens == len(chars) + 1
    with pytest.raises(ConfigError, match="config.corpus"):
        BigramBackcopyTask(_config(corpus=str(tmp_path / "missing.txt"))).validate()
    with pytest.raises(ConfigError, match="config.model.mechanism"):
        BigramBackcopyTask(_config(**{"model.mechanism": "tanh"})).validate()


def test_config_presets():
    from configs.bigram_backcopy import get_config

    paper = get_config()
    m = paper.model
    assert (m.num_layers, m.d_model, paper.batch_size, paper.seq_len) == (1, 256, 512, 256)
    assert (paper.learning_rate, paper.b1, paper.b2, paper.weight_decay) == (3e-4, 0.9, 0.99, 1e-4)
    assert paper.optimizer == "adamw" and paper.schedule == "constant" and paper.vocab_size == 65
    sgd = get_config("3layer,sgd")
    assert (sgd.model.num_layers, sgd.optimizer, sgd.learning_rate, sgd.momentum) == (
        3, "sgd", 0.03, 0.9)
    assert get_config("relu").learning_rate == 3e-3
    with pytest.raises(ValueError, match="unknown token"):
        get_config("gpu")


def test_tiny_run_through_the_runner(tmp_path):
    from experiments.trainer import train

    summary = train(_config("tiny"), str(tmp_path))
    keys = {"attn_sink", "value_norm", "residual_norm", "backcopy_risk", "bigram_risk"}
    traj = summary["trajectory"]
    assert [p["step"] for p in traj] == [0, 2, 4]
    for point in traj:
        assert keys | {"step"} <= set(point)
        assert all(math.isfinite(point[k]) for k in keys)
    final = summary["final"]
    assert keys | {"train_loss"} <= set(final)
    assert all(math.isfinite(final[k]) for k in keys | {"train_loss"})
    # with uniform-ish initial attention, Attn<s> ~ mean_i 1/(i+1) (seq_len 32: ~0.13)
    assert 0.05 < traj[0]["attn_sink"] < 0.3
    assert (tmp_path / "bigram_backcopy.png").stat().st_size > 1000
    assert summary["figures"] == ["bigram_backcopy.png", "attention_map.png"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["trajectory"] == traj and on_disk["final"]["attn_sink"] == final["attn_sink"]

    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0, ea.SCALARS: 0})
    acc.Reload()
    assert "images/attention/layer0" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("eval/attn_sink")] == [0, 2, 4]


def test_bb_compare_overlays_runs_labelled_by_what_differs(tmp_path, capsys):
    from experiments.trainer import train
    from studies import bb_compare

    train(_config("tiny"), str(tmp_path / "adam"))
    train(_config("tiny,sgd", train_steps=2), str(tmp_path / "sgd"))
    md = bb_compare.main([str(tmp_path / "adam"), str(tmp_path / "sgd"),
                          "--out", str(tmp_path / "cmp.png")])
    rows = md.splitlines()
    assert rows[0] == "| run | metric | 0 | 2 |"  # the steps both runs logged
    assert len(rows) == 2 + 2 * len(bb_compare.PANELS)
    assert rows[2].startswith("| adamw, lr 0.0003 | attn_sink |")
    assert rows[-1].startswith("| sgd, lr 0.03 | backcopy_risk |")
    adam = json.loads((tmp_path / "adam" / "summary.json").read_text())["trajectory"]
    assert rows[2].endswith(f"| {adam[0]['attn_sink']:.4g} | {adam[1]['attn_sink']:.4g} |")
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert "figure:" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        bb_compare.load(str(tmp_path / "missing"))


def test_bb_compare_labels_read_model_keys_of_new_and_old_runs():
    """Runs saved before the `config.model` subtree kept `normalizer`, `num_layers` at the
    top level: labels find them either way."""
    from studies import bb_compare

    new = {"dir": "a", "config": {"model": {"num_layers": 3, "mechanism": "softmax"},
                                  "optimizer": "adamw"}}
    old = {"dir": "b", "config": {"num_layers": 3, "normalizer": "relu", "optimizer": "adamw"}}
    assert bb_compare.labels([new, old]) == ["softmax", "relu"]
    assert bb_compare.labels([new, {**old, "config": {**old["config"], "num_layers": 1}}]) == [
        "3L, softmax", "1L, relu"]


@pytest.mark.slow  # suite time (52 s); the study's CLI and lr handling stay in the default run
def test_bb_ablations_grow_the_runs_in_stages(tmp_path, capsys):
    from studies import bb_ablations

    variants = ["3layer_adam", "3layer_sgd"]  # (3layer_relu differs only in its ARG tokens)
    md = bb_ablations.main(["--workdir", str(tmp_path), "--preset", "tiny", "--steps", "4",
                            "--stage", "2", "--variants", *variants, "--config.mesh.data=1"])
    out = capsys.readouterr().out
    assert out.index("all runs at step 2") < out.index("3layer_adam -> step 4")
    for variant in variants:
        summary = json.loads((tmp_path / variant / "summary.json").read_text())
        assert summary["step"] == 4 and summary["resumed_from"] == 2
        assert [p["step"] for p in summary["trajectory"]] == [0, 2, 4]
        assert summary["config"]["model"]["num_layers"] == 3
        assert summary["config"]["checkpoint_every"] == 2  # = eval_every: stages resume close
    assert (tmp_path / "bb_ablations.md").read_text() == md + "\n"
    # rows labelled by what differs between the runs
    assert {row.split(" | ")[0] for row in md.splitlines()[2:]} == {
        "| adamw, lr 0.0003", "| sgd, lr 0.03"}
    assert (tmp_path / "bb_ablations.png").stat().st_size > 1000
    # rerunning is a no-op (every run is at --steps already)
    bb_ablations.main(["--workdir", str(tmp_path), "--preset", "tiny", "--steps", "4",
                       "--variants", *variants])
    assert "-> step" not in capsys.readouterr().out


def test_relu_attention_weights_are_relu_scores_over_i():
    from flax import nnx

    from models import capture_intermediates

    task = BigramBackcopyTask(_config("tiny", **{"model.mechanism": "relu", "model.num_layers": 2}))
    model = task.build_model(nnx.Rngs(0))
    tokens = jnp.asarray(task.eval_source()[0]["tokens"][None, :-1])
    _, inter = capture_intermediates(model, tokens)
    t = tokens.shape[1]
    h = model.embed(tokens) + model.pos_embed[...][:t]
    attn = model.layers[0].attn
    x = model.layers[0].attn_norm(h)
    q, k = attn.q_proj(x)[0, :, 0], attn.k_proj(x)[0, :, 0]  # [T, Dh] (one head)
    s = (q @ k.T) / math.sqrt(q.shape[-1])
    causal = np.tril(np.ones((t, t), bool))
    expected = np.where(causal, np.maximum(np.asarray(s), 0.0), 0.0) / np.arange(1, t + 1)[:, None]
    got = np.asarray(inter["layers"][0]["attention_weights"][0, 0])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert got.sum(-1).max() != pytest.approx(1.0)  # not normalized like softmax
    assert len(inter["layers"]) == 2 and "attention_weights" in inter["layers"][1]


@pytest.mark.slow
def test_cpu_reproduction_sink_forms(tmp_path):
    """The README's CPU run: Attn<s> crosses 0.5, ||V<s>|| rises then falls, backcopy learnt."""
    from experiments.trainer import train

    summary = train(_config("cpu"), str(tmp_path))
    traj = summary["trajectory"]
    sink = {p["step"]: p["attn_sink"] for p in traj}
    assert sink[0] < 0.1, sink  # ~ uniform causal attention: H_64 / 64 = 0.074
    assert max(v for s, v in sink.items() if s <= 400) > 0.5, sink  # measured: 0.52 at 200
    values = [p["value_norm"] for p in traj]
    peak = int(np.argmax(values))
    assert values[peak] > values[0] and values[-1] < values[peak], values
    assert traj[-1]["backcopy_risk"] < 0.1 * traj[0]["backcopy_risk"]
    jax.clear_caches()


def test_bb_ablations_cpu_preset_learning_rates(tmp_path, monkeypatch):
    """Under --preset cpu the variant's CPU learning rate applies unless --paper-lrs (the
    config handed to the trainer; nothing is trained)."""
    import experiments.trainer
    from studies import bb_ablations

    handed = []
    monkeypatch.setattr(experiments.trainer, "train",
                        lambda config, run_dir: handed.append(config.learning_rate))
    for paper_lrs, lr in ((False, 1e-3), (True, 3e-4)):
        bb_ablations.advance(str(tmp_path / str(paper_lrs)), "3layer_adam", "cpu,tiny", 1,
                             {"mesh.data": 1}, paper_lrs=paper_lrs)
        assert handed[-1] == pytest.approx(lr)
    assert len(handed) == 2
