"""jattn.linear under adversarial input (issue 15, items 1, 2, 4 and 8).

* Full resets (``g = -inf``): every implementation agrees with the reference scan, forward
  and gradients (q, k, v, g, beta, initial_state), scalar and per-channel gates.
* Positive (or NaN) gates with concrete values: a ValueError naming the gate, everywhere.
* Empty sequences / batches: correctly shaped empty outputs, final state = initial state,
  zero gradients, in every implementation.
* The delta rule's stability bound ``0 <= beta |k|^2 <= 2``: a warning on concrete inputs
  that violate it, and the README example stays finite.
"""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn.linear as L
import pallas_kernels
from jattn.testing import assert_close

F32 = jnp.float32
IMPLS = ("reference", "recurrent", "chunk", "pallas")
_FAST = {"xla_backend_optimization_level": 0}  # interpret-mode kernels are compile-bound


# ----------------------------------------------------------------------------- 1: g = -inf


def _reset_inputs(gate, seed=0, B=1, T=40, H=2, K=8, V=8):
    """Inputs whose gates hold -inf (full resets) at the sequence start, inside a chunk, on
    the last and first step of a chunk (chunk 16), plus one finite gate below the chunk
    forms' floor; per-channel gates also reset only some channels."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)  # beta |k|^2 < 2: a stable delta rule
    v = rng.standard_normal((B, T, H, V))
    beta = rng.uniform(0.1, 0.9, (B, T, H))
    s0 = rng.standard_normal((B, H, K, V))
    if gate == "scalar":
        g = -rng.uniform(0.0, 1.0, (B, T, H))
        g[:, [0, 5, 15, 16, 33]] = -np.inf
        g[:, 22, 0] = -300.0
    else:
        g = -rng.uniform(0.0, 1.0, (B, T, H, K))
        g[:, 0, :, 1] = -np.inf
        g[:, 5] = -np.inf
        g[:, 15, :, ::3] = -np.inf
        g[:, 16, 1, ::2] = -np.inf
        g[:, 31, 0] = -np.inf
        g[:, 22, 0, 2] = -300.0
    return tuple(jnp.asarray(x, F32) for x in (q, k, v, beta, g, s0))


def _loss_weights(shape_o, shape_s, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape_o), F32), jnp.asarray(
        rng.standard_normal(shape_s), F32
    )


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("mech", ["gla", "delta_rule"])
def test_full_reset_gates_match_reference(mech, gate):
    q, k, v, beta, g, s0 = _reset_inputs(gate)
    w_o, w_s = _loss_weights(v.shape, s0.shape)

    def run(impl, q, k, v, beta, g, s0):
        kw = dict(initial_state=s0, output_final_state=True, chunk_size=16, implementation=impl)
        if mech == "gla":
            return L.gla(q, k, v, g, **kw)
        return L.delta_rule(q, k, v, beta, g=g, **kw)

    def all_impls(*args):
        out = {}
        for impl in IMPLS:

            def loss(*a, impl=impl):
                o, s = run(impl, *a)
                return jnp.sum(o * w_o) + jnp.sum(s * w_s), (o, s)

            (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*args)
            out[impl] = (o, s, grads)
        return out

    args = (q, k, v, beta, g, s0)
    out = jax.jit(all_impls).lower(*args).compile(compiler_options=_FAST)(*args)
    ref_o, ref_s, ref_grads = out["reference"]
    names = ("q", "k", "v", "beta", "g", "initial_state")
    for impl in IMPLS[1:]:
        o, s, grads = out[impl]
        assert_close(o, ref_o, name=f"{impl} o")
        assert_close(s, ref_s, name=f"{impl} final_state")
        for name, a, e in zip(names, grads, ref_grads, strict=True):
            if mech == "gla" and name == "beta":
                continue
            assert_close(a, e, name=f"{impl} d{name}")
    # A full reset hides everything before it: d(loss)/dg is 0 exactly at the -inf entries.
    dg = ref_grads[4]
    assert bool(jnp.all(jnp.where(jnp.isneginf(g), dg == 0, True)))


def test_full_reset_issue_repro():
    """The issue's repro: a scalar -inf at step 5 of 20, chunk 16 (NaN in chunk and pallas)."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 20, 2, 4)), F32) for _ in range(3))
    g = jnp.full((1, 20, 2), -0.5).at[:, 5].set(-jnp.inf)
    ref, _ = L.gla(q, k, v, g, implementation="reference")
    for impl in ("chunk", "pallas"):
        o, _ = L.gla(q, k, v, g, chunk_size=16, implementation=impl)
        assert_close(o, ref, name=impl)


