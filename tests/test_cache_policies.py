"""KV-cache policies (issue 20): SnapKV, H2O, L2-norm eviction, DuoAttention (and streaming).

* A budget that holds the whole sequence reproduces full decoding exactly (logits, generate).
* With a budget, the tokens each (row, KV head) keeps are the policy's rule, recomputed here in
  NumPy float64 from the same q/k a direct core call sees (GQA: Hq=4 over Hkv=2, batch 2 with
  different inputs, which must keep different tokens).
* Jitted steps do not recompile and the cache does not grow; bad arguments raise naming them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn import masks
from models import AttentionConfig, CachePolicy, Decoder, DecoderConfig, build_core, generate
from models.cache_policies import gates_from_scores
from models.cores.base import CoreInputs
from models.decode import decode_fns

B, HQ, HKV, DH = 2, 4, 2, 8
G = HQ // HKV
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
POLICIES = {
    "snapkv": dict(observation_window=2, kernel_size=3),
    "h2o": dict(recent=2),
    "l2norm": dict(),
    "duo": dict(sink_tokens=1, head_gates=((True, False), (False, True))),
    "streaming": dict(sink_tokens=1),
}


# --- exactness with a budget that holds everything ----------------------------------------------
@functools.cache
def _model(num_layers: int = 2, positions: str = "rope") -> Decoder:
    cfg = DecoderConfig(vocab_size=32, d_model=32, num_heads=HQ, num_kv_heads=HKV,
                        mlp_dim=32, num_layers=num_layers, positions=positions,
                        implementation="reference")  # compiles fastest; paths agree bitwise
    return Decoder(cfg, rngs=nnx.Rngs(0))


def _decode_logits(model, tokens, prompt_len, policy, max_len):
    """Logits [B, T, V]: prefill ``prompt_len`` tokens (one call; streaming: token by token),
    then one jitted step per token."""
    graphdef, state = nnx.split(model)
    step = jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i, policy))
    cache = model.init_cache(tokens.shape[0], max_len, policy)
    out, start = [], 0
    if policy.kind != "streaming":
        logits, cache = step(state, tokens[:, :prompt_len], cache, jnp.int32(0))
        out, start = [logits], prompt_len
    for i in range(start, tokens.shape[1]):
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i))
        out.append(logits)
    return np.asarray(jnp.concatenate(out, axis=1))


T_EXACT, P_EXACT = 10, 6


@functools.cache
def _full_reference():
    """Full-cache logits and greedy continuation of the exactness tests (computed once)."""
    tokens = jax.random.randint(jax.random.key(1), (B, T_EXACT), 0, 32)
    model = _model(num_layers=1)
    logits = _decode_logits(model, tokens, P_EXACT, CachePolicy(), T_EXACT)
    return tokens, logits, generate(model, tokens[:, :P_EXACT], T_EXACT - P_EXACT)


@pytest.mark.parametrize("kind", list(POLICIES))
def test_budget_holding_the_sequence_equals_full_decoding(kind):
    """Bitwise for the new policies (the prefill attends over the same key slots as the full
    cache); the streaming cache renumbers positions and prefills token by token."""
    tokens, full, full_gen = _full_reference()
    model, t, p = _model(num_layers=1), T_EXACT, P_EXACT
    extra = POLICIES[kind]
    if kind == "duo":
        extra = {**extra, "head_gates": ((True, False),)}
    got = _decode_logits(model, tokens, p, CachePolicy(kind=kind, budget=t, **extra), t)
    if kind == "streaming":  # token-by-token prefill, keys rotated after caching: to rounding
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, full, err_msg=kind)
    # the benchmark's call shape, the policy's defaults but the budget
    policy = (CachePolicy(kind=kind, budget=t) if kind != "duo"
              else CachePolicy(kind=kind, budget=t, head_gates=((False, True),)))
    np.testing.assert_array_equal(generate(model, tokens[:, :p], t - p, policy=policy), full_gen)


def test_duo_gates_pick_full_or_streaming_per_layer():
    """All-retrieval gates = full decoding at any budget; all-streaming gates = the full
    forward under the sink + recent-window mask (absolute positions, RoPE included); the
    decoder hands each layer its own row of gates."""
    t, p, n_sink, budget = 11, 5, 1, 4
    model = _model()
    tokens = jax.random.randint(jax.random.key(2), (B, t), 0, 32)
    full = _decode_logits(model, tokens, p, CachePolicy(), t)
    on = CachePolicy("duo", sink_tokens=n_sink, budget=budget, head_gates=((1, 1), (1, 1)))
    np.testing.assert_allclose(_decode_logits(model, tokens, p, on, t), full, atol=2e-6)
    off = CachePolicy("duo", sink_tokens=n_sink, budget=budget, head_gates=((0, 0), (0, 0)))
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    lam = (j <= i) & ((j < n_sink) | (i - j < budget - n_sink))
    cfg = dataclasses.replace(model.cfg, attention_options=(("mask", masks.from_array(lam)),))
    masked = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(masked)
    forward = jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)
    np.testing.assert_allclose(_decode_logits(model, tokens, p, off, t), np.asarray(forward),
                               atol=2e-5)
    mixed = CachePolicy("duo", budget=budget, sink_tokens=n_sink, head_gates=((1, 1), (0, 0)))
    assert mixed.for_layer(1).head_gates == ((False, False),)
    assert mixed.for_layer(0).head_gates == ((True, True),)


@pytest.mark.parametrize("kind", ["h2o", "l2norm"])
def test_eviction_outside_a_sliding_window_changes_nothing(kind):
    """A ``sliding_window:3`` layer with ALiBi never looks past its 3 newest keys, which
    ``recent=3`` protects: evicting down to 4 slots must give the full cache's logits (the
    per-head slots go through the layer's mask and ALiBi at absolute positions)."""
    cfg = DecoderConfig(vocab_size=32, d_model=32, num_heads=HQ, num_kv_heads=HKV, mlp_dim=32,
                        num_layers=1, positions="alibi", mechanism="sliding_window:3",
                        implementation="reference")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (B, 10), 0, 32)
    full = _decode_logits(model, tokens, 6, CachePolicy(), 10)
    got = _decode_logits(model, tokens, 6, CachePolicy(kind, budget=4, recent=3), 10)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


