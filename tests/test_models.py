"""models: every mechanism trains in a tiny ViT and Decoder; decoding reproduces the forward;
implementations agree; gated / MoH reduce to plain attention; intermediates on request.

Compile time dominates on CPU, so the mechanism sweep builds ONE model whose layers use every
registered mechanism (one compile, attention-only layers) and checks each layer's gradients
separately; the other tests keep MLPs.
"""

from __future__ import annotations

import functools
import string
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jattn import masks
from jattn.testing import assert_close
from models import (
    AttentionBlock,
    AttentionConfig,
    CachePolicy,
    Decoder,
    DecoderConfig,
    ViT,
    build_core,
    capture_intermediates,
    mechanism_kind,
    mechanism_names,
    vit_config,
)
from models.intermediates import group_by_layer, record
from models.registry import MECHANISMS
from tests.testing import forward_and_decoded

ALL = [("linear:elu1" if m == "linear" else m) for m in mechanism_names()]
CAUSAL = [m for m in ALL if getattr(MECHANISMS[m.split(":")[0]], "has_causal_form", True)]
DECODER_MECHS = CAUSAL + ["linear:hedgehog", "sliding_window:3", "strided:2"]
# nsa is causal by construction (compressed blocks complete before the query)
VIT_MECHS = [m for m in ALL if m != "nsa"] + ["neighborhood:2", "window:2"]
TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32)

# These programs are tiny; XLA's backend optimizations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + 0.01 * model.aux_loss()


def _loss_and_grads(model, loss_fn, *args):
    graphdef, state = nnx.split(model)

    @jit
    def step(state, *args):
        return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), *args))(state)

    return step(state, *args)


def _check_step(model, loss, grads, what):
    assert np.isfinite(float(loss)), f"{what}: loss {loss}"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(np.asarray(g))), f"{what}: non-finite grad at {path}"
    # One SGD step keeps the parameters finite.
    state = nnx.state(model, nnx.Param)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, state, nnx.state(grads, nnx.Param))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new))


def _layer_grad_norm(grads, i):
    layer = grads["layers"][i]["attn"]
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(layer)))


def test_every_mechanism_trains_in_a_decoder():
    letters = string.ascii_letters[: len(DECODER_MECHS)]
    cfg = DecoderConfig(**TINY, num_kv_heads=1, num_layers=len(DECODER_MECHS),
                        layer_pattern=letters,
                        layer_mechanisms=tuple(zip(letters, DECODER_MECHS, strict=True)),
                        attention_options=(("window", 4),), implementation="reference",
                        linear_implementation="reference", mlp="none")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    loss, grads = _loss_and_grads(model, _lm_loss, tokens)
    _check_step(model, loss, grads, "decoder")
    for i, mech in enumerate(DECODER_MECHS):
        assert _layer_grad_norm(grads, i) > 0, f"{mech}: attention received no gradient"


def test_every_mechanism_trains_in_a_vit():
    cfg = vit_config("test/4", image_size=12, num_classes=3, depth=len(VIT_MECHS),
                     mechanism=tuple(VIT_MECHS), implementation="reference",
                     linear_implementation="reference", attention_options=(("window", 4),),
                     mlp="none")
    model = ViT(cfg, rngs=nnx.Rngs(0))
    # The head is zero-initialized (big_vision); give it weights so gradients reach the body.
    model.head.kernel.set_value(jax.random.normal(jax.random.key(2), model.head.kernel.shape))
    images = jax.random.normal(jax.random.key(3), (2, 12, 12, 3))
    labels = jnp.array([0, 2])

    def loss_fn(m, images, labels):
        logits = m(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() \
            + 0.01 * m.aux_loss()

    loss, grads = _loss_and_grads(model, loss_fn, images, labels)
    _check_step(model, loss, grads, "vit")
    for i, mech in enumerate(VIT_MECHS):
        assert _layer_grad_norm(grads, i) > 0, f"{mech}: attention received no gradient"


def _jit_forward(model, **kw):
    """A reusable jitted ``model(x, **kw)`` (one compile per input shape)."""
    graphdef, state = nnx.split(model)
    fn = jit(lambda s, x: nnx.merge(graphdef, s)(x, **kw))
    return lambda x: fn(state, x)


def _forward(model, x, **kw):
    return _jit_forward(model, **kw)(x)


def test_reference_and_xla_give_the_same_logits():
    cfg = dict(**TINY, num_layers=3, layer_pattern="ASW", positions="rope",
               layer_mechanisms=(("S", "sinks"), ("W", "sliding_window:5")))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 32)
    ref = _forward(Decoder(DecoderConfig(**cfg, implementation="reference"),
                           rngs=nnx.Rngs(0)), tokens)
    xla = _forward(Decoder(DecoderConfig(**cfg, implementation="xla"), rngs=nnx.Rngs(0)), tokens)
    assert_close(xla, ref, rtol=1e-5, name="decoder logits xla vs reference")