# ----------------------------------------------------------------------------- 2: g > 0


def _small(B=1, T=4, H=2, K=4, V=3):
    rng = np.random.default_rng(5)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)) / 2, F32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), F32)
    return q, k, v, jnp.full((B, T, H), 0.5, F32)


BAD_GATES = {"positive": 0.25, "nan": float("nan"), "+inf": float("inf")}


@pytest.mark.parametrize("bad", list(BAD_GATES))
@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_concrete_bad_gates_raise(gate, bad):
    q, k, v, beta = _small()
    shape = q.shape if gate == "channel" else q.shape[:3]
    where = (0, 2, 1, 0) if gate == "channel" else (0, 2, 1)
    g = jnp.full(shape, -0.1, F32).at[where].set(BAD_GATES[bad])
    calls = {
        f"gla[{impl}]": lambda impl=impl: L.gla(q, k, v, g, implementation=impl) for impl in IMPLS
    }
    calls |= {
        f"delta_rule[{impl}]": lambda impl=impl: L.delta_rule(
            q, k, v, beta, g=g, implementation=impl
        )
        for impl in IMPLS
    }
    calls["gla_step"] = lambda: L.gla_step(q[:, 2], k[:, 2], v[:, 2], g[:, 2])
    calls["delta_rule_step"] = lambda: L.delta_rule_step(
        q[:, 2], k[:, 2], v[:, 2], beta[:, 2], g_t=g[:, 2]
    )
    calls["chunk_gla"] = lambda: pallas_kernels.chunk_gla(q, k, v, g, chunk_size=16)
    calls["chunk_delta_rule"] = lambda: pallas_kernels.chunk_delta_rule(
        q, k, v, beta, g=g, chunk_size=16
    )
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"g(_t)? .*log-decay.*<= 0") as err:
            call()
        assert "1 entr" in str(err.value), name


def test_valid_gates_pass_and_traced_gates_are_not_checked():
    q, k, v, beta = _small()
    g = jnp.full(q.shape[:3], -0.1, F32).at[0, 1].set(-jnp.inf).at[0, 2].set(0.0)
    o, _ = L.gla(q, k, v, g)  # 0 (no decay) and -inf (full reset) are valid
    assert bool(jnp.all(jnp.isfinite(o)))
    # Under jit the values are unknown: no ConcretizationTypeError, no check (documented UB).
    jax.jit(lambda g: L.gla(q, k, v, g)[0])(jnp.abs(g))
    jax.jit(lambda g: L.delta_rule(q, k, v, beta, g=g)[0])(jnp.abs(g))


# ----------------------------------------------------------------------------- 4: sizes


@pytest.mark.parametrize("mech", ["gla", "delta_rule", "linear_attention", "linear_nc"])
@pytest.mark.parametrize("dims", [(1, 0, 2), (0, 5, 2), (2, 3, 0)], ids=["T0", "B0", "H0"])
def test_empty_sizes_give_empty_outputs_and_identity_state(mech, dims):
    B, T, H = dims
    K, V = 4, 3
    q = jnp.ones((B, T, H, K), F32)
    v = jnp.ones((B, T, H, V), F32)
    g = -jnp.ones((B, T, H), F32)
    beta = jnp.full((B, T, H), 0.5, F32)
    s0 = jnp.asarray(np.random.default_rng(0).standard_normal((B, H, K, V)), F32)
    z0 = jnp.ones((B, H, K), F32)
    for impl in IMPLS:
        if mech == "linear_nc" and impl == "pallas":
            continue  # no non-causal kernel (NotImplementedError by design)

        def run(q, k, v, s0, impl=impl):
            kw = dict(output_final_state=True, chunk_size=16, implementation=impl)
            if mech == "gla":
                return L.gla(q, k, v, g, initial_state=s0, **kw)
            if mech == "delta_rule":
                return L.delta_rule(q, k, v, beta, initial_state=s0, **kw)
            o, st = L.linear_attention(
                q, k, v, causal=mech == "linear_attention", initial_state=(s0, z0), **kw
            )
            return o, st.kv

        def loss(q, k, v, s0, impl=impl):
            o, s = run(q, k, v, s0, impl)
            return jnp.sum(o) + jnp.sum(s * s0), (o, s)

        (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(4), has_aux=True)(q, q, v, s0)
        assert o.shape == (B, T, H, V) and o.dtype == F32, impl
        assert s.shape == (B, H, K, V) and s.dtype == F32, impl
        dq, dk, dv, ds0 = grads
        assert dq.shape == q.shape and dv.shape == v.shape and ds0.shape == s0.shape, impl
        for x in (dq, dk, dv):
            assert not bool(jnp.any(x)), impl  # empty, or (T = 0) nothing to differentiate
        if T == 0:  # nothing happened: the final state is the initial one, d/dS0 = identity
            np.testing.assert_array_equal(s, s0, err_msg=impl)
            np.testing.assert_array_equal(ds0, 2 * s0, err_msg=impl)


