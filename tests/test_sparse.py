"""jattn.sparse: routers vs direct numpy computations, attention over the chosen support vs
the reference with the same support (forward and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _blocked, sparse

B, T, HQ, HKV, D = 2, 60, 4, 2, 8


def _qk(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, t, HQ, D))
    k = jax.random.normal(ks[1], (B, t, HKV, D))
    v = jax.random.normal(ks[2], (B, t, HKV, D))
    return q, k, v


def _moba_numpy(q, k, bq, bk, k_blocks, causal, pooling):
    """MoBA's rule written out per (batch, head, query block)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, hq, _ = q.shape
    g = hq // k.shape[2]
    nq, nk = -(-t // bq), -(-t // bk)
    out = np.zeros((b, hq, nq, nk), bool)
    for bb in range(b):
        for h in range(hq):
            for i in range(nq):
                rows = range(i * bq, min((i + 1) * bq, t))
                qbar = q[bb, list(rows), h].mean(0)
                scored = []
                for j in range(nk):
                    keys = k[bb, j * bk: min((j + 1) * bk, t), h // g]
                    kpool = keys.mean(0) if pooling == "mean" else keys.max(0)
                    future = causal and j * bk > rows[-1]
                    own = j * bk <= rows[-1] and (j + 1) * bk > rows[0]
                    if future:
                        continue
                    if own:
                        out[bb, h, i, j] = True
                    else:
                        scored.append((-qbar @ kpool, j))
                for _, j in sorted(scored)[:k_blocks]:
                    out[bb, h, i, j] = True
    return out


@pytest.mark.parametrize("causal,pooling,bq,bk,kb", [
    (True, "mean", 16, 8, 2), (False, "max", 8, 16, 1), (True, "mean", 4, 4, 3)])
def test_topk_blocks_matches_moba_rule(causal, pooling, bq, bk, kb):
    q, k, _ = _qk()
    route = jax.jit(lambda q, k: sparse.topk_blocks(
        q, k, block_q=bq, block_kv=bk, k_blocks=kb, pooling=pooling,
        mask=jattn.masks.causal() if causal else None))
    got = route(q, k)
    want = _moba_numpy(q, k, bq, bk, kb, causal, pooling)
    np.testing.assert_array_equal(np.asarray(got), want)
    if causal:  # never a future block
        nq, nk = want.shape[2:]
        first_key = np.arange(nk)[None, :] * bk
        last_query = np.minimum((np.arange(nq)[:, None] + 1) * bq, T) - 1
        assert not np.asarray(got)[..., first_key > last_query].any()


def test_moba_attention_xla_matches_reference(monkeypatch):
    # The router's map through the blocked path vs the reference with the same support.
    monkeypatch.setattr(_blocked, "default_block_sizes", lambda tq, tk: (16, 16))
    q, k, v = _qk(1, t=64)
    bq, bk = jattn.attention_block_sizes(64, 64, "xla")
    bm = sparse.topk_blocks(q, k, block_q=bq, block_kv=bk, k_blocks=1, mask=jattn.masks.causal())

    def loss(impl):
        def f(q, k, v):
            o = jattn.attention(q, k, v, mask=jattn.masks.causal(), block_mask=bm,
                                implementation=impl)
            return jnp.sum(o * jnp.sin(o)), o
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, o_x), g_x = loss("xla")
    (_, o_r), g_r = loss("reference")
    for a, b in zip((o_x, *g_x), (o_r, *g_r), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def _indexer_inputs(seed=2, t=24, hi=3, di=5):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, t, hi, di)), jax.random.normal(ks[1], (B, t, di)),
            jax.random.uniform(ks[2], (B, t, hi)))


def test_lightning_indexer_scores_and_selection_match_numpy():
    q_idx, k_idx, w = _indexer_inputs()
    t, top_k = q_idx.shape[1], 5
    index = jax.jit(lambda q, k, w: sparse.lightning_indexer(q, k, w, top_k,
                                                             mask=jattn.masks.causal()))
    scores, idx, valid = (np.asarray(x) for x in index(q_idx, k_idx, w))
    qn, kn, wn = (np.asarray(x, np.float64) for x in (q_idx, k_idx, w))
    for b in range(B):
        for ti in range(t):
            dots = qn[b, ti] @ kn[b, : ti + 1].T  # [H_I, s <= t]
            want = (wn[b, ti][:, None] * np.maximum(dots, 0.0)).sum(0)
            np.testing.assert_allclose(scores[b, ti, : ti + 1], want, rtol=1e-5, atol=1e-5)
            assert np.all(np.isneginf(scores[b, ti, ti + 1:]))
            n = min(top_k, ti + 1)
            assert int(valid[b, ti].sum()) == n
            top = set(np.argsort(-want, kind="stable")[:n].tolist())
            assert set(idx[b, ti][valid[b, ti]].tolist()) == top


