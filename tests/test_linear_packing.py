"""Packed variable-length sequences: ``segment_ids`` on every ``jattn.linear`` sequence function
equals running each segment on its own (state restarted from zero), in every implementation,
forward and gradients, without recompiling when the boundaries move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
from jattn.testing import assert_close
from tests.linear_runners import runners

B, T, H, K, V, CHUNK = 2, 40, 2, 8, 6, 8
# Row 0: boundaries at chunk edges (8, 16), several inside one chunk (11, 13, 14) and near the
# end; row 1: a single restart inside a chunk. Ids may recur: a change of id is a new segment.
SEGMENTS = np.array(
    [
        [0] * 8 + [1] * 3 + [2] * 2 + [3] * 1 + [4] * 2 + [5] * 13 + [0] * 10 + [7],
        [3] * 21 + [9] * 19,
    ],
    np.int32,
)


def inputs(seed, gate):
    rng = np.random.default_rng(seed)
    q, k, a, b = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((4, B, T, H, K)))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    a, b = 0.1 * a, 0.1 * b
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.05, 0.95, (B, T, H)), jnp.float32)
    g = None
    if gate is not None:
        shape = (B, T, H, K) if gate == "channel" else (B, T, H)
        g = jnp.asarray(np.log(rng.uniform(0.5, 0.999, shape)), jnp.float32)
    S0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    return dict(q=q, k=k, v=v, a=a, b=b, beta=beta, g=g), S0


# name -> (function of (token inputs, initial_state, segment_ids, implementation), gate kind)
_gla, _delta, _dplr, _linear = runners(CHUNK)


CASES = {
    "gla_channel": (_gla, "channel"),
    "gla_scalar": (_gla, "scalar"),
    "deltanet": (_delta, None),
    "kda": (_delta, "channel"),
    "dplr_none": (_dplr, None),
    "dplr_channel": (_dplr, "channel"),
    "linear_relu": (_linear, None),
}


def run_separately(fn, x, S0, segments):
    """Each segment of each row on its own with the reference form (initial_state for the first
    segment of a row, zeros for the others; the final state is the row's last segment's).

    All segments run as one batch, each front-padded to ``T`` with zero inputs (``k = a = b = 0``,
    ``g = 0``; relu features of 0 are 0), which leave the state as it is: one compile per case.
    """
    inits, where = [], []  # where: (row, start, end, is_last)
    for row in range(B):
        ids = segments[row]
        starts = [0] + [t for t in range(1, T) if ids[t] != ids[t - 1]] + [T]
        for n, (s, e) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            where.append((row, s, e, e == T))
            inits.append(S0[row] if n == 0 else jnp.zeros_like(S0[row]))
    batch = {}
    for name, val in x.items():
        if val is None:
            batch[name] = None
            continue
        rows = []
        for row, s, e, _ in where:
            piece = val[row, s:e]
            rows.append(jnp.concatenate([jnp.zeros((T - (e - s),) + piece.shape[1:]), piece]))
        batch[name] = jnp.stack(rows)
    o_all, S_all = fn(batch, jnp.stack(inits), None, "reference")
    o = jnp.zeros(x["v"].shape)
    last = [None] * B
    for i, (row, s, e, is_last) in enumerate(where):
        o = o.at[row, s:e].set(o_all[i, T - (e - s):])
        if is_last:
            last[row] = i
    return o, jax.tree.map(lambda leaf: leaf[jnp.asarray(last)], S_all)


@pytest.mark.parametrize("impl", ["reference", "recurrent", "chunk"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_separate_runs(case, impl):
    fn, gate = CASES[case]
    x, S0 = inputs(0, gate)
    o, S = fn(x, S0, jnp.asarray(SEGMENTS), impl)
    o_sep, S_sep = run_separately(fn, x, S0, SEGMENTS)
    assert_close(o, o_sep, name="o")
    for got, want in zip(jax.tree.leaves(S), jax.tree.leaves(S_sep), strict=True):
        assert_close(got, want, name="final_state")


def test_many_segments_per_chunk_stay_tight():
    """1-3 token segments throughout 32-step chunks with strong per-channel gates: the chunk
    form masks pairs across segments exactly (no -inf gate whose cumulative sums lose bits)."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 4, size=T)
    seg = np.repeat(np.arange(T), lengths)[:T][None].repeat(B, 0).astype(np.int32)
    x, S0 = inputs(2, "channel")
    x["g"] = jnp.asarray(np.log(rng.uniform(1e-3, 0.5, (B, T, H, K))), jnp.float32)
    for fn in (_gla, _delta, _dplr):
        kw = dict(initial_state=S0, output_final_state=True, segment_ids=jnp.asarray(seg))
        if fn is _gla:
            o = L.gla(x["q"], x["k"], x["v"], x["g"], chunk_size=32, **kw)[0]
            r = L.gla(x["q"], x["k"], x["v"], x["g"], implementation="reference", **kw)[0]
        elif fn is _delta:
            o = L.delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], chunk_size=32, **kw)[0]
            r = L.delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"],
                             implementation="reference", **kw)[0]
        else:
            o = L.dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], g=x["g"],
                                  chunk_size=32, **kw)[0]
            r = L.dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], g=x["g"],
                                  implementation="reference", **kw)[0]
        assert_close(o, r, rtol=2e-6, atol=0.0, name=fn.__name__)