# ----------------------------------------------------------------------------- 8: stability


def test_readme_delta_rule_example_is_finite_without_warning():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text().splitlines()
    x_line = next(s for s in readme if s.startswith("x = jnp.ones("))
    delta_line = next(s for s in readme if "jattn.linear.delta_rule(" in s)
    env = {"jnp": jnp, "jattn": __import__("jattn")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.UnstableDeltaRuleWarning)
        exec(x_line.replace("1024", "40") + "\n" + delta_line, env)
    assert bool(jnp.all(jnp.isfinite(env["o"])))


def test_unstable_delta_rule_warns_on_concrete_inputs():
    x = jnp.ones((1, 6, 2, 8), F32)  # |k|^2 = 8, beta |k|^2 = 4 > 2: the state blows up
    beta = jnp.full((1, 6, 2), 0.5, F32)
    with pytest.warns(L.UnstableDeltaRuleWarning, match=r"beta \* \|k\|\^2.*use_qk_l2norm"):
        L.delta_rule(x, x, x, beta)
    with pytest.warns(L.UnstableDeltaRuleWarning, match="12 of 12"):
        L.delta_rule(x, x, x, -beta, use_qk_l2norm=True)  # negative beta grows the state too
    with pytest.warns(L.UnstableDeltaRuleWarning):
        L.delta_rule_step(x[:, 0], x[:, 0], x[:, 0], beta[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.UnstableDeltaRuleWarning)
        L.delta_rule(x, x, x, beta, use_qk_l2norm=True)  # |k|^2 < 1
        L.delta_rule(x, x / np.sqrt(8), x, 4 * beta)  # beta |k|^2 = 2: the bound itself
        L.delta_rule_step(x[:, 0], x[:, 0], x[:, 0], beta[:, 0], use_qk_l2norm=True)
        jax.jit(lambda x: L.delta_rule(x, x, x, beta)[0])(x)  # traced: not checked
    assert issubclass(L.UnstableDeltaRuleWarning, RuntimeWarning)


def test_zero_value_dim_is_empty_and_zero_key_dim_is_rejected():
    q = jnp.ones((1, 5, 2, 4), F32)
    g = -jnp.ones((1, 5, 2), F32)
    beta = jnp.full((1, 5, 2), 0.5, F32)
    v0 = jnp.ones((1, 5, 2, 0), F32)
    q0 = jnp.ones((1, 5, 2, 0), F32)
    for impl in IMPLS:
        kw = dict(output_final_state=True, chunk_size=16, implementation=impl)
        for o, s in (
            L.gla(q, q, v0, g, **kw),
            L.delta_rule(q, q, v0, beta, **kw),
            (L.linear_attention(q, q, v0, **kw)[0], None),
        ):
            assert o.shape == (1, 5, 2, 0), impl
            assert s is None or s.shape == (1, 2, 4, 0), impl
        with pytest.raises(ValueError, match="head dim K >= 1"):
            L.gla(q0, q0, q, g, **kw)
        with pytest.raises(ValueError, match="head dim K >= 1"):
            L.delta_rule(q0, q0, q, beta, **kw)
        with pytest.raises(ValueError, match="head dim K >= 1"):
            L.linear_attention(q0, q0, q, **kw)
