"""Retrieval benchmark: full vs MoBA / NSA / DSA attention on long-range recall, retrieval
heads (Wu et al. 2024) and accuracy vs KV-cache budget per cache policy.

    python -m studies.retrieval_bench --workdir /tmp/retrieval_bench [--preset cpu] \\
        [--mechanisms softmax moba nsa dsa] [--policies full streaming snapkv h2o l2norm duo] \\
        [--budgets 32 64 ...] [--duo-full-fraction 0.5] [--config.train_steps=600 ...]

1. Trains ``configs/retrieval.py:<preset>`` once per mechanism into ``WORKDIR/<mechanism>/``
   (the runner, one after the other; a finished run is reused). The sparse mechanisms' options
   give each query about ``T / 4`` keys (``configs.retrieval.sparse_options``): the same
   attention FLOPs for all three (``keys/query`` in the table).
2. Evaluates each on ``--eval-examples`` held-out examples: token ``accuracy``, ``exact``
   (facts recalled entirely), forward ``tokens/s`` (jitted, after a warm-up call) and the
   training throughput the runner logged.
3. Retrieval-head scores per (layer, head) (:func:`jattn.analysis.retrieval_head_scores`) of
   every mechanism whose layers return attention weights; a heatmap per mechanism.
4. For the first mechanism (full attention by default): exact recall of the last query, decoded
   with ``models.decode.generate`` under each KV-cache policy at each budget (tokens per head);
   one line per policy. ``duo`` keeps the full cache on the ``--duo-full-fraction`` best KV
   heads by that mechanism's own retrieval-head scores (step 3) and streams the others.

Writes ``WORKDIR/retrieval_bench.{json,md}``, ``retrieval_heads.png``, ``cache_budget.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from studies.cli import parse_args, train_mechanism

MECHANISMS = ("softmax", "moba", "nsa", "dsa")
#: The KV-cache policies swept by default: every kind of `models.kv_cache.CACHE_POLICIES`.
POLICIES = ("full", "streaming", "snapkv", "h2o", "l2norm", "duo")
SINK_TOKENS = 4  # StreamingLLM's attention sinks; its window is the rest of the budget
DUO_FULL_FRACTION = 0.5  # DuoAttention: the share of (layer, KV head) pairs keeping every token


def make_policy(kind: str, budget: int, head_gates=None):
    """The ``models.kv_cache.CachePolicy`` of ``kind`` keeping ``budget`` tokens per head.

    ``full`` ignores the budget; ``streaming`` keeps ``SINK_TOKENS`` sinks plus a window of
    ``budget - SINK_TOKENS``; ``duo`` gives its streaming heads that same sinks + window and
    its retrieval heads (``head_gates[layer][kv_head]`` True, see :func:`duo_gates`) every
    token; ``snapkv``, ``h2o`` and ``l2norm`` take the budget as is.
    """
    from models.kv_cache import CachePolicy

    if kind == "full":
        return CachePolicy()
    window = max(budget - SINK_TOKENS, 1)
    if kind == "streaming":
        return CachePolicy(kind="streaming", sink_tokens=SINK_TOKENS, window=window)
    if kind == "duo":
        if head_gates is None:
            raise ValueError("policy 'duo' needs head_gates (see duo_gates)")
        return CachePolicy(kind="duo", sink_tokens=SINK_TOKENS, window=window,
                           head_gates=head_gates)
    return CachePolicy(kind=kind, budget=budget)


def duo_gates(scores, full_fraction: float, kv_heads: int) -> tuple[tuple[bool, ...], ...]:
    """DuoAttention gates ``[layers][kv_heads]`` from the study's own retrieval-head scores
    ``[L, H]``: the ``round(full_fraction * L * Hkv)`` best-scoring KV heads keep the full
    cache (``models.cache_policies.gates_from_scores``)."""
    from models.cache_policies import gates_from_scores

    return gates_from_scores(scores, full_fraction, kv_heads=kv_heads)


def attention_maps(model, inputs):
    """``[L, B, H, T, T]`` attention weights of every layer, or None when a layer has none.

    The one place that reads attention weights out of a model (today: the ``intermediates``
    dict of ``Decoder(..., return_intermediates=True)``)."""
    import jax.numpy as jnp

    _, inter = model(inputs, return_intermediates=True)
    maps = [layer.get("attention_weights") for layer in inter["layers"]]
    if any(m is None for m in maps):
        return None
    return jnp.stack(maps)


def keys_per_query(mechanism: str, seq_len: int, options) -> float:
    """Mean number of (query, key) score pairs per query of one head, over positions
    ``0 .. T - 1`` (the attention FLOPs up to ``4 D``): causal full ``(T + 1) / 2``; MoBA the
    current block's visible part plus ``top_k`` whole earlier blocks; NSA its compressed blocks,
    selected blocks and window; DSA its ``top_k`` (its indexer scores every key with
    ``H_I D_I`` multiply-adds, not counted)."""
    o = dict(options)
    t = np.arange(seq_len)
    if mechanism == "moba":
        blk = o["moba_block_size"]
        n = t % blk + 1 + np.minimum(o["moba_top_k"], t // blk) * blk
    elif mechanism == "nsa":
        blk, d = o["nsa_block_size"], o["nsa_stride"]
        cmp = np.maximum(0, (t - blk + 1) // d + 1) * (t >= blk - 1)
        n = cmp + t % blk + 1 + np.minimum(o["nsa_select"], t // blk) * blk \
            + np.minimum(o["nsa_window"], t + 1)
    elif mechanism == "dsa":
        n = np.minimum(o["dsa_top_k"], t + 1)
    else:
        n = t + 1
    return float(n.mean())


def run_one(workdir: str, preset: str, mechanism: str, overrides: dict) -> str:
    """Trains (or reuses) one run; returns its directory."""
    from configs.retrieval import get_config

    summary = train_mechanism(workdir, get_config, preset, mechanism, overrides,
                              "retrieval_bench")
    return os.path.dirname(summary)


def _forward_eval(model, inputs, labels, reps: int = 3):
    """Argmax predictions ``[B, T]`` and the jitted forward's tokens/s (after a warm-up)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    fwd = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))
    x = jnp.asarray(inputs)
    pred = jax.block_until_ready(fwd(model, x))
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fwd(model, x))
    tps = reps * x.size / (time.perf_counter() - t0)
    return np.asarray(pred), tps


