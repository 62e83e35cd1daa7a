"""Model-level throughput of :class:`models.Decoder`: training steps and cached decoding.

    python -m benchmarks.models [--small] [--out benchmarks/models.json]

Three side-by-side comparisons in one run (ratios; the host is shared and noisy, so training
steps of the contenders are timed interleaved, round-robin, and the median is reported):

1. Training step (AdamW, fwd + bwd + update) tokens/s of the decoder on ``jattn`` softmax
   attention (``implementation="xla"``, the CPU default, and ``"reference"``) vs the same
   architecture with every attention block replaced by ``flax.nnx.MultiHeadAttention`` (same
   widths, no biases, causal mask, no RoPE in either). Target: jattn within 5% of the plain
   Flax step time or faster.
2. Training step tokens/s of the hybrid ``"LLLA"`` decoder (GLA linear layers, one softmax
   layer in four) vs all-softmax at long context (T=4096 by default).
3. Decoding tokens/s at a context of 1024 tokens: one jitted step with the KV cache
   (``models.decode_fns``) vs recomputing the full forward over the prefix for each new token.
   Target: cache >= 10x faster.

``--sparse`` runs instead: training-step tokens/s of the trainable sparse mechanisms
(``moba``, ``nsa``, ``dsa``) vs full causal softmax on the retrieval benchmark's model
(``configs/retrieval.py``: d 64, 4 heads, 2 layers, RoPE, each sparse mechanism at about
``T / 4`` keys per query, :func:`configs.retrieval.sparse_options`), 8192 tokens per step, at
each of ``--sparse-lengths`` (default 256, the trained length, and 2048).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import harness
from models import CachePolicy, Decoder, DecoderConfig, decode_fns


class FlaxAttention(nnx.Module):
    """``flax.nnx.MultiHeadAttention`` behind the :class:`models.AttentionBlock` call signature."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.mha = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d_model,
                                          qkv_features=d_model, out_features=d_model,
                                          use_bias=False, decode=False, rngs=rngs)

    def __call__(self, x, *, positions=None):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        return self.mha(x, mask=mask)


def build(cfg: DecoderConfig, flax_attention: bool = False) -> Decoder:
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    if flax_attention:
        for i, layer in enumerate(model.layers):
            layer.attn = FlaxAttention(cfg.d_model, cfg.num_heads, rngs=nnx.Rngs(100 + i))
    return model


def train_step_fn(model: Decoder):
    """An AdamW step ``(params, opt_state, tokens, rest) -> (params, opt_state, loss)`` and its
    ``params, opt_state, rest`` (``rest``: the non-parameter state, e.g. a core's ``AuxLoss``
    that the forward writes, so it enters the jit as an argument)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    def step(params, opt_state, tokens, rest):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest, copy=True)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, opt_state, rest


def compile_train(cfg: DecoderConfig, t: int, batch: int, flax_attention: bool = False):
    """``run()`` doing one training step on ``[batch, t + 1]`` tokens."""
    step, params, opt_state, rest = train_step_fn(build(cfg, flax_attention))
    tokens = jax.random.randint(jax.random.key(0), (batch, t + 1), 0, cfg.vocab_size)
    compiled = harness.compile_fn(step, params, opt_state, tokens, rest)
    return lambda: jax.block_until_ready(compiled(params, opt_state, tokens, rest))


def time_interleaved(runs: dict, repeats: int) -> dict:
    """Median seconds per call of each ``run()``, calls interleaved round-robin so that load
    changes on a shared host hit every contender alike (one warm-up call each)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_decode(cfg: DecoderConfig, context: int, steps: int, batch: int, repeats: int):
    """(seconds per token with the cache, seconds per token recomputing the prefix)."""
    model = build(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, context + steps), 0, cfg.vocab_size)
    policy = CachePolicy("full")
    state, prefill, step = decode_fns(model, policy)
    per_token = []
    for _ in range(repeats + 1):  # the first round includes compilation
        cache = model.init_cache(batch, context + steps, policy)
        _, cache = prefill(state, tokens[:, :context], cache)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        for i in range(steps):
            logits, cache = step(state, tokens[:, context + i:context + i + 1], cache,
                                 jnp.int32(context + i))
        jax.block_until_ready(logits)
        per_token.append((time.perf_counter() - t0) / steps)
    cached = statistics.median(per_token[1:])

    graphdef, st = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[:, -1])
    prefix = tokens[:, :context]
    compiled = forward.lower(st, prefix).compile()
    recompute = harness.time_compiled(compiled, st, prefix, repeats=repeats, min_time=0.0)
    return cached, recompute


