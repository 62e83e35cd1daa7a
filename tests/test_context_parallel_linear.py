"""Context parallelism for jattn.linear: T split over a mesh axis equals the unsplit call.

8 simulated CPU devices (tests/conftest.py). Each case runs the split and the unsplit call,
forward and gradients w.r.t. every input (including the initial state and the gates) under ONE
jit, fp32, and compares outputs, final states and gradients.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jattn.linear as L
from jattn.testing import assert_close

B, H, K, V = 2, 2, 8, 6
CHUNK = 4


def mesh_of(shape: dict) -> Mesh:
    n = int(np.prod(list(shape.values())))
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    devices = np.array(jax.devices()[:n]).reshape(tuple(shape.values()))
    return Mesh(devices, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def inputs(seed, T, gate, strength, *, delta=False):
    """q, k, v, (beta), g (or None), S0 from numpy's RNG. Gates: log-decays in [-strength, 0]."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    xs = {"q": f(B, T, H, K), "k": f(B, T, H, K), "v": f(B, T, H, V), "S0": f(B, H, K, V)}
    if delta:
        xs["beta"] = jnp.asarray(rng.uniform(0.1, 0.9, (B, T, H)), jnp.float32)
    if gate is not None:
        shape = (B, T, H, K) if gate == "channel" else (B, T, H)
        xs["g"] = jnp.asarray(-strength * rng.uniform(size=shape), jnp.float32)
    return xs


def split_vs_unsplit(fn, xs, mesh, axis="context"):
    """Value and grads of ``fn(xs, context_axis)`` -> (o, S) with and without the split.

    The loss contracts o and the final state with fixed random weights, so every output element
    and every gradient path (through the local runs, the all-gather and the prefix scan) counts.
    """

    def loss(xs, context_axis):
        o, S = fn(xs, context_axis)
        S_leaves = jax.tree.leaves(S)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        val = jnp.sum(o * w) + sum(jnp.sum(s * jnp.sin(jnp.arange(s.size) + 1.0).reshape(s.shape))
                                   for s in S_leaves)  # fmt: skip
        return val, (o, S)

    @jax.jit
    def both(xs):
        ref = jax.value_and_grad(loss, has_aux=True)(xs, None)
        cp = jax.value_and_grad(loss, has_aux=True)(xs, axis)
        return ref, cp

    with jax.set_mesh(mesh):
        ((_, (o_ref, S_ref)), g_ref), ((_, (o_cp, S_cp)), g_cp) = both(xs)
    assert_close(o_cp, o_ref, name="o")
    for a, b in zip(jax.tree.leaves(S_cp), jax.tree.leaves(S_ref), strict=True):
        assert_close(a, b, name="final_state")
    for name in xs:
        assert_close(g_cp[name], g_ref[name], name=f"grad {name}")
    return o_cp


def run_gla(xs, context_axis, implementation=None, chunk_size=CHUNK):
    return L.gla(
        xs["q"], xs["k"], xs["v"], xs["g"], initial_state=xs.get("S0"), output_final_state=True,
        chunk_size=chunk_size, implementation=implementation, context_axis=context_axis,
    )  # fmt: skip


def run_delta(xs, context_axis, implementation=None, chunk_size=CHUNK):
    return L.delta_rule(
        xs["q"], xs["k"], xs["v"], xs["beta"], g=xs.get("g"), initial_state=xs.get("S0"),
        output_final_state=True, use_qk_l2norm=True, chunk_size=chunk_size,
        implementation=implementation, context_axis=context_axis,
    )  # fmt: skip


@pytest.mark.parametrize(
    "n, gate, strength, with_state",
    [
        (2, "channel", 5.0, True),  # strong per-channel decay (GLA)
        (4, "scalar", 0.05, True),  # weak scalar decay (RetNet / Mamba2-style)
        (8, "channel", 0.05, False),  # weak per-channel, zero initial state, 4 steps per device
        (8, "scalar", 5.0, True),
    ],
)
def test_gla_matches_unsplit(n, gate, strength, with_state):
    xs = inputs(n, 32, gate, strength)
    if not with_state:
        del xs["S0"]
    o = split_vs_unsplit(run_gla, xs, mesh_of({"context": n}))
    assert o.sharding.spec == P(None, "context")


