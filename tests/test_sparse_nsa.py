"""NSA (Yuan et al. 2025): learned compression vs a numpy formula, the blocked form vs the
reference (forward and gradients), and the ``"nsa"`` model mechanism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import sparse

B, HQ, HKV, D = 2, 4, 2, 8


def _qkv(seed, t, b=B):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, HQ, D))
    k = jax.random.normal(ks[1], (b, t, HKV, D))
    v = jax.random.normal(ks[2], (b, t, HKV, D))
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, HQ, 3)))
    return q, k, v, gates


def _mlp(seed, l_, d, hidden=6):
    ks = jax.random.split(jax.random.key(seed), 5)
    return {"pos": 0.3 * jax.random.normal(ks[0], (l_, d)),
            "w1": jax.random.normal(ks[1], (l_ * d, hidden)) / np.sqrt(l_ * d),
            "b1": 0.1 * jax.random.normal(ks[2], (hidden,)),
            "w2": jax.random.normal(ks[3], (hidden, d)) / np.sqrt(hidden),
            "b2": 0.1 * jax.random.normal(ks[4], (d,))}


def _gelu(x):  # jax.nn.gelu's default (tanh) approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _compress_numpy(x, l_, d_, mlp):
    """phi per (batch, block, head), written out in float64."""
    x = np.asarray(x, np.float64)
    p = {key: np.asarray(val, np.float64) for key, val in mlp.items()}
    b, t, h, _ = x.shape
    nc = (t - l_) // d_ + 1
    out = np.zeros((b, nc, h, p["w2"].shape[1]))
    for bb in range(b):
        for i in range(nc):
            for hh in range(h):
                blk = x[bb, i * d_: i * d_ + l_, hh] + p["pos"]  # [l, D]
                out[bb, i, hh] = _gelu(blk.reshape(-1) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return out


def _softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def test_learned_compression_and_compressed_branch_match_numpy():
    t, l_, d_ = 24, 8, 4
    q, k, v, gates = _qkv(0, t)
    km, vm = _mlp(1, l_, D), _mlp(2, l_, D)
    got = jax.jit(lambda x: sparse.compress_blocks(x, block_size=l_, stride=d_, mlp=km))(k)
    k_cmp = _compress_numpy(k, l_, d_, km)
    np.testing.assert_allclose(np.asarray(got), k_cmp, atol=2e-5, rtol=2e-5)
    v_cmp = _compress_numpy(v, l_, d_, vm)
    _, br = jax.jit(lambda q, k, v, g: sparse.nsa(
        q, k, v, gates=g, block_size=l_, compress_stride=d_, select_blocks=1, window=4,
        k_compress=km, v_compress=vm, return_branches=True))(q, k, v, gates)
    qn = np.asarray(q, np.float64)
    want = np.zeros(qn.shape)
    g = HQ // HKV
    for bb in range(B):
        for h in range(HQ):
            for ti in range(t):
                vis = [i for i in range(k_cmp.shape[1]) if i * d_ + l_ - 1 <= ti]
                if vis:
                    p = _softmax(k_cmp[bb, vis, h // g] @ qn[bb, ti, h] / np.sqrt(D))
                    want[bb, ti, h] = p @ v_cmp[bb, vis, h // g]
    np.testing.assert_allclose(np.asarray(br["cmp"]), want, atol=2e-5, rtol=2e-5)


def test_nsa_shorter_than_one_block_has_no_compressed_branch():
    # T < block_size: no compressed block is complete; the selected branch is the query's own
    # block (causal attention) and cmp is 0, in both forms
    q, k, v, gates = _qkv(6, 6)
    cfg = dict(block_size=8, compress_stride=4, select_blocks=2, window=3)
    for impl in ("reference", "xla"):
        out, br = sparse.nsa(q, k, v, gates=gates, implementation=impl, return_branches=True,
                             **cfg)
        np.testing.assert_array_equal(np.asarray(br["cmp"]), 0.0)
        causal = jattn.attention(q, k, v, is_causal=True, implementation="reference")
        np.testing.assert_allclose(np.asarray(br["slc"]), np.asarray(causal), atol=1e-5)
        assert np.isfinite(np.asarray(out)).all()


def test_compress_blocks_rejects_bad_mlp_shapes():
    k = jnp.zeros((1, 16, 2, D))
    bad = {**_mlp(0, 8, D), "pos": jnp.zeros((4, D))}
    with pytest.raises(ValueError, match="pos"):
        sparse.compress_blocks(k, block_size=8, stride=4, mlp=bad)
    with pytest.raises(ValueError, match="implementation"):
        sparse.nsa(jnp.zeros((1, 16, 2, D)), k, k, gates=jnp.zeros((1, 16, 2, 3)),
                   block_size=8, compress_stride=4, select_blocks=1, window=4,
                   implementation="pallas")


@pytest.mark.parametrize("t,l_,d_,n_sel,w", [
    (40, 8, 4, 2, 6),
    pytest.param(1100, 64, 32, 2, 48, marks=pytest.mark.slow),  # ~30 s on 2 busy cores
])
def test_blocked_nsa_equals_reference_forward_and_gradients(t, l_, d_, n_sel, w):
    # (1100, 64): three 512-wide kernel tiles, so the run-time tile map is not all True
    b = B if t < 512 else 1
    q, k, v, gates = _qkv(3, t, b)
    if t > 512:  # every query prefers the keys of block 3: the choice stays in kernel tile 0
        u = jax.random.normal(jax.random.key(9), (D,))
        q = q + 2.0 * u
        k = k.at[:, 3 * l_: 4 * l_].add(2.0 * u)
    params = (_mlp(4, l_, D), _mlp(5, l_, D))
    cfg = dict(block_size=l_, compress_stride=d_, select_blocks=n_sel, window=w)

    def loss(impl):
        def f(q, k, v, g, params):
            out = sparse.nsa(q, k, v, gates=g, k_compress=params[0], v_compress=params[1],
                             implementation=impl, **cfg)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    (_, o_ref), g_ref = loss("reference")(q, k, v, gates, params)
    (_, o_blk), g_blk = loss("xla")(q, k, v, gates, params)
    np.testing.assert_allclose(np.asarray(o_blk), np.asarray(o_ref), atol=2e-5, rtol=2e-5)
    # one absolute floor for all: d/d b2 of the keys' MLP is 0 up to fp32 cancellation noise
    floor = 2e-5 * max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(g_ref))
    for a, r in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=floor, rtol=1e-4)
    if t > 512:  # query tile 2 (tokens 1024..1099) selects blocks in key tile 0 only besides
        # its own: key tile 1 is off in the run-time tile map, so the blocked path skips it
        _, br = jax.jit(lambda q, k, v, g: sparse.nsa(q, k, v, gates=g, return_branches=True,
                                                      **cfg))(q, k, v, gates)
        sel = np.asarray(br["selected"])[:, :, 1024:]  # [B, Hkv, 76, ns]
        tiles = np.stack([sel[..., j * 8:(j + 1) * 8].any((-1, -2)) for j in range(2)], -1)
        assert not tiles.all()


def test_nsa_mechanism_trains_and_gates_reach_every_branch():
    from flax import nnx

    from models import Decoder, DecoderConfig

    tokens = jax.random.randint(jax.random.key(8), (2, 24), 0, 32)
    opts = (("nsa_block_size", 8), ("nsa_stride", 4), ("nsa_select", 1), ("nsa_window", 8))
    cfgs = {impl: DecoderConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32,
                                num_layers=1, mlp="none", positions="rope", mechanism="nsa",
                                implementation=impl, attention_options=opts)
            for impl in ("reference", "xla")}
    ref = Decoder(cfgs["reference"], rngs=nnx.Rngs(0))
    blk = Decoder(cfgs["xla"], rngs=nnx.Rngs(0))

    def loss(m):
        return jnp.mean(m(tokens) ** 2)

    l_ref, g_ref = nnx.jit(nnx.value_and_grad(loss))(ref)
    l_blk, g_blk = nnx.jit(nnx.value_and_grad(loss))(blk)
    np.testing.assert_allclose(float(l_blk), float(l_ref), rtol=1e-5)
    core = g_ref["layers"][0]["attn"]["core"]
    for name in ("gate", "k_compress", "v_compress"):
        leaves = jax.tree.leaves(core[name])
        assert leaves and all(float(jnp.abs(x).sum()) > 0 for x in leaves), name
    for a, r in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-4)
