"""DuoAttention (issue 20): the split KV cache (full heads + streaming ring buffers).

* Direct core calls (GQA, batch 2, per-head sink logits and ALiBi slopes): the split cache gives
  the masked reference's outputs (:func:`models.duo.masked_decode`, full layout + Lambda mask),
  for a one-call prefill, a chunked prefill and steps that wrap the ring; the ring holds exactly
  the sinks and the window newest tokens.
* A decoder with mixed gates per layer equals its full forward under explicit per-head masks.
* The cache is smaller by the formula, keeps its shapes and the jitted step compiles once.
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
from models.duo import cache_bytes, masked_decode
from models.duo_gates import gates_from_alpha, learn_duo_gates, mixed_hidden, passkey_batches

B, HQ, HKV, DH = 2, 8, 4, 8
GATES = ((True, False, False, True),)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _core(mechanism: str, position: str):
    cfg = AttentionConfig(d_model=16, num_heads=HQ, num_kv_heads=HKV, head_dim=DH,
                          mechanism=mechanism, position=position, implementation="reference")
    core = build_core(cfg, rngs=nnx.Rngs(0))
    if mechanism == "sinks":  # distinct per-head sink logits
        core.sink_logits[...] = jnp.linspace(-1.0, 2.0, HQ)
    return core


def _run(core, policy, chunks, t, reference: bool):
    """Outputs [B, T, Hq, Dh] of calls over ``chunks`` (lengths summing to ``t``) and the caches."""
    ks = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(ks[0], (B, t, HQ, DH))
    k = jax.random.normal(ks[1], (B, t, HKV, DH))
    v = jax.random.normal(ks[2], (B, t, HKV, DH))
    graphdef, state = nnx.split(core)
    fn = masked_decode if reference else None

    @jit
    def call(state, q, k, v, cache, index):
        c = nnx.merge(graphdef, state)
        inp = CoreInputs(jnp.zeros((*q.shape[:2], 16)), q, k, v, index + jnp.arange(q.shape[1]))
        return fn(c, inp, cache, index, policy) if fn else c.decode(inp, cache, index, policy)

    cache = core.init_cache(B, t, CachePolicy() if reference else policy)
    outs, caches, i = [], [], 0
    for n in chunks:
        s = slice(i, i + n)
        o, cache = call(state, q[:, s], k[:, s], v[:, s], cache, jnp.int32(i))
        outs.append(o)
        caches.append((i + n - 1, cache))
        i += n
    return np.asarray(jnp.concatenate(outs, axis=1)), caches


@pytest.mark.parametrize("mechanism, position", [("softmax", "rope"), ("sinks", "alibi")])
def test_split_cache_equals_the_masked_reference(mechanism, position):
    t, sink, budget = 14, 2, 5  # ring of 5 slots, wraps several times
    policy = CachePolicy("duo", budget=budget, sink_tokens=sink, head_gates=GATES)
    core = _core(mechanism, position)
    bitwise = [[6] + [1] * 8, [3, 4] + [1] * 7]  # the reference makes the same calls
    refs = [_run(core, policy, chunks, t, reference=True)[0] for chunks in bitwise]
    for chunks in [*bitwise, [1] * t, [t]]:
        got, caches = _run(core, policy, chunks, t, reference=False)
        if chunks in bitwise:  # the same key columns: bitwise the same outputs
            np.testing.assert_array_equal(got, refs[bitwise.index(chunks)], err_msg=str(chunks))
        np.testing.assert_allclose(got, refs[0], rtol=2e-5, atol=2e-6, err_msg=str(chunks))
        for last, cache in caches:  # the ring: sinks + the window newest, at their slots
            held = sorted(p for p in np.asarray(cache["stream_pos"]).tolist() if p >= 0)
            expect = sorted({*range(min(sink, last + 1)),
                             *range(max(0, last + 1 - (budget - sink)), last + 1)})
            assert held == expect, (chunks, last)
            assert cache["stream_k"].shape == (B, budget, 2, DH)
            assert cache["k"].shape == (B, t, 2, DH)


def test_traced_step_past_max_len_gives_nan_and_keeps_the_cache():
    core = _core("softmax", "rope")
    policy = CachePolicy("duo", budget=4, sink_tokens=1, head_gates=GATES)
    _, caches = _run(core, policy, [5], 5, reference=False)
    cache = caches[-1][1]
    graphdef, state = nnx.split(core)
    x = jnp.ones((B, 1, HQ, DH))
    kv = jnp.ones((B, 1, HKV, DH))

    @jit
    def step(state, cache, index):
        inp = CoreInputs(jnp.zeros((B, 1, 16)), x, kv, kv, index[None])
        return nnx.merge(graphdef, state).decode(inp, cache, index, policy)

    o, new = step(state, cache, jnp.int32(5))
    assert np.all(np.isnan(np.asarray(o)))
    jax.tree.map(np.testing.assert_array_equal, new, cache)
    with pytest.raises(ValueError, match="past the KV cache"):
        core.decode(CoreInputs(jnp.zeros((B, 1, 16)), x, kv, kv, jnp.array([5])), cache, 5,
                    policy)


@functools.cache
def _decoder() -> Decoder:
    cfg = DecoderConfig(vocab_size=32, d_model=32, num_heads=HQ, num_kv_heads=HKV, mlp_dim=32,
                        num_layers=2, positions="rope", implementation="reference")
    return Decoder(cfg, rngs=nnx.Rngs(0))


def test_decoder_with_mixed_gates_equals_the_forward_under_per_head_masks():
    t, p, sink, budget = 13, 5, 1, 4
    gates = ((True, False, True, False), (False, False, False, True))
    lam = masks.a_shape(sink, budget - sink)
    per_layer = [masks.per_head([masks.causal() if g else lam for g in row for _ in range(2)])
                 for row in gates]
    tokens = jax.random.randint(jax.random.key(3), (B, t), 0, 32)
    model = _decoder()
    # the reference: the same weights, each layer's heads under their explicit masks
    ref = Decoder(model.cfg, rngs=nnx.Rngs(0))
    for layer, m in zip(ref.layers, per_layer, strict=True):
        layer.attn.core.mask = m
    graphdef, ref_state = nnx.split(ref)
    want = jit(lambda s, x: nnx.merge(graphdef, s)(x))(ref_state, tokens)
    policy = CachePolicy("duo", budget=budget, sink_tokens=sink, head_gates=gates)
    state, prefill, step = decode_fns(model, policy)
    logits, cache = prefill(state, tokens[:, :p], model.init_cache(B, t, policy))
    got = [logits[:, None]]
    for i in range(p, t - 1):
        out, cache = step(state, tokens[:, i:i + 1], cache, i)
        got.append(out)
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(want)[:, p - 1:-1],
                               rtol=2e-5, atol=2e-5)
    assert step.jitted._cache_size() == 1


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_cache_bytes_follow_the_gate_fraction(fraction):
    """Per layer ``2 B Dh bytes (Hf max_len + Hs (S + W))`` vs ``2 B Dh bytes Hkv max_len``."""
    max_len, sink, budget = 64, 2, 10
    n_full = round(fraction * HKV)
    gates = (tuple(h < n_full for h in range(HKV)),)
    model = _decoder()
    full = model.init_cache(B, max_len, CachePolicy())
    duo = model.init_cache(B, max_len, CachePolicy("duo", budget=budget, sink_tokens=sink,
                                                   head_gates=gates))
    itemsize, dh = np.dtype(full[0]["k"].dtype).itemsize, full[0]["k"].shape[-1]
    kv = 2 * 2 * B * dh * itemsize * (n_full * max_len + (HKV - n_full) * budget)
    positions = 2 * 4 * (max_len + budget)  # int32 pos of both buffers, 2 layers
    assert cache_bytes(duo) == kv + positions
    assert cache_bytes(full) == 2 * 2 * B * dh * itemsize * HKV * max_len + 2 * 4 * max_len
    ratio = kv / (2 * 2 * B * dh * itemsize * HKV * max_len)
    assert ratio == pytest.approx(fraction + (1 - fraction) * budget / max_len)


def test_ring_never_exceeds_max_len():
    model = _decoder()
    cache = model.init_cache(1, 6, CachePolicy("duo", budget=20, head_gates=GATES))
    assert cache[0]["stream_k"].shape[1] == 6 and cache[0]["stream_pos"].shape == (6,)


def test_masked_reference_is_a_real_reference():
    """Guard: the reference differs from full attention here (the mask hides something)."""
    core = _core("softmax", "rope")
    duo = CachePolicy("duo", budget=4, sink_tokens=1, head_gates=GATES)
    every = CachePolicy("duo", budget=4, sink_tokens=1, head_gates=((True,) * HKV,))
    a, _ = _run(core, duo, [10], 10, reference=True)
    b, _ = _run(core, every, [10], 10, reference=True)
    assert not np.allclose(a, b)
    assert dataclasses.replace(duo, head_gates=GATES) == duo


# --- gate learning (the paper's distillation objective) -----------------------------------------
def _tiny(num_layers: int = 2) -> Decoder:
    cfg = DecoderConfig(vocab_size=16, d_model=16, num_heads=4, num_kv_heads=2, mlp_dim=16,
                        num_layers=num_layers, positions="rope", implementation="reference")
    return Decoder(cfg, rngs=nnx.Rngs(1))


def test_mixed_forward_with_every_gate_open_is_the_model():
    model = _tiny()
    tokens = passkey_batches(jax.random.key(0), 1, 2, 16, 16, passkey_len=2)[0]
    graphdef, state = nnx.split(model)

    @jit
    def both(state, tokens):
        m = nnx.merge(graphdef, state)
        h = mixed_hidden(m, tokens, jnp.ones((2, 2)), sink_tokens=1, window=3)
        return m.embed.attend(h), m(tokens)

    got, want = both(state, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_learned_gates_lower_the_loss_and_threshold_into_head_gates():
    model = _tiny()
    batches = passkey_batches(jax.random.key(1), 2, 2, 24, 16, passkey_len=2)
    before = jax.tree.map(np.asarray, nnx.state(model))
    out = learn_duo_gates(model, batches, 30, sink_tokens=1, window=3, init=0.0, l1=1e-3,
                          learning_rate=0.05)
    assert out.alpha.shape == (2, 2) and np.all((out.alpha >= 0) & (out.alpha <= 1))
    assert out.distill[-1] < 0.5 * out.distill[0]  # from all-streaming towards the full model
    assert out.losses[-2:].mean() < out.losses[:2].mean()
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                     nnx.state(model)))  # frozen
    gates = gates_from_alpha(out.alpha, 0.5)
    assert len(gates) == 2 and all(len(row) == 2 for row in gates)
    policy = CachePolicy("duo", budget=4, sink_tokens=1, head_gates=gates)
    assert generate(model, batches[0][:, :8], 3, policy=policy).shape == (2, 11)
    with pytest.raises(ValueError, match="alpha"):
        gates_from_alpha(np.full((2, 2), 1.5))


def test_the_only_head_that_reaches_the_output_keeps_the_highest_gate():
    """Only query heads 2, 3 (KV head 1) of layer 1 write to the residual stream (the other
    heads' output projections are zeroed): the other gates get no distillation signal and the
    L1 penalty closes them; KV head 1 of layer 1 stays open."""
    model = _tiny()
    for i, layer in enumerate(model.layers):
        w = layer.attn.o_proj.kernel
        keep = jnp.zeros((4, 1, 1)).at[2:].set(1.0 if i == 1 else 0.0)
        w[...] = w[...] * keep
    batches = passkey_batches(jax.random.key(2), 2, 4, 32, 16, passkey_len=2)
    out = learn_duo_gates(model, batches, 60, sink_tokens=1, window=3, l1=1e-3)
    others = np.delete(out.alpha.ravel(), 3)
    assert out.alpha[1, 1] > 0.5 and np.all(others < 0.1), out.alpha
    assert gates_from_scores(out.alpha, 0.25) == ((False, False), (False, True))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(init=1.5), "init"), (dict(l1=-1.0), "l1"),
    (dict(last_tokens=0), "last_tokens"), (dict(batches=[]), "batches"),
])
def test_learn_duo_gates_bad_arguments_raise_naming_them(kwargs, match):
    args = dict(batches=[jnp.ones((1, 8), jnp.int32)], steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        learn_duo_gates(_tiny(1), args.pop("batches"), args.pop("steps"), **args)
