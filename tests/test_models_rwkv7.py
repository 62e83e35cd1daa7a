"""The "rwkv7" core (models/cores/rwkv7.py) against a float64 numpy loop of RWKV-7's time mixing
written from the paper's formulas (Peng et al. 2025, in RWKV's own ``[V, K]`` state layout),
with the core's own parameters; and its token shift of r / k / v across decoding steps."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.testing import assert_close
from models import Decoder, DecoderConfig
from models.cores.base import CoreInputs

TINY = dict(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32)


def _core():
    cfg = DecoderConfig(**TINY, num_layers=1, layer_pattern="P", positions="none",
                        layer_mechanisms=(("P", "rwkv7"),),
                        attention_options=(("rwkv7_lora_rank", 4), ("chunk_size", 4)))
    core = Decoder(cfg, rngs=nnx.Rngs(0)).layers[0].attn.core
    # Non-trivial values for the parameters that start at constants.
    rng = np.random.default_rng(3)
    for name in ("mix", "mix_rkv", "k_k", "k_a", "r_k", "ln_w", "ln_b"):
        p = getattr(core, name)
        p[...] = jnp.asarray(rng.uniform(0.1, 0.9, p[...].shape), jnp.float32)
    return core


def _np(x):
    return np.asarray(x, np.float64)


def _lora(m, x, act):
    y = act(x @ _np(m.down.kernel[...])) @ _np(m.up.kernel[...]).reshape(
        m.up.kernel[...].shape[0], -1)
    if m.up.bias is not None:
        y = y + _np(m.up.bias[...]).reshape(-1)
    return y


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_rwkv7(core, x, q, k, v):
    """RWKV-7 time mixing, float64, token by token (paper / reference-code formulas)."""
    x, q, k, v = (_np(t) for t in (x, q, k, v))
    B, T, H, K = q.shape
    mix, mix_rkv = _np(core.mix[...]), _np(core.mix_rkv[...]).reshape(3, H * K)
    k_k, k_a, r_k = (_np(getattr(core, n)[...]).reshape(H * K) for n in ("k_k", "k_a", "r_k"))
    ln_w, ln_b = _np(core.ln_w[...]), _np(core.ln_b[...])
    flat = [t.reshape(B, T, H * K) for t in (q, k, v)]
    S = np.zeros((B, H, K, K))  # [V, K] per head
    out = np.zeros((B, T, H, K))
    for t in range(T):
        xt = x[:, t]
        xx = (x[:, t - 1] if t else 0.0) - xt
        x_w, x_a, x_g = (xt + xx * mix[i] for i in range(3))
        r, kt, vt = (f[:, t] + ((f[:, t - 1] if t else 0.0) - f[:, t]) * mix_rkv[i]
                     for i, f in enumerate(flat))
        z = _lora(core.decay, x_w, np.tanh)
        w = np.exp(-np.exp(-np.log1p(np.exp(-z)) - 0.5))  # w = exp(-exp(-softplus(-z) - 0.5))
        a = _sigmoid(_lora(core.icl, x_a, lambda u: u))
        gate = _lora(core.gate, x_g, _sigmoid)
        kk = (kt * k_k).reshape(B, H, K)
        kk = kk / np.sqrt(np.sum(kk**2, -1, keepdims=True) + 1e-6)
        kt = kt * (1 + (a - 1) * k_a)
        r, kt, vt, w, a = (u.reshape(B, H, K) for u in (r, kt, vt, w, a))
        # S = S diag(w) + (S (-kk)^T) (kk * a) + v^T k
        S = (S * w[:, :, None, :] + np.einsum("bhvk,bhk->bhv", S, -kk)[..., None]
             * (kk * a)[:, :, None, :] + vt[..., None] * kt[:, :, None, :])
        y = np.einsum("bhvk,bhk->bhv", S, r)
        mean = y.mean(-1, keepdims=True)
        y = (y - mean) / np.sqrt(((y - mean) ** 2).mean(-1, keepdims=True) + 64e-5) * ln_w + ln_b
        y = y + np.sum(r * kt * r_k.reshape(H, K), -1, keepdims=True) * vt
        out[:, t] = y * gate.reshape(B, H, K)
    return out


def _inputs(T=7, B=2, H=2, K=8, D=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    q, k, v = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(3))
    return x, q, k, v


def test_time_mix_matches_the_paper_formulas():
    core = _core()
    x, q, k, v = _inputs()
    inp = CoreInputs(x, q, k, v, jnp.arange(x.shape[1]))
    o, _ = nnx.jit(lambda c, i: c.recur(i, None, True))(core, inp)
    assert_close(o, np_rwkv7(core, x, q, k, v), rtol=1e-4, name="rwkv7 time mix")


def test_step_by_step_decoding_equals_the_full_sequence():
    """Prefill 3 tokens, then one token at a time: the cache carries the state, the last
    block input (token shift of w / a / g) and the last projected r, k, v."""
    core = _core()
    x, q, k, v = _inputs(T=6)
    full, _ = nnx.jit(lambda c, i: c.recur(i, None, True))(core, CoreInputs(x, q, k, v,
                                                                         jnp.arange(6)))
    cache = core.init_cache(2, 6, None)
    decode = nnx.jit(lambda c, i, cache, lo: c.decode(i, cache, lo, None))
    outs = []
    for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 6)):
        inp = CoreInputs(x[:, lo:hi], q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], jnp.arange(lo, hi))
        o, cache = decode(core, inp, cache, jnp.int32(lo))
        outs.append(o)
    assert_close(jnp.concatenate(outs, axis=1), full, rtol=1e-4, name="decoded")
