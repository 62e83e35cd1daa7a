"""Parallel structure of the Pallas chunk kernels: the grid of every pass (state pass over
(B*H, V tiles[, K tiles]) with the chunk axis sequential inside; outputs over (B*H, chunk[,
V tiles]), gradients over (B*H, chunk)), and exactness with the state tiled over both K and
V (GLA), forward, final state and every gradient, plain and packed, on both sequential
drivers (interpret mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import _chunk_state
from tests.test_chunk_pallas import _export, check, make, run_pair, scan_gla

F32 = jnp.float32


def _pallas_grids(fn, *args):
    """{kernel name: (grid, TPU dimension semantics or None)} of every pallas_call in fn."""
    found = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                params = eqn.params["compiler_params"]
                sem = getattr(params, "dimension_semantics", None) if params else None
                sem = getattr(params.get("mosaic_tpu"), "dimension_semantics", sem) if isinstance(
                    params, dict) else sem
                found[eqn.params["name"]] = (tuple(eqn.params["grid_mapping"].grid), sem)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _fwd_bwd(fn):
    return jax.grad(lambda *a: jnp.sum(fn(*a)[0].astype(F32)), argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("backend", ["cuda", "tpu"])
def test_pass_grids(backend):
    """Issue 22's layout at a small T: B=1, H=2, K=V=128 (GPU) / 256 (TPU: 128-lane tiles),
    chunk 64, T=256 (4 chunks). GLA's state passes tile V and K, the delta rule's V only."""
    bh, t, c = 2, 256, 64
    d = 128 if backend == "cuda" else 256
    tiles_v, tiles_k = (4, 2) if backend == "cuda" else (2, 2)
    q = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((1, t, 2, d), F32)
    beta = jax.ShapeDtypeStruct((1, t, 2), F32)
    kw = dict(chunk_size=c, backend=backend, interpret=True)
    gla = _pallas_grids(_fwd_bwd(lambda q, k, v, g: pallas_kernels.chunk_gla(q, k, v, g, **kw)),
                        q, q, q, g)
    kda = _pallas_grids(_fwd_bwd(lambda q, k, v, g, b: pallas_kernels.chunk_delta_rule(
        q, k, v, b, g=g, **kw)), q, q, q, g, beta)
    seq = (bh, tiles_v, tiles_k) + ((t // c,) if backend == "tpu" else ())
    seq_delta = (bh, tiles_v, 1) + ((t // c,) if backend == "tpu" else ())
    for name in ("chunk_states_fwd", "chunk_states_bwd"):
        assert gla[name][0] == seq, (name, gla[name])
        assert kda[name][0] == seq_delta, (name, kda[name])
    gdn = _pallas_grids(lambda q, k, v, b: pallas_kernels.chunk_delta_rule(
        q, k, v, b, g=b, **kw), q, q, q, beta)
    # outputs: per-channel gates (and TPU) keep the full V; scalar gates on GPU tile V by 64
    for grids in (gla, kda):
        assert grids["chunk_output_fwd"][0] == (bh, t // c, 1), grids["chunk_output_fwd"]
        assert grids["chunk_grads_bwd"][0] == (bh, t // c, 1), grids["chunk_grads_bwd"]
    tiles_o = 2 if backend == "cuda" else 1
    assert gdn["chunk_output_fwd"][0] == (bh, t // c, tiles_o), gdn["chunk_output_fwd"]
    assert gdn["chunk_states_fwd"][0] == seq_delta, gdn["chunk_states_fwd"]
    if backend == "tpu":
        assert gla["chunk_states_fwd"][1] == ("parallel",) * 3 + ("arbitrary",)
        assert gla["chunk_output_fwd"][1] == ("parallel",) * 3


def _gla(q, k, v, g, s0, seg=None, backend=None):
    return pallas_kernels.chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                                    chunk_size=16, segment_ids=seg, backend=backend)


@pytest.mark.parametrize("backend", [None, "tpu"])
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_gla_state_tiled_over_k_and_v(gate, backend, monkeypatch):
    """K = V = 32 with 16-wide tiles: 2 x 2 state tiles per head (the TPU driver's
    128-lane rule is lowered to 16 here so that interpret mode runs its tiled grid)."""
    if backend == "tpu":
        monkeypatch.setattr(_chunk_state, "_tile", lambda cfg, dim, gpu: 16 if dim > 16 else dim)
    q, k, v, _, g, s0 = make(11, 37, 32, 32, gate, 30.0)
    kern = lambda q, k, v, g, s0: _gla(q, k, v, g, s0, backend=backend)
    orac = lambda q, k, v, g, s0: scan_gla(q, k, v, g, 32**-0.5, s0)
    res = run_pair(kern, orac, (q, k, v, g, s0), (0, 1, 2, 3, 4))
    check(res, "q k v g initial_state".split(), F32)


def test_gla_state_tiled_packed():
    """Tiled state (2 x 2 tiles) with segments, forward and every gradient, against the scan
    with the gate at each segment start set to -inf (a full reset: the packed semantics)."""
    q, k, v, _, g, s0 = make(12, 40, 32, 32, "channel", 4.0)
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 2, 3]]), [9, 14, 1, 16], axis=1))
    starts = jnp.concatenate([jnp.zeros((1, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    kern = lambda q, k, v, g, s0: _gla(q, k, v, g, s0, seg=ids)
    orac = lambda q, k, v, g, s0: scan_gla(
        q, k, v, jnp.where(starts[:, :, None, None], -jnp.inf, g), 32**-0.5, s0)
    res = run_pair(kern, orac, (q, k, v, g, s0), (0, 1, 2, 3, 4))
    check(res, "q k v g initial_state".split(), F32)


def test_tpu_tiles_cross_lower():
    """K = V = 256 on TPU: 128-lane state tiles (GLA: 2 x 2 per head; KDA: 2 V tiles)
    lower through Mosaic TPU, forward and backward, GLA and KDA."""
    t, d = 128, 256
    q = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((1, t, 2, d), F32)
    beta = jax.ShapeDtypeStruct((1, t, 2), F32)
    kw = dict(chunk_size=64, backend="tpu", interpret=False)
    gla = _fwd_bwd(lambda q, k, v, g: pallas_kernels.chunk_gla(q, k, v, g, **kw))
    kda = _fwd_bwd(lambda q, k, v, g, b: pallas_kernels.chunk_delta_rule(q, k, v, b, g=g, **kw))
    for fn, args in ((gla, (q, q, q, g)), (kda, (q, q, q, g, beta))):
        text = _export(fn, args, "tpu")
        # the loss's gradient only: the forward's o is dead code, its other kernels are not
        assert text.count("tpu_custom_call") >= 3
