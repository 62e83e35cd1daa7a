"""Long-range retrieval benchmark: the generator's layout (the needle is where the label says,
the answer is recoverable from the haystack), Wu et al.'s retrieval-head score per (layer, head)
vs a hand computation, the cache-policy mapping, and a smoke run of studies.retrieval_bench."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("models")

from experiments.config import ConfigError  # noqa: E402
from experiments.tasks.retrieval_data import (  # noqa: E402
    IGNORE,
    QUERY,
    check_sizes,
    query_len,
    retrieval_batch,
    token_ranges,
)


@pytest.mark.parametrize("vocab,seq_len,facts,value_len", [(64, 512, 1, 2), (64, 128, 8, 2),
                                                           (128, 64, 3, 4), (16, 16, 1, 1)])
def test_needle_is_where_the_label_says(vocab, seq_len, facts, value_len):
    b = retrieval_batch(np.arange(40), seed=3, vocab_size=vocab, seq_len=seq_len,
                        num_facts=facts, value_len=value_len)
    x, y, src, needle = b["inputs"], b["labels"], b["source"], b["needle"]
    r = token_ranges(vocab)
    hay = seq_len - query_len(facts, value_len)
    for row_x, row_y, row_s, row_n in zip(x, y, src, needle, strict=True):
        pos = np.flatnonzero(row_y != IGNORE)
        assert len(pos) == facts * value_len and np.all(pos >= hay)
        assert np.array_equal(pos, np.flatnonzero(row_s >= 0))
        # the label is the value token at its source, a needle token inside the haystack
        assert np.all(row_s[pos] < hay) and np.all(row_n[row_s[pos]])
        assert np.array_equal(row_x[row_s[pos]], row_y[pos])
        assert np.array_equal(row_x[pos + 1], row_y[pos])  # and the next input token
        assert row_n.sum() == facts * value_len and not row_n[hay:].any()
        keys_in_hay = row_x[:hay][(row_x[:hay] >= r["keys"][0]) & (row_x[:hay] < r["keys"][1])]
        assert len(keys_in_hay) == len(set(keys_in_hay.tolist())) == facts  # distinct, once
        filler = np.ones(hay, bool)
        filler[np.flatnonzero(row_n)] = False
        filler[np.isin(np.arange(hay), np.flatnonzero(np.isin(row_x[:hay], keys_in_hay)))] = False
        lo, hi = r["filler"]
        assert np.all((row_x[:hay][filler] >= lo) & (row_x[:hay][filler] < hi))
        # recoverable: each query "Q k" is answered by the tokens after k in the haystack
        for q0 in range(hay, seq_len, value_len + 2):
            assert row_x[q0] == QUERY
            at = int(np.flatnonzero(row_x[:hay] == row_x[q0 + 1])[0])
            want = row_x[at + 1: at + 1 + value_len]
            assert np.array_equal(row_x[q0 + 2: q0 + 2 + value_len], want)
            assert np.array_equal(row_y[q0 + 1: q0 + 1 + value_len], want)


def test_examples_depend_on_their_index_only_and_depths_spread():
    kw = dict(seed=1, vocab_size=64, seq_len=256, num_facts=1, value_len=2)
    many = retrieval_batch(np.arange(200), **kw)
    one = retrieval_batch(np.array([17]), **kw)
    for key in ("inputs", "labels", "source", "needle"):
        assert np.array_equal(many[key][17:18], one[key])
    d = many["depth"][:, 0]
    assert d.min() < 0.1 and d.max() > 0.9  # needles at every depth
    other = retrieval_batch(np.arange(200), **{**kw, "stream": 16})
    assert not np.array_equal(other["inputs"], many["inputs"])


def test_check_sizes_names_the_field():
    with pytest.raises(ConfigError, match="num_facts"):
        check_sizes(64, 512, 17, 2)
    with pytest.raises(ConfigError, match="seq_len"):
        check_sizes(64, 20, 4, 2)


def test_retrieval_head_scores_by_hand():
    import jattn.analysis as analysis

    # T = 6: tokens [5, 7, 8, 0, 5, 7]; the needle is the value tokens 7, 8 at positions 1, 2
    tokens = np.array([[5, 7, 8, 0, 5, 7]])
    needle = np.array([[False, True, True, False, False, False]])
    steps = np.array([[4, 5]])  # position 4 produces 7, position 5 produces 8
    predicted = np.array([[7, 8]])
    w = np.full((2, 1, 2, 6, 6), 0.01, np.float32)  # [L, B, H, T, T]
    w[0, 0, 0, 4, 1] = w[0, 0, 0, 5, 2] = 0.9  # layer 0 head 0 copies both: score 1
    w[0, 0, 1, 4, 1] = 0.9  # head 1: copies 7 at step 4 ...
    w[0, 0, 1, 5, 5] = 0.9  # ... but at step 5 looks at itself (7 != 8): score 1/2
    w[1, 0, 0, 4, 5] = 0.9  # layer 1 head 0: argmax outside the needle: 0
    w[1, 0, 1, 4, 2] = 0.9  # head 1: needle token 8, but the step produces 7: 0 ...
    w[1, 0, 1, 5, 2] = 0.9  # ... then 8 from position 2: score 1/2
    got = np.asarray(analysis.retrieval_head_scores(w, tokens, needle, steps, predicted))
    np.testing.assert_allclose(got, [[1.0, 0.5], [0.0, 0.5]])
    # a wrong prediction is no copy (Wu et al. score what the model generates); step_mask too
    wrong = np.asarray(analysis.retrieval_head_scores(w, tokens, needle, steps,
                                                      np.array([[7, 3]])))
    np.testing.assert_allclose(wrong, [[0.5, 0.5], [0.0, 0.0]])
    masked = analysis.retrieval_head_scores(w[0], tokens, needle, steps, predicted,
                                            step_mask=np.array([[True, False]]))
    np.testing.assert_allclose(np.asarray(masked), [0.5, 0.5])
    assert analysis.retrieval_heads(got) == [(0, 0), (0, 1), (1, 1)]
    with pytest.raises(ValueError, match="tokens"):
        analysis.retrieval_head_scores(w, tokens[:, :5], needle, steps, predicted)


def test_cache_policies_from_a_budget_and_keys_per_query():
    from models.kv_cache import CachePolicy
    from studies.retrieval_bench import SINK_TOKENS, keys_per_query, make_policy

    assert make_policy("full", 64) == CachePolicy()
    assert make_policy("streaming", 64) == CachePolicy(kind="streaming",
                                                       sink_tokens=SINK_TOKENS, window=60)
    for kind in ("snapkv", "h2o", "l2norm"):
        assert make_policy(kind, 64) == CachePolicy(kind=kind, budget=64)
    assert keys_per_query("softmax", 512, ()) == pytest.approx(256.5)
    assert keys_per_query("dsa", 512, (("dsa_top_k", 512),)) == pytest.approx(256.5)
    moba = keys_per_query("moba", 64, (("moba_block_size", 16), ("moba_top_k", 1)))
    t = np.arange(64)
    assert moba == pytest.approx(np.mean(t % 16 + 1 + np.minimum(1, t // 16) * 16))


def test_duo_gates_keep_the_best_retrieval_heads():
    from models.kv_cache import CachePolicy
    from studies.retrieval_bench import POLICIES, SINK_TOKENS, duo_gates, make_policy

    assert set(POLICIES) == {"full", "streaming", "snapkv", "h2o", "l2norm", "duo"}
    scores = [[0.1, 0.9, 0.0, 0.2], [0.3, 0.0, 0.8, 0.05]]  # [layers, heads]
    gates = duo_gates(scores, 0.25, kv_heads=4)  # 2 of 8 heads: the 0.9 and the 0.8
    assert gates == ((False, True, False, False), (False, False, True, False))
    # GQA: a KV head is as good as the best query head of its group
    assert duo_gates(scores, 0.5, kv_heads=2) == ((True, False), (False, True))
    policy = make_policy("duo", 64, gates)
    assert policy == CachePolicy(kind="duo", sink_tokens=SINK_TOKENS, window=60,
                                 head_gates=gates)
    with pytest.raises(ValueError, match="head_gates"):
        make_policy("duo", 64)


def _run_study(tmp_path, *extra):
    from studies.retrieval_bench import main

    return main(["--workdir", str(tmp_path), "--eval-examples", "4", "--head-examples", "2",
                 *extra])


def test_study_smoke(tmp_path):
    out = _run_study(tmp_path, "--preset", "tiny", "--mechanisms", "softmax", "--budgets", "16")
    (row,) = out["rows"]
    assert row["mechanism"] == "softmax" and 0 <= row["accuracy"] <= 1
    assert np.asarray(row["retrieval_scores"]).shape == (2, 2)  # [layers, heads]
    assert [(r["policy"], r["budget"]) for r in out["cache"]] == [
        (kind, 16) for kind in ("full", "streaming", "snapkv", "h2o", "l2norm", "duo")]
    # duo's gates come from the study's own head scores: half of the 4 (layer, head) pairs
    assert np.sum(out["duo_gates"]) == 2 and out["duo_full_fraction"] == 0.5
    for name in ("retrieval_bench.json", "retrieval_bench.md", "retrieval_heads.png",
                 "cache_budget.png"):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "retrieval_bench.json") as f:
        assert json.load(f)["cache_mechanism"] == "softmax"
    # the sweep's decoding under the full cache is the model's own forward answer
    import jax.numpy as jnp

    from experiments import load
    from experiments.tasks.base import get_task
    from studies.retrieval_bench import make_policy, recall_last_query

    model, config, _ = load(str(tmp_path / "softmax"))
    x = get_task("retrieval")(config).eval_examples(3)["inputs"]
    n_val = int(config.value_len)
    got = recall_last_query(model, jnp.asarray(x), n_val, make_policy("full", 16))
    first = np.argmax(np.asarray(model(jnp.asarray(x))), -1)[:, -n_val - 1]
    np.testing.assert_array_equal(got[:, 0], first)


@pytest.mark.slow
def test_study_cpu_preset_every_mechanism(tmp_path):
    # every mechanism at the cpu preset: ~13 min of training each on 2 busy cores
    out = _run_study(tmp_path, "--preset", "cpu")
    assert [r["mechanism"] for r in out["rows"]] == ["softmax", "moba", "nsa", "dsa"]
    assert out["rows"][0]["keys_per_query"] > max(r["keys_per_query"] for r in out["rows"][1:])