def test_reference_and_xla_vit_neighborhood():
    cfg = dict(image_size=16, num_classes=4, mask="neighborhood:3", pool="token")
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    ref = ViT(vit_config("test/4", **cfg, implementation="reference"), rngs=nnx.Rngs(0))
    xla = ViT(vit_config("test/4", **cfg, implementation="xla"), rngs=nnx.Rngs(0))
    for m in (ref, xla):
        m.head.kernel.set_value(jax.random.normal(jax.random.key(1), m.head.kernel.shape))
    assert_close(_forward(xla, images), _forward(ref, images), rtol=1e-5, name="vit logits")


DECODE_STACKS = {
    "softmax": dict(layer_pattern="A", num_layers=2, num_kv_heads=1, positions="rope"),
    "linear": dict(layer_pattern="L", num_layers=2, positions="none"),
    "hybrid": dict(layer_pattern="LDKA", num_layers=4, positions="alibi", mechanism="gated",
                   layer_mechanisms=(("D", "gated_deltanet"), ("K", "based")),
                   attention_options=(("window", 3),)),
}


@pytest.mark.parametrize("stack", list(DECODE_STACKS))
def test_cached_decoding_matches_the_forward(stack):
    cfg = DecoderConfig(**TINY, **DECODE_STACKS[stack])
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 11), 0, cfg.vocab_size)
    full, got = forward_and_decoded(model, tokens, prompt_len=5)
    assert_close(got, full, rtol=1e-4, name=f"{stack}: decoded logits")
    if stack == "hybrid":  # generate (jitted prefill + scan) is greedy argmax of the forward
        out = model.generate(tokens[:, :5], 6)
        np.testing.assert_array_equal(out[:, :5], tokens[:, :5])
        np.testing.assert_array_equal(out[:, 5:], jnp.argmax(_forward(model, out)[:, 4:-1], -1))
    kinds = {mechanism_kind(cfg.layer_mechanism(i)) for i in range(cfg.num_layers)}
    assert kinds == {"softmax": {"softmax"}, "linear": {"recurrent"},
                     "hybrid": {"softmax", "recurrent", "hybrid"}}[stack]


def test_streaming_cache_is_sink_plus_recent_window():
    """StreamingLLM cache == full attention restricted to the first n_sink + last W tokens."""
    t, n_sink, window = 12, 2, 4
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    dense = (j <= i) & ((j < n_sink) | (i - j < window))
    cfg = dict(**TINY, num_layers=1, positions="none")
    masked = Decoder(DecoderConfig(**cfg, attention_options=(("mask", masks.from_array(dense)),)),
                     rngs=nnx.Rngs(0))
    model = Decoder(DecoderConfig(**cfg), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, t), 0, 32)
    _, got = forward_and_decoded(model, tokens, 0, CachePolicy("streaming", n_sink, window))
    assert_close(got, _forward(masked, tokens), rtol=1e-5, name="streaming decode")


def _block_pair(mech_a, mech_b, **kw):
    base = dict(d_model=16, num_heads=2, position="rope", use_bias=False, **kw)
    a = AttentionBlock(AttentionConfig(mechanism=mech_a, **base), rngs=nnx.Rngs(0))
    b = AttentionBlock(AttentionConfig(mechanism=mech_b, **base), rngs=nnx.Rngs(0))
    return a, b