def test_gathered_attention_matches_reference_with_the_selection_mask():
    q_idx, k_idx, w = _indexer_inputs(3)
    t = q_idx.shape[1]
    q, k, v = _qk(4, t=t)
    _, idx, valid = jax.jit(lambda *a: sparse.lightning_indexer(
        *a, 4, mask=jattn.masks.causal()))(q_idx, k_idx, w)
    dense = jax.jit(sparse.selection_mask, static_argnums=2)(idx, valid, t)[:, None]

    def loss(fn):
        def f(q, k, v):
            o = fn(q, k, v)
            return jnp.sum(o * jnp.cos(o)), o
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, o_g), g_g = loss(lambda q, k, v: sparse.gathered_attention(q, k, v, idx, valid))
    (_, o_r), g_r = loss(lambda q, k, v: jattn.attention(q, k, v, mask=dense,
                                                         implementation="reference"))
    for a, b in zip((o_g, *g_g), (o_r, *g_r), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def _softmax_rows(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def _nsa_numpy(q, k, v, gates, l_, d_, n_sel, w):
    """NSA's three branches written out per (batch, head, query) in float64."""
    q, k, v, gates = (np.asarray(x, np.float64) for x in (q, k, v, gates))
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    r, scale = l_ // d_, 1 / np.sqrt(d)
    nc, ns = (t - l_) // d_ + 1, -(-t // l_)
    k_cmp = np.stack([k[:, i * d_: i * d_ + l_].mean(1) for i in range(nc)], 1)
    v_cmp = np.stack([v[:, i * d_: i * d_ + l_].mean(1) for i in range(nc)], 1)
    cmp, slc, win = (np.zeros_like(q) for _ in range(3))
    p_slc = np.zeros((b, hq, t, ns))
    for bb in range(b):
        for h in range(hq):
            hk = h // g
            for ti in range(t):
                vis = [i for i in range(nc) if i * d_ + l_ - 1 <= ti]
                if vis:
                    p = _softmax_rows(scale * k_cmp[bb, vis, hk] @ q[bb, ti, h])
                    cmp[bb, ti, h] = p @ v_cmp[bb, vis, hk]
                    p_full = np.zeros(nc)
                    p_full[vis] = p
                    for j in range(ns):
                        p_slc[bb, h, ti, j] = sum(p_full[r * j - m - n] for m in range(r)
                                                  for n in range(r) if 0 <= r * j - m - n < nc)
                keys = list(range(max(0, ti - w + 1), ti + 1))
                p = _softmax_rows(scale * k[bb, keys, hk] @ q[bb, ti, h])
                win[bb, ti, h] = p @ v[bb, keys, hk]
    selected = np.zeros((b, hq // g, t, ns), bool)
    for bb in range(b):
        for hk in range(hq // g):
            for ti in range(t):
                shared = p_slc[bb, hk * g: (hk + 1) * g, ti].sum(0)
                own = ti // l_
                selected[bb, hk, ti, own] = True
                earlier = sorted((-shared[j], j) for j in range(own))
                for _, j in earlier[:n_sel]:
                    selected[bb, hk, ti, j] = True
                for h in range(hk * g, (hk + 1) * g):
                    keys = [s for s in range(ti + 1) if selected[bb, hk, ti, s // l_]]
                    p = _softmax_rows(scale * k[bb, keys, hk] @ q[bb, ti, h])
                    slc[bb, ti, h] = p @ v[bb, keys, hk]
    out = gates[..., 0:1] * cmp + gates[..., 1:2] * slc + gates[..., 2:3] * win
    return out, cmp, slc, win, selected


def test_nsa_branches_match_the_dense_formulas():
    t, cfg = 32, dict(block_size=8, compress_stride=4, select_blocks=1, window=6)
    q, k, v = _qk(5, t=t)
    gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(6), (B, t, HQ, 3)))
    run = jax.jit(lambda q, k, v, g: sparse.nsa(q, k, v, gates=g, return_branches=True, **cfg))
    out, br = run(q, k, v, gates)
    want = _nsa_numpy(q, k, v, gates, 8, 4, 1, 6)
    np.testing.assert_array_equal(np.asarray(br["selected"]), want[4])
    for got, ref in zip((out, br["cmp"], br["slc"], br["win"]), want[:4], strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=2e-5)
    # trainable end to end: finite gradients for q, k, v and the gates; d/d gate = the branch
    grads = jax.jit(jax.grad(lambda q, k, v, g: sparse.nsa(q, k, v, gates=g, **cfg).sum(),
                             argnums=(0, 1, 2, 3)))(q, k, v, gates)
    assert all(np.isfinite(np.asarray(x)).all() for x in grads)
    np.testing.assert_allclose(grads[3][..., 1], np.asarray(br["slc"]).sum(-1), atol=1e-5)


def test_moba_core_rule_is_topk_blocks_at_token_granularity():
    # Two implementations of MoBA's rule agree: the model core's mask-driven support (which
    # also serves decoding) and the router at block_q = 1, expanded to tokens.
    from models.cores.sparse import moba_support

    q, k, _ = _qk(7, t=40)
    causal = jnp.tril(jnp.ones((40, 40), bool))[None, None]
    got = jax.jit(lambda q, k: moba_support(q, k, causal, 8, 2))(q, k)
    bm = jax.jit(lambda q, k: sparse.topk_blocks(q, k, block_q=1, block_kv=8, k_blocks=2,
                                                 mask=jattn.masks.causal()))(q, k)
    want = np.asarray(bm)[..., np.arange(40) // 8] & np.asarray(causal)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sparse_mechanisms_train_and_moba_decodes_like_the_forward():
    from flax import nnx

    from models import CachePolicy, Decoder, DecoderConfig

    tokens = jax.random.randint(jax.random.key(8), (2, 12), 0, 32)
    base = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=1,
                mlp="none", positions="rope")
    moba = Decoder(DecoderConfig(**base, mechanism="moba",
                                 attention_options=(("moba_block_size", 4),
                                                    ("moba_top_k", 1))), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moba)
    full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)
    step = jax.jit(lambda s, tok, cache, i: nnx.merge(graphdef, s).decode(tok, cache, i))
    cache = moba.init_cache(2, 12, CachePolicy())
    steps = []
    for i in range(12):  # one token per step: one compile
        logits, cache = step(state, tokens[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)

    dsa = Decoder(DecoderConfig(**base, mechanism="dsa",
                                attention_options=(("dsa_top_k", 3), ("dsa_index_heads", 2),
                                                   ("dsa_index_dim", 4))), rngs=nnx.Rngs(1))

    def loss(m):
        return m(tokens).mean() + m.aux_loss()

    grads = nnx.jit(nnx.grad(loss))(dsa)
    index_grad = grads["layers"][0]["attn"]["core"]["index_q"]["kernel"][...]
    assert float(jnp.abs(index_grad).sum()) > 0  # the indexer learns from its KL loss
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_selection_mask_is_the_union_of_the_valid_picks_without_a_one_hot():
    """Equal to the one-hot formula; compiled, its memory is O(T S), not O(T k S): the DSA
    core once built ``one_hot(idx, T)`` ``[B, T, k, T]`` (137 GB at T = 8192, k = 2048)."""
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(9)[:4] for _ in range(2 * 5)]).reshape(2, 5, 4)
    valid = rng.random((2, 5, 4)) < 0.7
    want = np.zeros((2, 5, 9), bool)
    for b, t, n in np.ndindex(2, 5, 4):
        want[b, t, idx[b, t, n]] |= valid[b, t, n]
    got = jax.jit(sparse.selection_mask, static_argnums=2)(jnp.asarray(idx), valid, 9)
    np.testing.assert_array_equal(np.asarray(got), want)

    t, k = 2048, 512  # a one-hot would be t * k * t bytes = 2 GiB
    spec = jax.ShapeDtypeStruct((1, t, k), jnp.int32)
    compiled = jax.jit(sparse.selection_mask, static_argnums=2).lower(
        spec, jax.ShapeDtypeStruct((1, t, k), bool), t).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20


def test_dsa_core_memory_does_not_scale_with_top_k_times_t_squared():
    from flax import nnx

    from models import Decoder, DecoderConfig

    t = 1024
    model = Decoder(DecoderConfig(vocab_size=32, d_model=16, num_heads=2, num_layers=1,
                                  mlp="none", positions="none", mechanism="dsa", max_len=t,
                                  attention_options=(("dsa_top_k", 256), ("dsa_index_heads", 2),
                                                     ("dsa_index_dim", 4))), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True)(x)).lower(
        state, tokens).compile()
    # the one-hot alone was t * 256 * t bytes = 256 MiB; the dense [T, T] maps are ~4 MiB each
    assert compiled.memory_analysis().temp_size_in_bytes < 96 * 2**20
