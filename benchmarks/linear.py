"""jattn.linear's chunk form vs its scan reference vs causal softmax attention (host platform).

    python -m benchmarks.linear [--lengths 1024 4096 16384] [--only dplr_chunk dplr_scan]
        [--rounds 5] [--base-rev REV] [--out benchmarks/linear.json]

B=1, H=4, K=V=64, fp32. For each length: forward and forward+backward (gradients w.r.t. every
input) time and compiled temp memory of

* ``gla_chunk`` / ``gla_scan``: ``jattn.linear.gla`` with a per-channel gate (GLA),
  ``implementation="chunk"`` / ``"reference"`` (one ``lax.scan`` step per token);
* ``gdn_chunk`` / ``gdn_scan``: ``jattn.linear.delta_rule`` with a scalar gate and q/k
  L2-norm (Gated DeltaNet), same two implementations;
* ``dplr_chunk`` / ``dplr_scan``: ``jattn.linear.dplr_delta_rule`` in RWKV-7's form
  (per-channel gate, ``a = -0.5 k_hat``, ``b = k_hat`` with ``k_hat`` the L2-normalized key),
  same two implementations; ``dplr_chunk16``: the chunk form with ``chunk_size=16`` (with
  per-channel gates the chunk's score work grows as ``T C K``: smaller chunks win on CPU);
* ``loglinear_chunk`` / ``loglinear_ref``: ``jattn.linear.loglinear_gla`` (log-linear
  attention, Guo et al. 2025) with a scalar gate (log-linear Mamba-2) and level weights
  ``U(0.5, 1.5)``, the chunk form (``O(T log T)``) / the ``O(T^2)`` masked reference;
  ``loglinear_gla_chunk``: the chunk form with a per-channel gate (log-linear GLA). The
  summary's ``growth`` columns divide each chunk form's time by its time at the shortest
  length (``T log T`` predicts 4 x 14/12 = 4.67x from 4K to 16K, linear 4x);
* ``softmax``: causal softmax attention, ``jattn.attention(mask=causal(),
  implementation="xla")`` (falls back to ``jax.nn.dot_product_attention(is_causal=True)`` when
  ``jattn.attention`` is missing; the JSON says which ran).

``--base-rev REV`` adds ``{gdn,kda,dplr}_bb_{now,base}``: ``chunk_recurrence`` of this tree and of
git revision ``REV`` (loaded from ``git show``), for before/after ratios in one process.

``GFLOP``: XLA's ``cost_analysis()`` count (a ``lax.scan`` body counted once: see ``flops``).
Timings: one warm-up call, then the median of ``--repeats`` calls (``block_until_ready``);
calls slower than ``--slow-s`` seconds are timed once. ``--skip-scan-above`` skips timing the
scan reference above that length (its memory is still reported). ``--rounds R`` then measures
the scan/chunk ratios and the log-linear growth interleaved (the two calls of a ratio back to
back, R rounds, median ratio): the figures to quote on a shared, noisy machine.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn.linear as jl
from benchmarks import harness


def softmax_fn():
    try:
        import jattn

        attention, masks = jattn.attention, jattn.masks
    except (ImportError, AttributeError):
        return "jax.nn.dot_product_attention(is_causal=True)", (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
        )
    mask = masks.causal()
    return "jattn.attention(mask=causal(), implementation='xla')", (
        lambda q, k, v: attention(q, k, v, mask=mask, implementation="xla")
    )


def inputs(t, b, h, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((3, b, t, h, d)))
    g_chan = jnp.asarray(np.log(rng.uniform(0.9, 0.999, (b, t, h, d))), jnp.float32)
    g_head = g_chan[..., 0]
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, h)), jnp.float32)
    lam = jnp.asarray(rng.uniform(0.5, 1.5, (b, t, h, jl.loglinear.num_levels(t))), jnp.float32)
    return q, k, v, g_chan, g_head, beta, lam


def cases(softmax):
    """name -> (fn, which inputs it takes)."""
    return {
        "gla_chunk": (lambda q, k, v, g: jl.gla(q, k, v, g, implementation="chunk")[0], "qkvG"),
        "gla_scan": (lambda q, k, v, g: jl.gla(q, k, v, g, implementation="reference")[0], "qkvG"),
        "gdn_chunk": (
            lambda q, k, v, g, beta: jl.delta_rule(
                q, k, v, beta, g=g, use_qk_l2norm=True, implementation="chunk"
            )[0],
            "qkvgb",
        ),
        "gdn_scan": (
            lambda q, k, v, g, beta: jl.delta_rule(
                q, k, v, beta, g=g, use_qk_l2norm=True, implementation="reference"
            )[0],
            "qkvgb",
        ),
        "dplr_chunk": (lambda q, k, v, g: rwkv7_dplr(q, k, v, g, "chunk"), "qkvG"),
        "dplr_chunk16": (lambda q, k, v, g: rwkv7_dplr(q, k, v, g, "chunk", 16), "qkvG"),
        "dplr_scan": (lambda q, k, v, g: rwkv7_dplr(q, k, v, g, "reference"), "qkvG"),
        "loglinear_chunk": (
            lambda q, k, v, g, lam: jl.loglinear_gla(q, k, v, g, lam, implementation="chunk"),
            "qkvgl",
        ),
        "loglinear_ref": (
            lambda q, k, v, g, lam: jl.loglinear_gla(q, k, v, g, lam, implementation="reference"),
            "qkvgl",
        ),
        "loglinear_gla_chunk": (
            lambda q, k, v, g, lam: jl.loglinear_gla(q, k, v, g, lam, implementation="chunk"),
            "qkvGl",
        ),
        "softmax": (softmax, "qkv"),
    }


def load_chunk_module(rev):
    """``jattn/linear/chunk.py`` as it was at git revision ``rev`` (a module of its own)."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:jattn/linear/chunk.py"], check=True,
                         capture_output=True, text=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix="_chunk_base.py", delete=False)
    path.write(src)
    path.close()
    spec = importlib.util.spec_from_file_location("chunk_base", path.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backbone_cases(base_rev):
    """``chunk_recurrence`` itself, now and at ``base_rev``: ``{gdn,kda,dplr}_bb_{now,base}``
    (Gated DeltaNet with L2-normalized q/k, KDA = the same with per-channel gates, RWKV-7's
    DPLR), for before/after ratios in one process."""
    mods = {"now": jl.chunk, "base": load_chunk_module(base_rev)}
    out = {}
    for tag, mod in mods.items():
        def delta(q, k, v, g, beta, mod=mod):
            q, k = jl.l2norm(q), jl.l2norm(k)
            return mod.chunk_recurrence(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]

        def dplr(q, k, v, g, mod=mod):
            k_hat = jl.l2norm(k)
            return mod.chunk_recurrence(q, k, v, g, scale=q.shape[-1] ** -0.5,
                                        low_rank=(-0.5 * k_hat, k_hat))[0]

        out[f"gdn_bb_{tag}"] = (delta, "qkvgb")
        out[f"kda_bb_{tag}"] = (delta, "qkvGb")
        out[f"dplr_bb_{tag}"] = (dplr, "qkvG")
    return out


def rwkv7_dplr(q, k, v, g, implementation, chunk_size=64):
    """RWKV-7's transition: ``a = -icl * k_hat``, ``b = k_hat`` (``icl`` here a constant 0.5)."""
    k_hat = jl.l2norm(k)
    return jl.dplr_delta_rule(
        q, k, v, -0.5 * k_hat, k_hat, g=g, implementation=implementation, chunk_size=chunk_size
    )[0]


def pick_args(spec, q, k, v, g_chan, g_head, beta, lam):
    table = {"q": q, "k": k, "v": v, "G": g_chan, "g": g_head, "b": beta, "l": lam}
    return tuple(table[c] for c in spec)


def fwd_bwd(fn, n_args):
    return jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=tuple(range(n_args)))