def run_sparse(args) -> list[dict]:
    """Training-step time of moba / nsa / dsa vs full softmax (module docstring, ``--sparse``)."""
    from configs.retrieval import sparse_options

    rows = []
    for t in args.sparse_lengths:
        batch = max(1, 8192 // t)
        base = DecoderConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4,
                             mlp="swiglu", positions="rope", tie_embeddings=False, max_len=t,
                             attention_options=sparse_options(t))
        runs = {m: compile_train(dataclasses.replace(base, mechanism=m), t, batch)
                for m in ("softmax", "moba", "nsa", "dsa")}
        res = time_interleaved(runs, args.repeats)
        for m in ("moba", "nsa", "dsa"):
            row = {"case": f"train: {m} vs full softmax", "T": t,
                   "ours ms": 1e3 * res[m], "baseline ms": 1e3 * res["softmax"],
                   "ours tok/s": batch * t / res[m],
                   "baseline tok/s": batch * t / res["softmax"],
                   "speedup": res["softmax"] / res[m]}
            rows.append(row)
            print(row, flush=True)
    return rows


def run(args) -> list[dict]:
    base = dict(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                num_heads=args.heads, mlp="swiglu", tie_embeddings=True)
    rows = []

    def add(row):
        rows.append(row)
        print(row, flush=True)

    # 1. jattn softmax vs flax.nnx.MultiHeadAttention, same architecture (no RoPE in either).
    for t in args.train_lengths:
        cfg = DecoderConfig(**base, positions="none", max_len=t)
        runs = {"flax": compile_train(cfg, t, args.batch, flax_attention=True),
                "xla": compile_train(cfg, t, args.batch),
                "reference": compile_train(
                    dataclasses.replace(cfg, implementation="reference"), t, args.batch)}
        res = time_interleaved(runs, args.repeats)
        for impl in ("xla", "reference"):
            add({"case": f"train: jattn softmax ({impl}) vs nnx.MultiHeadAttention", "T": t,
                 "ours ms": 1e3 * res[impl], "baseline ms": 1e3 * res["flax"],
                 "ours tok/s": args.batch * t / res[impl],
                 "baseline tok/s": args.batch * t / res["flax"],
                 "speedup": res["flax"] / res[impl]})

    # 2. Hybrid LLLA (GLA) vs all-softmax at long context.
    t = args.hybrid_length
    cfg = DecoderConfig(**base, positions="rope", max_len=t)
    runs = {"softmax": compile_train(cfg, t, args.batch),
            "hybrid": compile_train(dataclasses.replace(cfg, layer_pattern="LLLA"), t,
                                    args.batch)}
    res = time_interleaved(runs, args.repeats)
    add({"case": "train: hybrid LLLA (gla) vs all softmax", "T": t,
         "ours ms": 1e3 * res["hybrid"], "baseline ms": 1e3 * res["softmax"],
         "ours tok/s": args.batch * t / res["hybrid"],
         "baseline tok/s": args.batch * t / res["softmax"],
         "speedup": res["softmax"] / res["hybrid"]})

    # 3. Decoding with the cache vs recomputing the prefix.
    for pattern in ("A", "LLLA"):
        cfg = DecoderConfig(**base, positions="rope", max_len=args.context + args.steps,
                            layer_pattern=pattern)
        cached, recompute = time_decode(cfg, args.context, args.steps, args.batch, args.repeats)
        add({"case": f"decode {pattern}: cache vs recompute prefix", "T": args.context,
             "ours ms": 1e3 * cached, "baseline ms": 1e3 * recompute,
             "ours tok/s": args.batch / cached, "baseline tok/s": args.batch / recompute,
             "speedup": recompute / cached})
    return rows


COLUMNS = ["case", "T", "ours ms", "baseline ms", "ours tok/s", "baseline tok/s", "speedup"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true",
                   help="quick smoke run (T=512 training, hybrid at T=1024)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train-lengths", type=int, nargs="+", default=[1024])
    p.add_argument("--hybrid-length", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sparse", action="store_true",
                   help="only moba / nsa / dsa vs full softmax training steps (docstring)")
    p.add_argument("--sparse-lengths", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/models.json, models_sparse.json)")
    args = p.parse_args(argv)
    if args.small:
        args.train_lengths, args.hybrid_length, args.repeats = [512], 1024, 3
    if args.out is None:
        args.out = "benchmarks/models_sparse.json" if args.sparse else "benchmarks/models.json"
    rows = run_sparse(args) if args.sparse else run(args)
    print(harness.table(rows, COLUMNS))
    harness.write_json(args.out, {"machine": harness.machine(), "args": vars(args),
                                  "rows": rows})


if __name__ == "__main__":
    main()