def test_context_axis_may_be_a_tuple_of_axes():
    """T split over two mesh axes at once (2 x 4 = 8 shards, "x" major)."""
    xs = inputs(40, 32, "channel", 1.0)
    split_vs_unsplit(run_gla, xs, mesh_of({"x": 2, "context": 4}), axis=("x", "context"))


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["gla", "delta_rule"])
def test_pallas_local_kernels_under_the_split(fn):
    """The Pallas kernels (interpret mode on CPU) as the local implementation inside the
    shard_map: forward and gradients equal the unsplit chunk form."""
    xs = inputs(50, 32, "channel", 1.0, delta=fn == "delta_rule")
    run = run_gla if fn == "gla" else run_delta

    def mixed(xs, context_axis):  # unsplit: the chunk form; split: the Pallas kernel per device
        return run(xs, context_axis, "chunk" if context_axis is None else "pallas", 16)

    split_vs_unsplit(mixed, xs, mesh_of({"context": 2}))


@pytest.mark.parametrize(
    "n, gate, strength",
    [
        (2, None, 0.0),  # DeltaNet
        (4, "scalar", 0.05),  # Gated DeltaNet, weak gate
        (8, "channel", 5.0),  # KDA, strong gate
    ],
)
def test_delta_rule_matches_unsplit(n, gate, strength):
    xs = inputs(10 + n, 32, gate, strength, delta=True)
    split_vs_unsplit(run_delta, xs, mesh_of({"context": n}))


@pytest.mark.parametrize(
    "n, causal, normalize", [(2, True, True), (4, True, False), (8, False, True), (4, False, False)]
)
def test_linear_attention_matches_unsplit(n, causal, normalize):
    xs = inputs(20 + n, 32, None, 0.0)
    S0 = xs.pop("S0")
    xs["kv0"], xs["z0"] = jnp.abs(S0[..., :V]), jnp.abs(S0[..., 0])

    def run(xs, context_axis):
        o, st = L.linear_attention(
            xs["q"], xs["k"], xs["v"], causal=causal, normalize=normalize,
            initial_state=L.LinearAttentionState(xs["kv0"], xs["z0"]), output_final_state=True,
            chunk_size=CHUNK, context_axis=context_axis,
        )  # fmt: skip
        return o, (st.kv, st.z)

    split_vs_unsplit(run, xs, mesh_of({"context": n}))


def test_other_mesh_axes_stay_automatic():
    """A 2-D mesh (data=2, context=4), batch sharded over data: same result, o keeps both."""
    mesh = mesh_of({"data": 2, "context": 4})
    xs = inputs(30, 32, "scalar", 1.0)
    with jax.set_mesh(mesh):
        sharded = {
            name: jax.device_put(x, NamedSharding(mesh, P("data", "context") if x.ndim == 4 and
                                 name != "S0" else P("data")))
            for name, x in xs.items()
        }  # fmt: skip
    o = split_vs_unsplit(run_gla, sharded, mesh)
    assert o.sharding.spec == P("data", "context")


def collectives(fn, xs, mesh):
    """Shapes of the cross-device collectives in the compiled forward + backward."""
    with jax.set_mesh(mesh):
        step = jax.jit(jax.grad(lambda xs: jnp.sum(fn(xs, "context")[0])))
        hlo = step.lower(xs).compile().as_text()
    ops = r"(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
    return sorted(re.findall(r"= (\S+) " + ops + r"(?:-start)?\(", hlo))


def test_communication_is_independent_of_T():
    """The same collectives, of the same sizes, at T = 32 and T = 128: O(n K V), not O(T).

    The delta rule (its summaries include the K x K transition); GLA and linear attention use
    the same combine with smaller summaries.
    """
    mesh = mesh_of({"context": 4})
    small = collectives(run_delta, inputs(0, 32, "scalar", 1.0, delta=True), mesh)
    large = collectives(run_delta, inputs(0, 128, "scalar", 1.0, delta=True), mesh)
    assert any("all-gather" in op for _, op in small), small
    assert small == large


def test_bad_context_axis_raises():
    xs = inputs(0, 30, "scalar", 1.0)
    args = (xs["q"], xs["k"], xs["v"], xs["g"])
    with pytest.raises(ValueError, match=r"context_axis='context'.*jax.set_mesh"):
        L.gla(*args, context_axis="context")
    with jax.set_mesh(mesh_of({"context": 4})):
        with pytest.raises(ValueError, match=r"T=30, not divisible by 4"):
            L.gla(*args, context_axis="context")
        with pytest.raises(ValueError, match=r"context_axis='seq'.*\('context',\)"):
            L.delta_rule(*args[:3], jnp.ones(args[3].shape) * 0.5, context_axis="seq")
        with pytest.raises(ValueError, match=r"not divisible by 4"):
            L.linear_attention(*args[:3], context_axis="context")