def flops(compiled) -> float:
    """XLA's FLOP count of a compiled call (``cost_analysis()``; NaN when unavailable): a
    load-independent measure of the work, but XLA counts a loop body ONCE, so for programs with
    a ``lax.scan`` (the scan references, every chunk form's scan over chunks) it is the count of
    the code outside loops plus one iteration, not the total: compare growth only for loop-free
    programs or per stage."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - backends without a cost model
        return float("nan")


def time_it(compiled, args, repeats, slow_s):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up
    if time.perf_counter() - t0 > slow_s:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        return time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(lengths, batch, heads, dim, repeats, slow_s, skip_scan_above, with_backward, only=None,
        keep=None, base_rev=None):
    """Time every case; ``keep`` (a dict) receives ``(name, T, pass) -> (compiled, args)``."""
    softmax_name, softmax = softmax_fn()
    all_cases = cases(softmax)
    if base_rev:
        all_cases.update(backbone_cases(base_rev))
    rows = []
    for t in lengths:
        data = inputs(t, batch, heads, dim)
        for name, (fn, spec) in all_cases.items():
            if only and name not in only:
                continue
            args = pick_args(spec, *data)
            row = {"impl": name, "T": t}
            passes = [("fwd", fn)]
            if with_backward:
                passes.append(("fwd+bwd", fwd_bwd(fn, len(args))))
            for pname, f in passes:
                compiled = harness.compile_fn(f, *args)
                if keep is not None:
                    keep[name, t, pname] = (compiled, args)
                row[f"{pname} temp MiB"] = harness.temp_bytes(compiled) / 2**20
                row[f"{pname} GFLOP"] = flops(compiled) / 1e9
                if name.endswith(("_scan", "_ref")) and t > skip_scan_above:
                    continue
                row[f"{pname} ms"] = 1e3 * time_it(compiled, args, repeats, slow_s)
            rows.append(row)
            print(row, flush=True)
    return softmax_name, rows


# (label, numerator, denominator): a ratio > 1 means the denominator is faster.
RATIO_PAIRS = (("gla", "gla_scan", "gla_chunk"), ("gdn", "gdn_scan", "gdn_chunk"),
               ("dplr", "dplr_scan", "dplr_chunk"), ("dplr16", "dplr_scan", "dplr_chunk16"),
               ("gdn base/now", "gdn_bb_base", "gdn_bb_now"),
               ("kda base/now", "kda_bb_base", "kda_bb_now"),
               ("dplr base/now", "dplr_bb_base", "dplr_bb_now"))


def interleaved_ratios(keep, lengths, rounds):
    """Ratios measured side by side: each round times the two calls of a ratio back to back
    (one call each) and the median over ``rounds`` rounds is reported, so load changes on a
    shared machine hit both sides alike. ``scan/chunk`` per mechanism and length, and the
    log-linear chunk forms' growth ``time(T) / time(lengths[0])``."""
    specs = []
    for t in lengths:
        for pname in ("fwd", "fwd+bwd"):
            for label, num, den in RATIO_PAIRS:
                what = "" if "/" in label else " scan/chunk"
                specs.append((f"{label} {pname}{what} T={t}", (num, t, pname),
                              (den, t, pname)))
            for name in ("loglinear_chunk", "loglinear_gla_chunk"):
                if t != lengths[0]:
                    specs.append((f"{name} {pname} growth {lengths[0]}->{t}", (name, t, pname),
                                  (name, lengths[0], pname)))
    out = {}
    for label, num, den in specs:
        if num not in keep or den not in keep:
            continue
        ratios = []
        for _ in range(rounds):
            times = []
            for key in (num, den):
                compiled, args = keep[key]
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                times.append(time.perf_counter() - t0)
            ratios.append(times[0] / times[1])
        out[label] = {"median": statistics.median(ratios), "rounds": ratios}
        print(f"{label}: median {statistics.median(ratios):.2f} of "
              f"{', '.join(f'{r:.2f}' for r in ratios)}", flush=True)
    return out


