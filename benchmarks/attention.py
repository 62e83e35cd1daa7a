"""jattn's blocked XLA attention vs ``jax.nn.dot_product_attention`` on the host platform.

    python -m benchmarks.attention [--lengths 1024 4096 8192] [--out benchmarks/attention.json]

For each mask (causal; sliding window 512) and length: forward and forward+backward time of
``jattn.attention(implementation="xla")`` and of ``jax.nn.dot_product_attention`` (which
computes the full square and masks it), their ratio, the ratio expected from FLOPs (1/density),
and compiled temp memory. B=1, H=8, D=64, fp32 by default.

    python -m benchmarks.attention --score-mod [--lengths 4096] [--out benchmarks/score_mod.json]

instead times ALiBi (Press et al. 2022) three ways under a causal mask, all blocked xla: plain
causal (no ALiBi), ``score_mod=score_mods.alibi(slopes)`` (evaluated per tile; gradients also to
the slopes) and ``bias=`` with the dense ``[1, H, T, T]`` ALiBi array; time ratios to plain
causal and compiled temp memory; plus FoX (``score_mods.forgetting``, gradients to the gates)
and T5 (``score_mods.relative_bias``, gradients to the table). It then checks the Pallas kernel's
captured-array path (interpret mode on CPU, so correctness only, not timed): forward and
gradients (q, k, v and the captured arrays) of alibi, relative_bias, forgetting and their
composition against the xla path, at ``--pallas-check-length`` (default 256).

    python -m benchmarks.attention --flash-bias [--lengths 4096] [--rank 16]

times FlashBias (Wu et al. 2025; ``bias_factors=(u, w)``, folded into q/k as ``R`` extra
feature columns) against the same low-rank bias materialized (``bias=u @ w^T``, formed inside
the step so gradients reach u and w) and plain causal, blocked xla, with compiled temp memory
from ``compiled.memory_analysis()`` (JSON default ``benchmarks/flash_bias.json``).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from benchmarks import harness
from jattn import masks


def density(mask: masks.Mask, t: int) -> float:
    """Visible fraction of the [T, T] score matrix, from the mask's dense view in row chunks."""
    step = max(1, 2**24 // t)
    visible = 0
    for start in range(0, t, step):
        rows = jnp.arange(start, min(t, start + step))[:, None]
        cols = jnp.arange(t)[None, :]
        visible += int(mask.visible(rows, cols, 0, q_len=t, kv_len=t).sum())
    return visible / (t * t)


def cases(window: int):
    yield "causal", masks.causal(), dict(is_causal=True)
    yield (f"window{window}", masks.sliding_window(window),
           dict(is_causal=True, local_window_size=(window - 1, 0)))


def run(lengths, batch, heads, head_dim, window, dtype, with_backward, mem_lengths):
    rows = []
    for t in sorted(set(lengths) | set(mem_lengths)):
        key = jax.random.PRNGKey(t)
        q, k, v = (jax.random.normal(kk, (batch, t, heads, head_dim), dtype)
                   for kk in jax.random.split(key, 3))
        for name, mask, dpa_kwargs in cases(window):
            ours = functools.partial(jattn.attention, mask=mask, implementation="xla")
            theirs = functools.partial(jax.nn.dot_product_attention, implementation="xla",
                                       **dpa_kwargs)
            row = {"mask": name, "T": t, "density": round(density(mask, t), 4)}
            passes = [("fwd", lambda f: f)]
            if with_backward:
                passes.append(("fwd+bwd", harness.fwd_bwd))
            for pname, wrap in passes:
                c_ours = harness.compile_fn(wrap(ours), q, k, v)
                row[f"{pname} mem jattn MiB"] = harness.temp_bytes(c_ours) / 2**20
                if t not in lengths:  # memory-only length: do not time the dense baseline
                    continue
                c_dpa = harness.compile_fn(wrap(theirs), q, k, v)
                row[f"{pname} mem dpa MiB"] = harness.temp_bytes(c_dpa) / 2**20
                t_ours = harness.time_compiled(c_ours, q, k, v, repeats=3)
                t_dpa = harness.time_compiled(c_dpa, q, k, v, repeats=3)
                row[f"{pname} jattn ms"] = 1e3 * t_ours
                row[f"{pname} dpa ms"] = 1e3 * t_dpa
                row[f"{pname} speedup"] = t_dpa / t_ours
            row["1/density"] = 1.0 / row["density"]
            rows.append(row)
            print(row, flush=True)
    return rows


def _interleaved_times(compiled, args, rounds: int) -> list[float]:
    """Median seconds per call of each compiled function, timed round-robin after a warm-up."""
    for c in compiled:
        jax.block_until_ready(c(*args))
    samples = [[] for _ in compiled]
    for _ in range(rounds):
        for c, out in zip(compiled, samples, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            out.append(time.perf_counter() - t0)
    return [statistics.median(x) for x in samples]


def _measure(variants, args, t, with_backward, rounds, base="causal"):
    """Rows of ``{variant, T, <pass> ms, <pass> / <base>, <pass> mem MiB, args+out MiB}`` for
    ``variants = [(name, fn(*args), argnums differentiated)]``; the first is the base."""
    passes = ["fwd", "fwd+bwd"] if with_backward else ["fwd"]
    rows = [{"variant": name, "T": t} for name, _, _ in variants]
    for pname in passes:
        compiled = []
        for row, (_, fn, argnums) in zip(rows, variants, strict=True):
            f = fn if pname == "fwd" else jax.grad(
                lambda *a, fn=fn: fn(*a).astype("float32").sum(), argnums=argnums)
            c = harness.compile_fn(f, *args)
            compiled.append(c)
            row[f"{pname} mem MiB"] = harness.temp_bytes(c) / 2**20
            # a dense bias argument (and its gradient) is not a temporary: report them too
            mem = c.memory_analysis()
            row[f"{pname} args+out MiB"] = (mem.argument_size_in_bytes
                                            + mem.output_size_in_bytes) / 2**20
        # interleaved rounds, median per variant: load on a shared host hits all alike
        times = _interleaved_times(compiled, args, rounds)
        for row, sec in zip(rows, times, strict=True):
            row[f"{pname} ms"] = 1e3 * sec
            row[f"{pname} / {base}"] = sec / times[0]
    for row in rows:
        print(row, flush=True)
    return rows


def _t5_table(heads: int, num_buckets: int = 32):
    return 0.1 * jax.random.normal(jax.random.PRNGKey(1), (num_buckets, heads))


def run_score_mod(lengths, batch, heads, head_dim, dtype, with_backward, rounds=7):
    """ALiBi via score_mod vs dense ``bias=`` vs plain causal (blocked xla): ms, ratio, MiB."""
    rows = []
    causal = masks.causal()
    slopes = jattn.position.alibi_slopes(heads)
    table = _t5_table(heads)
    for t in lengths:
        key = jax.random.PRNGKey(t)
        q, k, v = (jax.random.normal(kk, (batch, t, heads, head_dim), dtype)
                   for kk in jax.random.split(key, 3))
        bias = jattn.position.alibi_bias(heads, t, t)[None]  # [1, H, T, T] fp32
        log_f = jax.nn.log_sigmoid(jax.random.normal(key, (batch, t, heads)) + 3.0)  # FoX gates
        args = (q, k, v, slopes, bias, log_f, table)

        def plain(q, k, v, slopes, bias, log_f, table):
            return jattn.attention(q, k, v, mask=causal, implementation="xla")

        def score_mod(q, k, v, slopes, bias, log_f, table):
            return jattn.attention(q, k, v, mask=causal, implementation="xla",
                                   score_mod=jattn.score_mods.alibi(slopes))

        def dense_bias(q, k, v, slopes, bias, log_f, table):
            return jattn.attention(q, k, v, mask=causal, bias=bias, implementation="xla")

        def forgetting(q, k, v, slopes, bias, log_f, table):
            return jattn.attention(q, k, v, mask=causal, implementation="xla",
                                   score_mod=jattn.score_mods.forgetting(log_f))

        def relative_bias(q, k, v, slopes, bias, log_f, table):
            mod = jattn.score_mods.relative_bias(table, table.shape[0], 128, bidirectional=False)
            return jattn.attention(q, k, v, mask=causal, implementation="xla", score_mod=mod)

        # (name, function, arguments differentiated: q, k, v and the slopes / dense bias / gates)
        variants = (("causal", plain, (0, 1, 2)), ("alibi score_mod", score_mod, (0, 1, 2, 3)),
                    ("alibi bias=", dense_bias, (0, 1, 2, 4)),
                    ("FoX score_mod", forgetting, (0, 1, 2, 5)),
                    ("T5 score_mod", relative_bias, (0, 1, 2, 6)))
        rows += _measure(variants, args, t, with_backward, rounds)
    return rows


def check_pallas_score_mods(t: int, batch: int = 1, heads: int = 4, kv_heads: int = 2,
                            head_dim: int = 32):
    """Pallas (interpret mode on CPU: correctness, not speed) vs xla with captured arrays:
    relative RMSE of the output and of each gradient (q, k, v and the captured array)."""
    causal = masks.causal()
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (batch, t, heads, head_dim))
    k = jax.random.normal(ks[1], (batch, t, kv_heads, head_dim))
    v = jax.random.normal(ks[2], (batch, t, kv_heads, head_dim))
    sm = jattn.score_mods
    captured = {
        "alibi": (sm.alibi, jattn.position.alibi_slopes(heads)),
        "relative_bias": (lambda a: sm.relative_bias(a, 32, 128, bidirectional=False),
                          _t5_table(heads)),
        "forgetting": (sm.forgetting,
                       jax.nn.log_sigmoid(jax.random.normal(ks[3], (batch, t, heads)) + 3.0)),
    }
    parts = list(captured.values())
    captured["compose"] = (
        lambda a: sm.compose(*(make(x) for (make, _), x in zip(parts, a, strict=True))),
        tuple(x for _, x in parts))
    rows = []
    for name, (make, arr) in captured.items():
        def loss(arr, q, k, v, impl, make=make):
            o = jattn.attention(q, k, v, mask=causal, score_mod=make(arr), implementation=impl)
            return jnp.sum(jnp.sin(o)), o

        results = {impl: jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True),
                                 static_argnums=4)(arr, q, k, v, impl)
                   for impl in ("pallas", "xla")}
        (_, o_p), g_p = results["pallas"]
        (_, o_x), g_x = results["xla"]
        rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
        row = {"score_mod": name, "T": t, "out rel-RMSE": rel(o_p, o_x)}
        for n, a, b in zip(("d captured", "dq", "dk", "dv"), g_p, g_x, strict=True):
            row[f"{n} rel-RMSE"] = max(rel(x, y) for x, y in zip(
                jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        print(row, flush=True)
        rows.append(row)
    return rows


def run_flash_bias(lengths, batch, heads, head_dim, rank, dtype, with_backward, rounds=5):
    """FlashBias (``bias_factors``, folded) vs the dense ``u @ w^T`` bias vs plain causal."""
    rows = []
    causal = masks.causal()
    for t in lengths:
        ks = jax.random.split(jax.random.PRNGKey(t), 5)
        q, k, v = (jax.random.normal(kk, (batch, t, heads, head_dim), dtype) for kk in ks[:3])
        u = 0.3 * jax.random.normal(ks[3], (batch, heads, t, rank), dtype)
        w = 0.3 * jax.random.normal(ks[4], (batch, heads, t, rank), dtype)
        args = (q, k, v, u, w)

        def plain(q, k, v, u, w):
            return jattn.attention(q, k, v, mask=causal, implementation="xla")

        def flash_bias(q, k, v, u, w):
            return jattn.attention(q, k, v, mask=causal, bias_factors=(u, w),
                                   implementation="xla")

        def dense(q, k, v, u, w):
            bias = jnp.einsum("bhqr,bhkr->bhqk", u, w)  # [B, H, T, T], inside the step
            return jattn.attention(q, k, v, mask=causal, bias=bias, implementation="xla")

        variants = (("causal", plain, (0, 1, 2)),
                    (f"bias_factors R={rank}", flash_bias, (0, 1, 2, 3, 4)),
                    (f"bias=u@w^T R={rank}", dense, (0, 1, 2, 3, 4)))
        rows += _measure(variants, args, t, with_backward, rounds)
    return rows


def main(argv=None):
    p = harness.arguments(__doc__, lengths=[1024, 4096, 8192], heads=8, head_dim=64, window=512,
                          dtype="float32", backward=True, out=None)
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[16384],
                   help="lengths at which only compiled memory is reported")
    p.add_argument("--score-mod", action="store_true",
                   help="ALiBi via score_mod vs dense bias= vs plain causal instead, and the "
                   "Pallas captured-array check (JSON default benchmarks/score_mod.json)")
    p.add_argument("--pallas-check-length", type=int, default=256,
                   help="T of the Pallas (interpret-mode) correctness check; 0 skips it")
    p.add_argument("--flash-bias", action="store_true",
                   help="FlashBias bias_factors vs dense u @ w^T bias vs plain causal instead "
                   "(JSON default benchmarks/flash_bias.json)")
    p.add_argument("--rank", type=int, default=16, help="rank R of the FlashBias factors")
    args = p.parse_args(argv)
    cols = ["variant", "T", "fwd ms", "fwd / causal", "fwd+bwd ms", "fwd+bwd / causal",
            "fwd mem MiB", "fwd+bwd mem MiB", "fwd args+out MiB", "fwd+bwd args+out MiB"]
    if args.score_mod:
        rows = run_score_mod(args.lengths, args.batch, args.heads, args.head_dim,
                             jnp.dtype(args.dtype), not args.no_backward)
        print(harness.table(rows, cols))
        checks = []
        if args.pallas_check_length:
            checks = check_pallas_score_mods(args.pallas_check_length)
            print(harness.table(checks, list(checks[0])))
        harness.write_json(args.out or "benchmarks/score_mod.json",
                           {"machine": harness.machine(), "args": vars(args), "rows": rows,
                            "pallas_check": checks})
        return rows
    if args.flash_bias:
        rows = run_flash_bias(args.lengths, args.batch, args.heads, args.head_dim, args.rank,
                              jnp.dtype(args.dtype), not args.no_backward)
        print(harness.table(rows, cols))
        harness.write_json(args.out or "benchmarks/flash_bias.json",
                           {"machine": harness.machine(), "args": vars(args), "rows": rows})
        return rows
    rows = run(args.lengths, args.batch, args.heads, args.head_dim, args.window,
               jnp.dtype(args.dtype), not args.no_backward, args.memory_lengths)
    cols = ["mask", "T", "density", "1/density", "fwd jattn ms", "fwd dpa ms", "fwd speedup",
            "fwd+bwd jattn ms", "fwd+bwd dpa ms", "fwd+bwd speedup", "fwd mem jattn MiB",
            "fwd mem dpa MiB", "fwd+bwd mem jattn MiB", "fwd+bwd mem dpa MiB"]
    print(harness.table(rows, cols))
    harness.write_json(args.out or "benchmarks/attention.json",
                       {"machine": harness.machine(), "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