def test_gated_block_with_open_gate_equals_ungated():
    gated, plain = _block_pair("gated", "softmax")
    gated.core.gate.kernel.set_value(jnp.zeros_like(gated.core.gate.kernel[...]))
    gated.core.gate.bias.set_value(jnp.full_like(gated.core.gate.bias[...], 40.0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    assert_close(_forward(gated, x), _forward(plain, x), rtol=1e-6, name="open gate")


def test_moh_with_all_heads_selected_is_multi_head_attention():
    moh, mha = _block_pair("moh", "softmax", moh_top_k=2)
    # A zero router weighs every head 1/H: MoH(x) = MHA(x) / H.
    moh.core.router.kernel.set_value(jnp.zeros_like(moh.core.router.kernel[...]))
    moh.o_proj.kernel.set_value(moh.o_proj.kernel[...] * 2)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    graphdef, state = nnx.split(moh)

    @jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), m.core.balance_loss[...]

    y, balance = run(state, x)
    assert_close(y, _forward(mha, x), rtol=1e-6, name="MoH(all heads)")
    # Every token selects every head (f_h = 1) with P_h = 1/H: L_b = sum_h f_h P_h = 1.
    np.testing.assert_allclose(float(balance), 1.0, rtol=1e-6)


def test_clipped_softmax_matches_formula():
    cfg = AttentionConfig(d_model=8, num_heads=2, mechanism="clipped_softmax", clip_gamma=-0.1,
                          clip_zeta=1.05)
    core = build_core(cfg, rngs=nnx.Rngs(0))
    q, k, v = (jax.random.normal(kk, (1, 5, 2, 4)) for kk in jax.random.split(jax.random.key(0), 3))
    out = jit(lambda q, k, v: core.attend(q, k, v, mask=masks.causal(), bias=None))(q, k, v)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    vis = np.tril(np.ones((5, 5), bool))
    s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    p = np.where(vis, np.clip(1.15 * p - 0.1, 0, 1), 0)
    assert_close(out, np.einsum("bhqk,bkhd->bqhd", p, v), rtol=1e-5, name="clipped softmax")


def test_intermediates_only_on_request():
    model = Decoder(DecoderConfig(**TINY, num_layers=2, layer_pattern="LA"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    plain = _forward(model, tokens)
    assert isinstance(plain, jax.Array)
    graphdef, state = nnx.split(model)  # the trainer's pattern: capture inside jit on a merge
    logits, inter = jit(lambda s, x: capture_intermediates(nnx.merge(graphdef, s), x))(
        state, tokens)
    assert_close(logits, plain, name="logits with intermediates")
    lin, soft = inter["layers"]
    assert "attention_weights" not in lin and lin["values"].shape == (2, 8, 2, 8)
    w = soft["attention_weights"]
    assert w.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(w, 1)).max()) == 0.0
    for li in inter["layers"]:
        assert li["residual_norms"].shape == (2, 8) and li["value_norms"].shape == (2, 8, 2)
    assert inter["embedding_norms"].shape == (2, 8)
    # the old keyword is the same call
    alias = _forward(model, tokens, return_intermediates=True)
    assert jax.tree.structure(alias) == jax.tree.structure((logits, inter))
    for a, b in zip(jax.tree.leaves(alias), jax.tree.leaves((logits, inter)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cores_record_where_they_compute_and_nothing_stays_on_the_model():
    """Core-level records (gate, MoH head weights, a hybrid's inner window core) land in their
    layer's dict; nnx.capture leaves no Intermediate state behind, a plain forward records
    nothing, and no flax deprecation warning fires (sow only inside capture)."""
    cfg = DecoderConfig(**TINY, num_layers=3, layer_pattern="GMB", positions="rope",
                        layer_mechanisms=(("G", "gated"), ("M", "moh"), ("B", "based")),
                        attention_options=(("window", 4),))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 6), 0, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        logits, inter = capture_intermediates(model, tokens)
        plain = model(tokens)
    assert_close(logits, plain, name="captured vs plain logits")
    gated, moh, based = inter["layers"]
    assert gated["gate"].shape == (1, 6, 2, 8) and float(gated["gate"].min()) > 0
    assert moh["head_weights"].shape == (1, 6, 2) and moh["balance_loss"].shape == ()
    w = based["attention_weights"]  # from the hybrid's sliding-window core
    assert w.shape == (1, 2, 6, 6) and float(jnp.abs(jnp.tril(w, -4)).max()) == 0.0
    assert all("attention_weights" in li for li in inter["layers"])
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
    assert not any(hasattr(m, "__captures__") for _, m in nnx.iter_modules(model))


def test_capture_intermediates_of_one_block_and_name_clashes():
    block = AttentionBlock(AttentionConfig(d_model=16, num_heads=2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 5, 16))
    y, inter = capture_intermediates(block, x)
    assert_close(y, block(x), name="block output")
    assert set(inter) == {"attention_weights", "values", "value_norms"}
    assert inter["attention_weights"].shape == (1, 2, 5, 5)
    # the values are the ones the block used: the recorded weights applied to the recorded
    # values, through the output projection, give the block's output (weights of the wrong
    # q/k, or norms of another tensor, have the right shapes too)
    w, vals = inter["attention_weights"], inter["values"]
    o = jnp.einsum("bhqk,bkhd->bqhd", w, jnp.repeat(vals, 2 // vals.shape[2], axis=2))
    assert_close(block.o_proj(o), y, rtol=1e-5, name="o_proj(weights @ values)")
    assert_close(inter["value_norms"], jnp.linalg.norm(vals, axis=-1), name="value_norms")
    # a plain forward never evaluates a deferred record (dense weights cost [B, H, T, T])
    calls = []
    record(block, "probe", lambda: calls.append(1))
    assert not calls
    with pytest.raises(ValueError, match="'w' recorded twice in one group"):
        group_by_layer({"layers": {0: {"a": {"w": 1}, "b": {"w": 2}}}}, num_layers=1)


def test_last_only_regression_head():
    """In-context regression shape: one attention layer, no MLP/norm/positions, last output."""
    cfg = DecoderConfig(input_dim=5, output_dim=1, d_model=5, num_layers=1, num_heads=5,
                        head_dim=5, mlp="none", norm="none", final_norm=False, positions="none")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert not any("mlp" in n or "norm" in n or "pos" in n for n in names), names
    y = _forward(model, jax.random.normal(jax.random.key(0), (3, 7, 5)), last_only=True)
    assert y.shape == (3, 1)


def test_gather_returns_the_logits_of_the_chosen_positions():
    model = Decoder(DecoderConfig(**TINY), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    full = model(tokens)
    pos = jnp.array([[0, 5, 11], [7, 7, 2]], jnp.int32)
    picked = model(tokens, gather=pos)
    assert picked.shape == (2, 3, full.shape[-1])
    assert_close(picked, jnp.take_along_axis(full, pos[..., None], axis=1), name="gather")
    with pytest.raises(ValueError, match="gather must be int"):
        model(tokens, gather=pos[0])
    with pytest.raises(ValueError, match="at most one of last_only and gather"):
        model(tokens, gather=pos, last_only=True)


def test_embed_init_std_scales_the_token_table_and_tied_logits():
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    std = {}
    for s in (1.0, 0.02):
        model = Decoder(DecoderConfig(**TINY, embed_init_std=s), rngs=nnx.Rngs(0))
        std[s] = (float(jnp.std(model.embed.embedding[...])), float(jnp.std(model(tokens))))
    assert std[1.0][0] == pytest.approx(1.0, rel=0.15)
    assert std[0.02][0] == pytest.approx(0.02, rel=0.15)
    # tied head: the logits scale with the table (the blocks see normalized inputs)
    assert std[0.02][1] < 0.1 * std[1.0][1]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="registered: .*softmax"):
        AttentionBlock(AttentionConfig(d_model=8, num_heads=2, mechanism="nope"),
                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layer_pattern letter 'Z'"):
        DecoderConfig(layer_pattern="AZ", num_layers=2)
    with pytest.raises(ValueError, match="must tile num_layers"):
        DecoderConfig(layer_pattern="LLLA", num_layers=2)
    with pytest.raises(ValueError, match="grid_shape"):
        AttentionBlock(AttentionConfig(d_model=8, num_heads=2, mechanism="neighborhood:3"),
                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown ViT size"):
        vit_config("XXL/14")
    with pytest.raises(ValueError, match="feature map"):
        AttentionBlock(AttentionConfig(d_model=8, num_heads=2, mechanism="linear:cosine"),
                       rngs=nnx.Rngs(0))


def test_mechanism_options_are_declared_by_their_core():
    # Keywords and options= give one (hashable) config; each core reads only its own options.
    kw = AttentionConfig(d_model=16, num_heads=4, mechanism="moh", moh_top_k=3, window=8)
    opt = AttentionConfig(d_model=16, num_heads=4, mechanism="moh",
                          options={"window": 8, "moh_top_k": 3})
    assert kw == opt and hash(kw) == hash(opt)
    moh = build_core(kw, rngs=nnx.Rngs(0))
    assert (moh.opts.moh_top_k, moh.opts.moh_shared_heads, moh.top_k) == (3, 0, 3)
    assert not hasattr(moh.opts, "window")  # Based's option, not MoH's
    based = build_core(AttentionConfig(d_model=16, num_heads=4, mechanism="based", window=8),
                       rngs=nnx.Rngs(0))
    assert based.opts.window == 8 and based.opts.feature_dim == 16
    with pytest.raises(ValueError, match="unknown attention option 'windw'"):
        AttentionBlock(AttentionConfig(d_model=8, num_heads=2, windw=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'windw' is not an AttentionConfig field or core opt"):
        DecoderConfig(attention_options=(("windw", 4),))


@pytest.mark.parametrize("t", [6, 12])
def test_state_size_counts_the_decoding_cache(t):
    # Every core reports the floats its decoding cache holds after t tokens; a sliding window
    # keeps min(window, t) of the t key/value slots the full-policy cache allocates.
    window, hkv, dh = 8, 2, 4
    got, want = {}, {}

    def build():  # traced abstractly: shapes only, no parameters drawn
        for mech in DECODER_MECHS:
            cfg = AttentionConfig(d_model=16, num_heads=4, num_kv_heads=hkv, mechanism=mech,
                                  window=window)
            block = AttentionBlock(cfg, rngs=nnx.Rngs(0))
            floats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(block.init_cache(1, t))
                         if jnp.issubdtype(x.dtype, jnp.floating))
            kept = {"based": window, "sliding_window:3": 3}.get(mech)
            if kept is not None:
                floats -= 2 * (t - min(kept, t)) * hkv * dh
            got[mech], want[mech] = block.core.state_size(t), floats

    jax.eval_shape(build)
    assert got == want