def evaluate(path: str, n_eval: int, n_heads_eval: int) -> dict:
    """One table row for the run in ``path`` (see the module docstring)."""
    import jax.numpy as jnp

    from experiments import load
    from experiments.tasks.base import get_task
    from experiments.tasks.retrieval_data import IGNORE
    from jattn.analysis import retrieval_head_scores

    model, config, _ = load(path)
    task = get_task("retrieval")(config)
    ex = task.eval_examples(n_eval)
    pred, tps = _forward_eval(model, ex["inputs"], ex["labels"])
    mask = ex["labels"] != IGNORE
    right = mask & (pred == ex["labels"])
    n_ans = task.answers_per_example()
    per_fact = right[mask].reshape(n_eval, int(config.num_facts), -1)
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    row = {
        "mechanism": config.model.mechanism,
        "accuracy": float(right.sum() / mask.sum()),
        "exact": float(per_fact.all(-1).mean()),
        "forward_tokens_per_s": tps,
        "train_tokens_per_s": summary.get("train_tokens_per_s"),
        "keys_per_query": keys_per_query(config.model.mechanism, int(config.seq_len),
                                         config.model.attention_options),
        "train_steps": summary["step"],
        "train_wall_s": round(summary["wall_time_s"], 1),
        "retrieval_scores": None,
    }
    m = min(n_heads_eval, n_eval)
    maps = attention_maps(model, jnp.asarray(ex["inputs"][:m]))
    if maps is not None:
        steps = np.sort(np.where(mask[:m], 0, mask.shape[1]) + np.arange(mask.shape[1]),
                        1)[:, :n_ans] % mask.shape[1]
        predicted = np.take_along_axis(pred[:m], steps, 1)
        scores = retrieval_head_scores(maps, ex["inputs"][:m], ex["needle"][:m], steps,
                                       predicted)
        row["retrieval_scores"] = np.asarray(scores).round(4).tolist()
    return row


