"""One-call GPU suite for issues 21 (flash attention) and 22 (chunked linear attention).

    python -m benchmarks.gpu_suite [--out benchmarks/gpu_suite.json] [--budget 330]
                                   [--part all|check|flash|chunk] [--seed N]
    python -m benchmarks.gpu_suite --smoke     # CPU: tiny sizes, interpret mode, no cuDNN

Part 1, correctness at fresh random inputs (``--seed``, default: the clock; recorded in the
JSON) against the fp32 reference, forward and every gradient, as relative errors
``||got - want|| / ||want||`` with per-dtype tolerances (issue 21 measured bf16 2e-3 to 3e-3,
fp32 4e-4 to 5e-4 on an H200; issue 22 bf16 1e-3 to 4e-3, fp32 3e-4 to 6e-4; the bars below
leave 3-5x headroom):

* flash (``jattn.attention(..., implementation="pallas")``, ``return_lse=True``, the loss
  weighs both ``o`` and ``lse``): causal, sliding window, GQA 8:2 without copying K/V, sinks +
  soft-cap, segment ids (documents), ragged and cross lengths (Tq != Tk, not multiples of the
  block), run-time block-sparse ``block_mask``, a static 2-D neighborhood map; on Hopper each
  flash case runs twice: the default dispatch (Mosaic GPU forward) and the Triton kernel;
* chunk kernels (``pallas_kernels.chunk_gla`` / ``chunk_delta_rule``) vs ``jattn.linear``'s
  scan: GLA per-channel and scalar gates, DeltaNet, Gated DeltaNet, KDA; output, final state
  and the gradients of q, k, v, gates, beta and the initial state.

Part 2, timing side by side (median wall time after a warm-up, one compile per row; compile
seconds recorded): issue 21's cases (B=4 S=4K and B=1 S=16K causal, window 1024 at 16K and
64K, 8 documents in 16K; H=16, D=128, bf16) for jattn pallas (and its Triton kernel on Hopper),
cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``; documents as an explicit mask),
JAX's Pallas GPU ``mha`` (causal and documents only: it has no window), the jattn XLA path;
issue 22's (B=2, H=16, K=V=128, bf16, T = 4K/16K/64K): GLA and Gated DeltaNet chunk kernels
(pallas and XLA chunk) vs cuDNN causal softmax and the jattn flash kernel, and the crossover
length where each chunk kernel's forward+backward beats cuDNN.

TFLOP/s by the standard count: attention forward ``4 B H Tq Tk D x density`` (the visible
fraction), forward+backward 3.5x (backward = 2.5x forward); chunk kernels by
``benchmarks.linear_pallas.linear_flops`` (backward 2x forward). Every peer that cannot run
(no GPU, no cuDNN, an older JAX, a missing feature) gives a row with ``status="skipped"`` and
the reason; a row that raises is ``status="failed"`` with the error; once ``--budget`` seconds
are spent the remaining rows are skipped (the JSON is rewritten after every case).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from benchmarks import harness
from benchmarks.gpu_suite_checks import (
    TOL,
    Draw,
    chunk_call,
    chunk_timing_inputs,
    fail_row,
    kernels,
    run_chunk_checks,
    run_flash_checks,
)
from benchmarks.linear_pallas import linear_flops
from jattn import masks
from pallas_kernels import _flash_mosaic_gpu as mgpu


@dataclasses.dataclass
class Sizes:
    """Shapes of one run (``full`` on a GPU, ``smoke`` on CPU in interpret mode)."""

    check_t: int = 1000  # ragged: not a multiple of 64 or 128
    check_heads: tuple[int, int] = (8, 2)
    check_dim: int = 128
    check_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    flash: tuple = (  # (name, B, S, mask kind, window or documents, modes): issue 21's table
        ("causal 4K", 4, 4096, "causal", None, ("fwd", "fwd+bwd")),
        ("causal 16K", 1, 16384, "causal", None, ("fwd", "fwd+bwd")),
        ("window 1024 @16K", 1, 16384, "window", 1024, ("fwd+bwd",)),
        ("window 1024 @64K", 1, 65536, "window", 1024, ("fwd+bwd",)),
        ("8 documents @16K", 1, 16384, "documents", 8, ("fwd+bwd",)),
    )
    heads: int = 16
    dim: int = 128
    chunk_batch: int = 2
    chunk_lengths: tuple[int, ...] = (4096, 16384, 65536)
    xla_chunk_max_t: int = 16384
    repeats: int = 5
    min_time: float = 0.2
    # subsets (None: all): the smoke run keeps one case of each kind so that it takes seconds
    flash_check_cases: tuple[str, ...] | None = None
    chunk_check_mechs: tuple[str, ...] | None = None
    chunk_timing_mechs: tuple[str, ...] = ("GLA", "Gated DeltaNet", "KDA")
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")


SMOKE = Sizes(check_t=80, check_heads=(2, 1), check_dim=32, check_dtypes=("float32",),
              flash=(("2 documents", 1, 128, "documents", 2, ("fwd+bwd",)),),
              heads=2, dim=32, chunk_batch=1, chunk_lengths=(64,), xla_chunk_max_t=0,
              repeats=1, min_time=0.0, flash_check_cases=("sinks + soft-cap",),
              chunk_check_mechs=("Gated DeltaNet",), chunk_timing_mechs=("Gated DeltaNet",),
              modes=("fwd+bwd",))


#: cumulative fraction of ``--budget`` by the end of each part (checks, flash, chunk timing)
PART_SHARES = {"flash check": 0.15, "chunk check": 0.3, "flash time": 0.65, "chunk time": 1.0}


class Run:
    """Rows, the time budget and incremental JSON output."""

    def __init__(self, args):
        self.args, self.rows, self.start = args, [], time.perf_counter()
        self.on_gpu = jax.default_backend() == "gpu"
        self.hopper = mgpu.on_hopper()

        self.deadline = self.args.budget  # seconds from start; set per part by `part`

    def part(self, name: str) -> None:
        """Open a part: it may run until its cumulative share of the budget (time a part
        leaves unused carries over to the next)."""
        self.deadline = self.args.budget * PART_SHARES[name]

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.start)

    def row(self, **fields) -> dict:
        if self.left() <= 0 and "status" not in fields:
            fields.update(status="skipped", reason=f"budget: {self.deadline:.0f}s of "
                                                   f"{self.args.budget:.0f}s spent")
        self.rows.append(fields)
        return fields

    def save(self):
        payload = dict(machine=harness.machine(), hopper=self.hopper, seed=self.args.seed,
                       smoke=self.args.smoke, budget_s=self.args.budget,
                       elapsed_s=time.perf_counter() - self.start, tolerances=_tol_json(),
                       rows=self.rows)
        harness.write_json(self.args.out, payload)

    def paths(self, both: bool = True):
        """The flash kernels to run: the default dispatch, and on Hopper (``both``) the Mosaic
        GPU forward and the Triton kernel side by side."""
        paths = [("pallas", contextlib.nullcontext)]
        if self.hopper and both:
            paths = [("pallas[mosaic-fwd]", lambda: mgpu.force(True)),
                     ("pallas[triton]", lambda: mgpu.force(False))]
        return paths


def _tol_json():
    return {f"{fam}/{dt}": t for (fam, dt), t in TOL.items()}


# ------------------------------------------------------------------------------------------
# Part 2: timing
# ------------------------------------------------------------------------------------------
def _time(run: Run, row: dict, fn: Callable, inputs: Callable[[], tuple], flops: float,
          ctx=None):
    """Compile (inside ``ctx``), time, and fill ``row``; never raises. ``inputs()`` gives the
    arguments (drawn on first use: a skipped case allocates nothing)."""
    if row.get("status"):
        return
    try:
        args = inputs()
        t0 = time.perf_counter()
        with (ctx or contextlib.nullcontext)():
            compiled = harness.compile_fn(fn, *args)
        row["compile_s"] = time.perf_counter() - t0
        row["kernels"] = kernels(compiled)
        sec = harness.time_compiled(compiled, *args, repeats=run.sizes.repeats,
                                    min_time=run.sizes.min_time)
        row.update(status="ok", ms=sec * 1e3, tflops=flops / sec / 1e12)
    except Exception as e:  # noqa: BLE001
        fail_row(row, e)
    ms = f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s" if "ms" in row else row.get(
        "reason", "")
    print(f"time  {row['case']:22s} {row['mode']:8s} {row['impl']:22s} {ms}", flush=True)


def _grad_fn(fn):
    """Gradients of ``sum(fn(*args))`` w.r.t. every argument (q, k, v and any gates)."""

    def loss(*args):
        return fn(*args).astype(jnp.float32).sum()

    return lambda *args: jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def _density(kind, s, arg, seg) -> float:
    i = np.arange(s, dtype=np.float64)
    if kind == "causal":
        return float((i + 1).sum() / s**2)
    if kind == "window":
        return float(np.minimum(i + 1, arg).sum() / s**2)
    sizes = np.bincount(np.asarray(seg[0]))  # documents, causal inside each
    return float((sizes * (sizes + 1) / 2).sum() / s**2)


def flash_impls(run: Run, kind, s, arg, seg, d, both: bool = True):
    """``name -> (fn(q, k, v) | None, reason, trace-time context)``; ``both``: see Run.paths."""
    window = arg if kind == "window" else None
    mask = masks.causal() if window is None else masks.sliding_window(window)
    seg_ids = seg if kind == "documents" else None
    j = lambda impl: (lambda q, k, v: jattn.attention(  # noqa: E731
        q, k, v, mask=mask, segment_ids=seg_ids, implementation=impl))
    impls = {}
    for path, ctx in run.paths(both and kind != "documents"):  # segments: Triton only
        impls["jattn " + path] = (j("pallas"), None, ctx)
    if not run.on_gpu:
        impls["cudnn"] = (None, "needs a CUDA GPU", None)
    else:
        local = None if window is None else (window - 1, 0)

        def cudnn(q, k, v):
            dense = None
            if seg_ids is not None:  # the explicit [B, 1, T, T] document mask
                dense = (seg_ids[:, None, :, None] == seg_ids[:, None, None, :])
            return jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=True,
                                                local_window_size=local,
                                                implementation="cudnn")

        impls["cudnn"] = (cudnn, None, None)
    if window is not None:
        impls["jax mha"] = (None, "mha has no sliding window", None)
    elif not (run.on_gpu or run.args.smoke):
        impls["jax mha"] = (None, "needs a GPU (Triton)", None)
    else:
        try:
            from jax.experimental.pallas.ops.gpu import attention as gpu_attention

            sizes = gpu_attention.BlockSizes.get_default()
            if run.args.smoke:
                sizes = gpu_attention.BlockSizes(*(min(64, s),) * 6)
            impls["jax mha"] = (lambda q, k, v: gpu_attention.mha(
                q, k, v, segment_ids=seg_ids, sm_scale=1 / math.sqrt(d), causal=True,
                block_sizes=sizes, interpret=run.args.smoke), None, None)
        except Exception as e:  # noqa: BLE001 - an older/newer JAX without it
            impls["jax mha"] = (None, f"{type(e).__name__}: {e}", None)
    impls["jattn xla"] = (j("xla"), None, None)
    return impls


def run_flash_timing(run: Run, sz: Sizes):
    d, h = sz.dim, sz.heads
    for case, b, s, kind, arg, modes in sz.flash:
        draw = Draw(run.args.seed, case)
        qkv = functools.cache(lambda: tuple(draw.normal(b, s, h, d, dtype=jnp.bfloat16)  # noqa: B023
                                            for _ in range(3)))
        seg = None
        if kind == "documents":  # `arg` documents of equal length
            seg = jnp.asarray(np.repeat(np.arange(arg), -(-s // arg))[:s][None].repeat(b, 0),
                              jnp.int32)
        dens = _density(kind, s, arg, seg)
        fwd_flops = 4.0 * b * h * s * s * d * dens
        impls = flash_impls(run, kind, s, arg, seg, d)
        for mode in modes:
            for name, (fn, reason, ctx) in impls.items():
                row = run.row(part="time", family="flash", case=case, mode=mode, impl=name,
                              shape=f"B={b} S={s} H={h} D={d} bf16", density=dens)
                if fn is None:
                    row.update(status="skipped", reason=reason)
                    continue
                f = fn if mode == "fwd" else _grad_fn(fn)
                _time(run, row, f, qkv, fwd_flops * (1.0 if mode == "fwd" else 3.5), ctx)
        _ratios(run.rows, case, "cudnn")
        run.save()


def _ratios(rows, case, base):
    """``vs_<base>``: time ratio (ours / base; < 1 is faster) per row of ``case`` and mode."""
    ref = {r["mode"]: r["ms"] for r in rows
           if r.get("case") == case and r["impl"] == base and "ms" in r}
    for r in rows:
        if r.get("case") == case and "ms" in r and r["mode"] in ref:
            r["vs_" + base] = r["ms"] / ref[r["mode"]]


def run_chunk_timing(run: Run, sz: Sizes):
    b, h, kd = sz.chunk_batch, sz.heads, sz.dim
    for t in sz.chunk_lengths:
        case = f"chunk T={t}"
        draw = Draw(run.args.seed, t)
        # (name, fn(*args), inputs() -> args, forward FLOPs, fwd+bwd multiple, context)
        impls = []
        for mech, kind, gate in (("GLA", "gla", "channel"), ("Gated DeltaNet", "delta", "scalar"),
                                 ("KDA", "delta", "channel")):
            if mech not in sz.chunk_timing_mechs:
                continue
            # gates are arguments, not closed-over constants (GBs baked into the executable)
            inputs = functools.cache(functools.partial(chunk_timing_inputs, draw, kind, gate,
                                                       b, t, h, kd))
            flops = linear_flops("gla" if kind == "gla" else "gdn", b, h, t, kd, kd, 64)
            names = (("g",) if gate else ()) + (("beta",) if kind == "delta" else ())
            for impl in ("pallas", "chunk"):
                if impl == "chunk" and (t > sz.xla_chunk_max_t or mech == "KDA"):
                    continue  # minutes per call at 64K on GPU (issue 22's table)

                def fn(q, k, v, *gates, _c=chunk_call(kind, impl), _names=names):
                    return _c(q, k, v, None, **dict(zip(_names, gates, strict=True)))["o"]

                impls.append((f"{mech} {'pallas' if impl == 'pallas' else 'xla chunk'}",
                              fn, inputs, flops, 3.0, None))
        qkv = functools.cache(lambda: tuple(draw.normal(b, t, h, kd, dtype=jnp.bfloat16)  # noqa: B023
                                            for _ in range(3)))
        soft = flash_impls(run, "causal", t, None, None, kd, both=False)
        dens = _density("causal", t, None, None)
        for name in ("cudnn", *[n for n in soft if n.startswith("jattn pallas")]):
            fn, reason, ctx = soft[name]
            impls.append((f"softmax {name}", fn, qkv, 4.0 * b * h * t * t * kd * dens, 3.5, ctx)
                         if fn else (f"softmax {name}", None, reason, None, None, None))
        for mode in sz.modes:
            for name, fn, inputs, flops, mult, ctx in impls:
                row = run.row(part="time", family="chunk", case=case, mode=mode, impl=name,
                              shape=f"B={b} T={t} H={h} K=V={kd} bf16")
                if fn is None:
                    row.update(status="skipped", reason=inputs)
                    continue
                f = fn if mode == "fwd" else _grad_fn(fn)
                _time(run, row, f, inputs, flops * (1.0 if mode == "fwd" else mult), ctx)
        _ratios(run.rows, case, "softmax cudnn")
        run.save()
    crossover(run)


def crossover(run: Run):
    """Per chunk kernel: the shortest measured T from which its fwd+bwd beats cuDNN causal,
    with the crossing interpolated log-linearly between the bracketing lengths."""
    for mech in ("GLA pallas", "Gated DeltaNet pallas", "KDA pallas"):
        pts = sorted((int(r["case"].split("=")[1]), r["vs_softmax cudnn"]) for r in run.rows
                     if r.get("impl") == mech and r.get("mode") == "fwd+bwd"
                     and "vs_softmax cudnn" in r)
        row = run.row(part="crossover", family="chunk", case="crossover vs cuDNN (fwd+bwd)",
                      impl=mech, mode="fwd+bwd", status="ok", points=pts)
        if not pts:
            row.update(status="skipped", reason="no cuDNN timings")
            continue
        row["crossover_T"] = None
        for (t0, r0), (t1, r1) in zip(pts, pts[1:], strict=False):
            if r0 >= 1.0 > r1:  # ratio falls through 1 between t0 and t1
                w = math.log(r0) / (math.log(r0) - math.log(r1))
                row["crossover_T"] = float(t0 * (t1 / t0) ** w)
        if pts[0][1] < 1.0:
            row["crossover_T"] = f"<= {pts[0][0]}"
        elif row["crossover_T"] is None:
            row["crossover_T"] = f"> {pts[-1][0]}"
        print(f"crossover {mech}: {row['crossover_T']} (ratios {pts})", flush=True)


# ------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/gpu_suite.json)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 330; --smoke: 3000, so that a slow "
                        "CI host still runs every row)")
    p.add_argument("--part", choices=("all", "check", "flash", "chunk"), default="all")
    p.add_argument("--seed", type=int, default=None, help="default: from the clock (fresh)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, interpret mode on CPU: exercises every code path")
    a = p.parse_args(argv)
    a.seed = int(time.time()) % 2**31 if a.seed is None else a.seed
    a.budget = (3000.0 if a.smoke else 330.0) if a.budget is None else a.budget
    a.out = a.out or ("benchmarks/gpu_suite_smoke.json" if a.smoke else
                      "benchmarks/gpu_suite.json")
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    run = Run(args)
    run.sizes = sz = SMOKE if args.smoke else Sizes()
    print(f"gpu_suite: {harness.machine()} hopper={run.hopper} seed={args.seed}", flush=True)
    # all parts: each up to its cumulative share; one part alone: the whole budget
    share = run.part if args.part == "all" else (lambda name: None)
    if args.part in ("all", "check"):
        share("flash check")
        run_flash_checks(run, sz)
        share("chunk check")
        run_chunk_checks(run, sz)
    if args.part in ("all", "flash"):
        share("flash time")
        run_flash_timing(run, sz)
    if args.part in ("all", "chunk"):
        share("chunk time")
        run_chunk_timing(run, sz)
    run.save()
    cols = ["part", "family", "case", "mode", "impl", "dtype", "status", "max_rel_err", "ms",
            "tflops", "vs_cudnn", "vs_softmax cudnn", "compile_s", "crossover_T", "kernels",
            "reason"]
    print(harness.table(run.rows, cols))
    bad = [r for r in run.rows if r.get("part") == "check" and r.get("status") == "failed"]
    print(f"{len(bad)} failed checks; {time.perf_counter() - run.start:.0f}s; wrote {args.out}")
    return dict(rows=run.rows, out=args.out)


if __name__ == "__main__":
    main()