def summarize(rows, lengths):
    by = {(r["impl"], r["T"]): r for r in rows}
    out = []
    for t in lengths:
        s = {"T": t}
        for pname in ("fwd", "fwd+bwd"):
            key = f"{pname} ms"
            for mech, chunk_name, scan_name in (
                ("gla", "gla_chunk", "gla_scan"),
                ("gdn", "gdn_chunk", "gdn_scan"),
                ("dplr", "dplr_chunk", "dplr_scan"),
                ("dplr16", "dplr_chunk16", "dplr_scan"),
                ("loglinear", "loglinear_chunk", "loglinear_ref"),
            ):
                chunk = by.get((chunk_name, t), {}).get(key)
                scan = by.get((scan_name, t), {}).get(key)
                soft = by.get(("softmax", t), {}).get(key)
                if chunk and scan:
                    s[f"{mech} {pname} scan/chunk"] = scan / chunk
                if chunk and soft:
                    s[f"{mech} {pname} softmax/chunk"] = soft / chunk
            for name in ("loglinear_chunk", "loglinear_gla_chunk"):
                base = by.get((name, lengths[0]), {}).get(key)
                now = by.get((name, t), {}).get(key)
                if base and now and t != lengths[0]:
                    s[f"{name} {pname} growth"] = now / base
        out.append(s)
    return out


def main(argv=None):
    p = harness.arguments(
        __doc__, lengths=[1024, 4096, 16384], heads=4, dim=64, repeats=5,
        skip_scan_above=1 << 30, backward=True, out="benchmarks/linear.json",
    )
    p.add_argument(
        "--slow-s", type=float, default=2.0, help="a call slower than this (warm-up) is timed once"
    )
    p.add_argument("--only", nargs="+", default=None, help="run only these cases (by name)")
    p.add_argument("--base-rev", default=None,
                   help="also time chunk_recurrence from this git revision (before/after)")
    p.add_argument("--rounds", type=int, default=0,
                   help="also measure the ratios interleaved, median over this many rounds")
    a = p.parse_args(argv)
    lengths = sorted(a.lengths)
    keep = {} if a.rounds else None
    softmax_name, rows = run(
        lengths,
        a.batch,
        a.heads,
        a.dim,
        a.repeats,
        a.slow_s,
        a.skip_scan_above,
        not a.no_backward,
        a.only,
        keep,
        a.base_rev,
    )
    side_by_side = interleaved_ratios(keep, lengths, a.rounds) if a.rounds else {}
    ratios = summarize(rows, lengths)
    cols = ["impl", "T", "fwd ms", "fwd+bwd ms", "fwd GFLOP", "fwd+bwd GFLOP", "fwd temp MiB",
            "fwd+bwd temp MiB"]
    print(harness.table(rows, cols))
    rcols = sorted({c for r in ratios for c in r if c != "T"})
    print(harness.table(ratios, ["T"] + rcols))
    harness.write_json(
        a.out,
        {
            "machine": harness.machine(),
            "config": {
                "B": a.batch,
                "H": a.heads,
                "K": a.dim,
                "V": a.dim,
                "dtype": "float32",
                "repeats": a.repeats,
                "softmax": softmax_name,
            },
            "rows": rows,
            "ratios": ratios,
            "interleaved_ratios": side_by_side,
        },
    )
    print(f"wrote {a.out}; softmax baseline: {softmax_name}")


if __name__ == "__main__":
    main()