# --- the kept tokens follow each rule (direct core calls, NumPy float64) --------------------------
def _core():
    cfg = AttentionConfig(d_model=16, num_heads=HQ, num_kv_heads=HKV, head_dim=DH,
                          implementation="reference")
    return build_core(cfg, rngs=nnx.Rngs(0))


def _qkv(t: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, t, HQ, DH))
    # keys of varied norms, so the L2 rule has something to choose
    k = jax.random.normal(ks[1], (B, t, HKV, DH)) * jax.random.uniform(ks[2], (B, t, HKV, 1),
                                                                      minval=0.3, maxval=3.0)
    v = jax.random.normal(jax.random.fold_in(ks[2], 1), (B, t, HKV, DH))
    return q, k, v


def _run_core(policy, t: int, prompt: int, seed: int = 0):
    """Feed a core the prompt, then one token per step; yields (step position, cache, o)."""
    core, (q, k, v) = _core(), _qkv(t, seed)
    x = jnp.zeros((B, t, 16))
    graphdef, state = nnx.split(core)

    @jit
    def call(state, q, k, v, x, cache, index):
        inp = CoreInputs(x, q, k, v, index + jnp.arange(q.shape[1]))
        return nnx.merge(graphdef, state).decode(inp, cache, index, policy)

    cache = core.init_cache(B, t, policy)
    o, cache = call(state, q[:, :prompt], k[:, :prompt], v[:, :prompt], x[:, :prompt], cache,
                    jnp.int32(0))
    yield prompt - 1, cache, o
    for i in range(prompt, t):
        s = slice(i, i + 1)
        o, cache = call(state, q[:, s], k[:, s], v[:, s], x[:, s], cache, jnp.int32(i))
        yield i, cache, o


def _kept(cache) -> np.ndarray:
    """Sorted kept positions [B, Hkv, n] (-1 slots dropped; each row/head holds n)."""
    pos = np.asarray(cache["pos"])
    return np.sort(np.where(pos < 0, np.iinfo(np.int32).max, pos), axis=-1)