@pytest.mark.parametrize("case", ["gla_channel", "kda", "dplr_channel"])
def test_packed_gradients_match_reference(case):
    fn, gate = CASES[case]
    x, S0 = inputs(3, gate)
    seg = jnp.asarray(SEGMENTS)
    names = [n for n in ("q", "k", "v", "a", "b", "beta", "g") if x[n] is not None]

    def grads(impl):
        def loss(vals, S0):
            o, S = fn({**x, **dict(zip(names, vals, strict=True))}, S0, seg, impl)
            return jnp.sum(o * o) + jnp.sum(S * S)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))([x[n] for n in names], S0)

    (got, dS0), (want, dS0_r) = grads("chunk"), grads("reference")
    for name, a, b in zip(names, got, want, strict=True):
        assert_close(a, b, rtol=1e-4, name=f"d{name}")
    assert_close(dS0, dS0_r, rtol=1e-4, name="dS0")


def test_moving_boundaries_does_not_recompile():
    x, S0 = inputs(4, "channel")
    traces = []

    @jax.jit
    def f(x, S0, seg):
        traces.append(1)
        return _dplr(x, S0, seg, "chunk")[0]

    o1 = f(x, S0, jnp.asarray(SEGMENTS))
    shifted = np.roll(SEGMENTS, 3, axis=1)
    o2 = f(x, S0, jnp.asarray(shifted))
    assert len(traces) == 1
    assert_close(o2, run_separately(_dplr, x, S0, shifted)[0])
    assert not np.allclose(o1, o2)


def test_one_segment_is_no_segments():
    x, S0 = inputs(5, "scalar")
    o, S = _delta(x, S0, jnp.zeros((B, T), jnp.int32), "chunk")
    o_n, S_n = _delta(x, S0, None, "chunk")
    assert_close(o, o_n)
    assert_close(S, S_n)


def test_unsupported_combinations_raise():
    x, S0 = inputs(6, "channel")
    seg = jnp.asarray(SEGMENTS)
    with pytest.raises(NotImplementedError, match="context_axis"):
        L.gla(x["q"], x["k"], x["v"], x["g"], segment_ids=seg, context_axis="context")
    with pytest.raises(NotImplementedError, match="causal=True"):
        L.linear_attention(x["q"], x["k"], x["v"], causal=False, segment_ids=seg)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
        L.gla(x["q"], x["k"], x["v"], x["g"], segment_ids=seg[:, :5])
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        L.gla(x["q"], x["k"], x["v"], x["g"], segment_ids=seg.astype(jnp.float32))