def recall_last_query(model, inputs, value_len: int, policy) -> np.ndarray:
    """``[B, L]`` greedy answer to each row's last query ``Q k v_1 .. v_L`` with the cache
    compressed *before* the query is read: ``inputs [B, T]`` up to the query are prefilled
    under ``policy``, then ``Q`` and ``k`` are decoded one step each (teacher-forced) and the
    ``L`` value tokens greedily. (Asking inside the prefill would be no test: the first answer
    token comes from the prefill's own logits, which every policy computes over the whole
    prompt before it evicts anything.)"""
    import jax.numpy as jnp

    from models.decode import decode_fns

    b, t = inputs.shape
    p = t - value_len - 2  # the last query starts here
    state, prefill, step = decode_fns(model, policy)
    cache = model.init_cache(b, t, policy)
    _, cache = prefill(state, inputs[:, :p], cache)
    _, cache = step(state, inputs[:, p:p + 1], cache, p)  # Q
    logits, cache = step(state, inputs[:, p + 1:p + 2], cache, p + 1)  # the key
    out = [jnp.argmax(logits[:, -1], -1)]
    for j in range(1, value_len):
        logits, cache = step(state, out[-1][:, None].astype(jnp.int32), cache, p + 1 + j)
        out.append(jnp.argmax(logits[:, -1], -1))
    return np.stack([np.asarray(o) for o in out], 1)