def _weights(q, k, rows, keys) -> np.ndarray:
    """softmax(q k^T / sqrt(Dh)) of query positions ``rows`` over key positions ``keys``,
    summed over each KV head's query group and the queries: [B, Hkv, len(keys)] (causal)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    out = np.zeros((B, HKV, len(keys)))
    for b in range(B):
        for h in range(HQ):
            for i in rows:
                ks = [j for j in keys if j <= i]
                s = np.array([q[b, i, h] @ k[b, j, h // G] for j in ks]) / np.sqrt(DH)
                w = np.exp(s - s.max())
                w /= w.sum()
                for j, wj in zip(ks, w, strict=True):
                    out[b, h // G, keys.index(j)] += wj
    return out


def _check_cached_values(cache, k, v):
    """Every kept slot holds the k/v of the position it claims (keys unrotated here)."""
    pos, kc, vc = np.asarray(cache["pos"]), np.asarray(cache["k"]), np.asarray(cache["v"])
    for b, h, s in zip(*np.nonzero(pos >= 0), strict=True):
        np.testing.assert_allclose(kc[b, s, h], np.asarray(k)[b, pos[b, h, s], h], rtol=1e-6)
        np.testing.assert_allclose(vc[b, s, h], np.asarray(v)[b, pos[b, h, s], h], rtol=1e-6)


def _pool(x, width, mode):
    half = width // 2
    xp = np.pad(x, (half, half), constant_values=0.0 if mode == "avg" else -np.inf)
    win = np.stack([xp[i:i + len(x)] for i in range(width)])
    return win.sum(0) / width if mode == "avg" else win.max(0)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_keeps_the_window_and_the_top_pooled_votes(pooling):
    t, prompt, budget, w, ksz = 15, 12, 6, 3, 3
    policy = CachePolicy("snapkv", budget=budget, observation_window=w, kernel_size=ksz,
                         pooling=pooling)
    q, k, v = _qkv(t)
    votes = _weights(q, k, list(range(prompt - w, prompt)), list(range(prompt)))
    steps = list(_run_core(policy, t, prompt))
    for b in range(B):
        for h in range(HKV):
            pooled = _pool(votes[b, h, :prompt - w], ksz, pooling)
            top = np.argsort(-pooled, kind="stable")[:budget - w]
            want = sorted([*top, *range(prompt - w, prompt)])
            for i, cache, _ in steps:  # then the generated tokens append
                np.testing.assert_array_equal(_kept(cache)[b, h, :budget + i - prompt + 1],
                                              [*want, *range(prompt, i + 1)])
    _, cache, _ = steps[-1]
    assert cache["k"].shape[1] == budget + t - prompt  # kept prompt + room for the new tokens
    assert np.all(np.asarray(cache["pos"]) >= 0)
    _check_cached_values(cache, k, v)
    assert not np.array_equal(_kept(cache)[0], _kept(cache)[1])  # rows keep their own tokens


def test_h2o_keeps_recent_and_heavy_hitters_every_step():
    t, prompt, budget, recent = 16, 9, 6, 2
    policy = CachePolicy("h2o", budget=budget, recent=recent)
    q, k, v = _qkv(t, seed=3)
    steps = list(_run_core(policy, t, prompt, seed=3))
    for b in range(B):
        for h in range(HKV):
            # NumPy replay: prefill scores over the whole prompt, then evict + attend per step
            acc = dict(enumerate(_weights(q, k, list(range(prompt)), list(range(prompt)))[b, h]))
            old = [j for j in acc if j < prompt - recent]
            heavy = sorted(old, key=lambda j: -acc[j])[:budget - recent]
            kept = sorted([*heavy, *range(prompt - recent, prompt)])
            expected = {prompt - 1: list(kept)}
            for i in range(prompt, t):
                if len(kept) == budget:
                    kept.remove(min((j for j in kept if j <= i - recent), key=lambda j: acc[j]))
                kept.append(i)
                acc[i] = 0.0
                for j, aj in zip(kept, _weights(q, k, [i], kept)[b, h], strict=True):
                    acc[j] += aj
                expected[i] = sorted(kept)
            for i, cache, _ in steps:
                np.testing.assert_array_equal(_kept(cache)[b, h], expected[i],
                                              err_msg=f"row {b} head {h} step {i}")
            pos, score = np.asarray(cache["pos"])[b, h], np.asarray(cache["score"])[b, h]
            np.testing.assert_allclose(score[np.argsort(pos)], [acc[j] for j in expected[t - 1]],
                                       rtol=1e-4)
    _check_cached_values(cache, k, v)
    assert not np.array_equal(_kept(cache)[0], _kept(cache)[1])


@pytest.mark.parametrize("recent", [0, 3])
def test_l2norm_keeps_the_lowest_norm_keys(recent):
    t, prompt, budget = 14, 9, 5
    policy = CachePolicy("l2norm", budget=budget, recent=recent)
    q, k, v = _qkv(t, seed=4)
    norms = np.linalg.norm(np.asarray(k, np.float64), axis=-1)  # [B, T, Hkv]
    for i, cache, _ in _run_core(policy, t, prompt, seed=4):
        r = recent if i == prompt - 1 else max(recent, 1)  # a decoded token is always written
        for b in range(B):
            for h in range(HKV):
                rest = np.arange(i + 1 - r)
                low = rest[np.argsort(norms[b, rest, h], kind="stable")[:budget - r]]
                np.testing.assert_array_equal(_kept(cache)[b, h],
                                              sorted([*low, *range(i + 1 - r, i + 1)]),
                                              err_msg=f"row {b} head {h} step {i}")
    _check_cached_values(cache, k, v)
    assert not np.array_equal(_kept(cache)[0], _kept(cache)[1])


def test_duo_heads_attend_full_or_sink_plus_window():
    """Direct core call vs NumPy attention: retrieval KV head 0 sees every past token,
    streaming KV head 1 its first ``sink`` and last ``window`` (GQA: both query heads)."""
    t, prompt, sink, budget = 12, 6, 2, 5
    window = budget - sink
    policy = CachePolicy("duo", budget=budget, sink_tokens=sink, head_gates=((True, False),))
    q, k, v = (np.asarray(a, np.float64) for a in _qkv(t, seed=5))
    outs = [o for _, _, o in _run_core(policy, t, prompt, seed=5)]
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)  # [B, T, Hq, Dh]
    want = np.zeros_like(got)
    for b in range(B):
        for h in range(HQ):
            for i in range(t):
                js = [j for j in range(i + 1) if h // G == 0 or j < sink or i - j < window]
                s = np.array([q[b, i, h] @ k[b, j, h // G] for j in js]) / np.sqrt(DH)
                w = np.exp(s - s.max())
                want[b, i, h] = (w / w.sum()) @ v[b, js, h // G]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gates_from_scores_ranks_heads_across_layers():
    scores = np.array([[0.9, 0.1, 0.2, 0.0], [0.3, 0.35, 0.05, 0.5]])
    assert gates_from_scores(scores, 0.25) == ((True, False, False, False),
                                               (False, False, False, True))
    # 4 query heads over 2 KV heads: a KV head scores the max of its group
    assert gates_from_scores(scores, 0.5, kv_heads=2) == ((True, False), (False, True))
    assert gates_from_scores(scores, 0.0, kv_heads=2) == ((False, False), (False, False))
    policy = CachePolicy("duo", budget=6, head_gates=gates_from_scores(scores, 0.5, kv_heads=2))
    out = generate(_model(), jnp.ones((1, 4), jnp.int32), 3, policy=policy)
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="scores"):
        gates_from_scores(np.zeros(3))
    with pytest.raises(ValueError, match="full_fraction"):
        gates_from_scores(scores, 1.5)


# --- jit: fixed-size buffers, one compile -------------------------------------------------------
@pytest.mark.parametrize("kind", ["snapkv", "h2o", "l2norm", "duo"])
def test_decode_fns_step_compiles_once_and_the_cache_keeps_its_size(kind):
    model = _model(num_layers=1)
    policy = CachePolicy(kind=kind, budget=4, **{**POLICIES[kind], "head_gates": ((1, 0),)}
                         if kind == "duo" else POLICIES[kind])
    state, prefill, step = decode_fns(model, policy)
    prompt = jax.random.randint(jax.random.key(0), (B, 7), 0, 32)
    logits, cache = prefill(state, prompt, model.init_cache(B, 12, policy))
    shapes = jax.tree.map(jnp.shape, cache)
    tok = jnp.argmax(logits, -1)[:, None]
    for i in range(7, 12):
        out, cache = step(state, tok, cache, i)
        assert np.all(np.isfinite(np.asarray(out)))
        assert jax.tree.map(jnp.shape, cache) == shapes
        tok = jnp.argmax(out[:, -1], -1)[:, None]
    assert step.jitted._cache_size() == 1


def test_snapkv_prefill_needs_index_zero_and_a_full_buffer_gives_nan():
    model = _model(num_layers=1)
    policy = CachePolicy("snapkv", budget=4, observation_window=2)
    state, prefill, step = decode_fns(model, policy)
    with pytest.raises(ValueError, match="index=0"):
        step(state, jnp.ones((B, 3), jnp.int32), model.init_cache(B, 8, policy), 2)
    _, cache = prefill(state, jnp.ones((B, 6), jnp.int32), model.init_cache(B, 7, policy))
    ok, cache = step(state, jnp.ones((B, 1), jnp.int32), cache, 6)  # the one spare slot
    past, _ = step(state, jnp.ones((B, 1), jnp.int32), cache, 7)
    assert np.all(np.isfinite(np.asarray(ok))) and np.all(np.isnan(np.asarray(past)))


# --- errors name the argument -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="lru"), "kind"),
    (dict(kind="h2o"), "budget"),
    (dict(kind="h2o", budget=0), "budget"),
    (dict(kind="l2norm", budget=2.5), "budget"),
    (dict(kind="streaming", budget=4, sink_tokens=4), "budget"),
    (dict(kind="h2o", budget=4, recent=5), "recent"),
    (dict(kind="full", recent=1), "recent"),
    (dict(kind="snapkv", budget=4, observation_window=4), "observation_window"),
    (dict(kind="snapkv", budget=8, observation_window=2, kernel_size=4), "kernel_size"),
    (dict(kind="snapkv", budget=8, observation_window=2, pooling="min"), "pooling"),
    (dict(kind="duo", budget=8), "head_gates"),
    (dict(kind="duo", budget=8, head_gates=((1, 2),)), "head_gates"),
    (dict(kind="h2o", budget=8, head_gates=((1,),)), "head_gates"),
])
def test_bad_policy_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CachePolicy(**kwargs)


def test_duo_gates_must_match_the_model():
    model = _model()  # 2 layers of 2 KV heads
    with pytest.raises(ValueError, match="one gate per KV head"):
        generate(model, jnp.ones((1, 3), jnp.int32), 2,
                 policy=CachePolicy("duo", budget=6, head_gates=((1, 0, 1), (0, 1, 1))))
    with pytest.raises(ValueError, match="head_gates has 2 layers"):
        CachePolicy("duo", budget=6, head_gates=((1, 0), (0, 1))).for_layer(2)


def test_h2o_recent_window_larger_than_the_cache_still_evicts():
    """budget=8 (recent=4) on a cache sized for max_len=3 holds 3 slots: the recent window is
    capped at the cache, so decoding past max_len evicts instead of returning NaN."""
    model = _model(num_layers=1)
    policy = CachePolicy("h2o", budget=8)
    state, prefill, step = decode_fns(model, policy)
    logits, cache = prefill(state, jnp.ones((B, 2), jnp.int32), model.init_cache(B, 3, policy))
    for i in range(2, 6):
        logits, cache = step(state, jnp.ones((B, 1), jnp.int32), cache, i)
        assert np.all(np.isfinite(np.asarray(logits))), i
    np.testing.assert_array_equal(_kept(cache[0]), np.broadcast_to([3, 4, 5], (B, HKV, 3)))