def cache_sweep(path: str, policies, budgets, n_eval: int, head_gates=None) -> list[dict]:
    """Exact recall of each example's last query under each ``(policy, budget)``
    (:func:`recall_last_query`: the haystack and the earlier queries are prefilled and
    compressed, then the last query is read and its ``value_len`` tokens decoded greedily and
    compared with the fact's value). ``head_gates``: the ``duo`` policy's gates
    (:func:`duo_gates`)."""
    import jax.numpy as jnp

    from experiments import load
    from experiments.tasks.base import get_task

    model, config, _ = load(path)
    ex = get_task("retrieval")(config).eval_examples(n_eval)
    n_val = int(config.value_len)
    inputs = jnp.asarray(ex["inputs"])
    want = ex["inputs"][:, -n_val:]
    rows = []
    for kind in policies:
        for budget in budgets:
            t0 = time.perf_counter()
            got = recall_last_query(model, inputs, n_val, make_policy(kind, budget, head_gates))
            rows.append({"policy": kind, "budget": int(budget),
                         "exact": float((got == want).all(-1).mean()),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(f"[retrieval_bench] cache {kind} budget {budget}: exact "
                  f"{rows[-1]['exact']:.3f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mechanism | accuracy | exact | keys/query | forward tokens/s | "
             "train tokens/s | steps | train wall (s) | retrieval heads (> 0.1) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    from jattn.analysis import retrieval_heads

    for r in rows:
        heads = "n/a" if r["retrieval_scores"] is None else \
            " ".join(f"L{i}H{h}" for i, h in retrieval_heads(r["retrieval_scores"])) or "none"
        train_tps = r["train_tokens_per_s"]
        lines.append(
            f"| {r['mechanism']} | {r['accuracy']:.3f} | {r['exact']:.3f} | "
            f"{r['keys_per_query']:.0f} | {r['forward_tokens_per_s']:.0f} | "
            f"{'' if train_tps is None else f'{train_tps:.0f}'} | {r['train_steps']} | "
            f"{r['train_wall_s']:.0f} | {heads} |")
    return "\n".join(lines)


def cache_table(rows: list[dict]) -> str:
    budgets = sorted({r["budget"] for r in rows})
    lines = ["| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "| --- |" + " --- |" * len(budgets)]
    for kind in dict.fromkeys(r["policy"] for r in rows):
        got = {r["budget"]: r["exact"] for r in rows if r["policy"] == kind}
        lines.append(f"| {kind} | " + " | ".join(f"{got[b]:.3f}" for b in budgets) + " |")
    return "\n".join(lines)


def plot_heads(rows: list[dict], path: str) -> str | None:
    """One heatmap per mechanism with attention weights: score per (layer, head)."""
    from experiments.plots import subplots

    rows = [r for r in rows if r["retrieval_scores"] is not None]
    if not rows:
        return None
    fig, axes = subplots(1, len(rows), figsize=(3.6 * len(rows), 3.2), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        s = np.asarray(r["retrieval_scores"])
        im = ax.imshow(s, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, h), v in np.ndenumerate(s):
            ax.text(h, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(r["mechanism"])
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="retrieval score (Wu et al. 2024)")
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_cache(rows: list[dict], path: str, mechanism: str) -> str:
    from experiments.plots import subplots

    fig, ax = subplots(figsize=(5.5, 3.8), dpi=110)
    for kind in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["budget"], r["exact"]) for r in rows if r["policy"] == kind)
        ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache budget (tokens per head)")
    ax.set_ylabel("exact recall of the last query")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"accuracy vs cache budget ({mechanism})")
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", default="cpu", help="ARG of configs/retrieval.py ('cpu', "
                   "'passkey,cpu', 'tiny', ...)")
    p.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS))
    p.add_argument("--policies", nargs="+", default=list(POLICIES),
                   help="KV-cache policy kinds for the budget sweep (first mechanism)")
    p.add_argument("--duo-full-fraction", type=float, default=DUO_FULL_FRACTION,
                   help="duo: the fraction of (layer, KV head) pairs with the full cache, the "
                   "best by the first mechanism's retrieval-head scores")
    p.add_argument("--budgets", nargs="*", type=int, default=None,
                   help="cache budgets in tokens (default: T/16, T/8, T/4, T/2, T)")
    p.add_argument("--eval-examples", type=int, default=128)
    p.add_argument("--head-examples", type=int, default=16,
                   help="examples for the retrieval-head scores ([L, B, H, T, T] weights)")
    args, overrides = parse_args(p, argv)
    os.makedirs(args.workdir, exist_ok=True)
    rows, paths = [], []
    for mech in args.mechanisms:
        path = run_one(args.workdir, args.preset, mech, overrides)
        paths.append(path)
        t0 = time.time()
        rows.append(evaluate(path, args.eval_examples, args.head_examples))
        print(f"[retrieval_bench] evaluated {mech}: {time.time() - t0:.0f}s", flush=True)
    from experiments import load

    first_model, first_config, _ = load(paths[0])
    seq_len = int(first_config.seq_len)
    budgets = args.budgets or [seq_len // 16, seq_len // 8, seq_len // 4, seq_len // 2, seq_len]
    gates = None
    if "duo" in args.policies:
        if rows[0]["retrieval_scores"] is None:
            raise SystemExit(f"--policies duo needs retrieval-head scores of "
                             f"{args.mechanisms[0]!r} (a mechanism with attention weights)")
        gates = duo_gates(rows[0]["retrieval_scores"], args.duo_full_fraction,
                          first_model.cfg.num_kv_heads or first_model.cfg.num_heads)
    t0 = time.time()
    cache_rows = cache_sweep(paths[0], args.policies, budgets, args.eval_examples, gates) \
        if args.policies else []
    cache_wall = time.time() - t0
    out = {"rows": rows, "cache": cache_rows, "cache_mechanism": args.mechanisms[0],
           "cache_wall_s": round(cache_wall, 1), "duo_gates": gates,
           "duo_full_fraction": args.duo_full_fraction if gates else None}
    with open(os.path.join(args.workdir, "retrieval_bench.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = table(rows)
    if cache_rows:
        md += f"\n\nExact recall vs KV-cache budget ({args.mechanisms[0]}):\n\n" \
            + cache_table(cache_rows)
    with open(os.path.join(args.workdir, "retrieval_bench.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    figs = [plot_heads(rows, os.path.join(args.workdir, "retrieval_heads.png"))]
    if cache_rows:
        figs.append(plot_cache(cache_rows, os.path.join(args.workdir, "cache_budget.png"),
                               args.mechanisms[0]))
    print(f"[retrieval_bench] figures: {[f for f in figs if f]}")
    return out


if __name__ == "__main__":
    main()
