"""Part 1 of ``benchmarks/gpu_suite.py``: correctness at fresh random inputs against the fp32
reference, forward and every gradient (flash features of issue 21, chunk kernels of issue 22),
plus the input draws and kernel calls the timing part shares."""

from __future__ import annotations

import math
import re
import traceback
import zlib
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

import jattn
import jattn.linear as jl
import pallas_kernels
from jattn import masks

if TYPE_CHECKING:
    from benchmarks.gpu_suite import Run, Sizes

TOL = {  # relative error bars per family and dtype
    ("flash", "bfloat16"): 1e-2, ("flash", "float32"): 2e-3,
    ("chunk", "bfloat16"): 1.5e-2, ("chunk", "float32"): 2.5e-3,
}



def fail_row(row: dict, e: BaseException) -> None:
    msg = str(e).strip().splitlines()
    row.update(status="failed", reason=f"{type(e).__name__}: {msg[0][:200] if msg else ''}")
    row["trace"] = traceback.format_exc(limit=-3)[-600:]


# ------------------------------------------------------------------------------------------
# Part 1: correctness
# ------------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def _compare(got: dict, want: dict) -> dict:
    return {name: _rel(got[name], want[name]) for name in want}


def _loss_and_grads(fn, diff: dict, rest: dict, weights: dict):
    """``{output: value} | {"d" + input: gradient}`` of ``sum_o <fn(...)[o], weights[o]>``."""

    def loss(d):
        outs = fn(**d, **rest)
        return sum(jnp.vdot(outs[n].astype(jnp.float32), weights[n]) for n in weights), outs

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(diff).compile()
    (_, outs), grads = compiled(diff)
    return {**outs, **{"d" + n: g for n, g in grads.items()}}, kernels(compiled)


def kernels(compiled) -> list[str]:
    """The GPU kernel custom calls in a compiled executable (Mosaic GPU, Triton, cuDNN): which
    path really ran (e.g. a feature the Mosaic forward lacks falls back to Triton)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - backends without HLO text
        return []
    names = re.findall(r'custom_call_target="([^"]+)"', text)
    return sorted({n for n in names if re.search("mosaic|triton|cudnn", n)})


def flash_checks(sz: Sizes, seed: int):
    """``name -> (kwargs builder, q_len, kv_len[, head dim])``: the feature list of issue 21
    (head dim: the run's unless given)."""
    t, hq = sz.check_t, sz.check_heads[0]
    rng = np.random.default_rng(seed)

    def documents(n, length):
        cuts = np.sort(rng.choice(np.arange(1, length), n - 1, replace=False))
        return jnp.asarray(np.searchsorted(cuts, np.arange(length), side="right")[None]
                           .repeat(2, 0), jnp.int32)

    def block_mask():
        bq, bk = jattn.attention_block_sizes(t, t, implementation="pallas")
        nq, nk = -(-t // bq), -(-t // bk)
        keep = rng.random((2, hq, nq, nk)) < 0.5
        keep |= np.eye(nq, nk, dtype=bool)  # the diagonal: every causal row sees a key
        return jnp.asarray(keep)

    side = int(math.isqrt(t))
    return {
        "causal": (lambda: dict(mask=masks.causal()), t, t),
        "causal, D=64": (lambda: dict(mask=masks.causal()), t, t, 64),
        "sliding window": (lambda: dict(mask=masks.sliding_window(max(16, t // 4))), t, t),
        "sinks + soft-cap": (lambda: dict(mask=masks.causal(), logits_soft_cap=20.0,
                                          sinks=jnp.asarray(rng.standard_normal(hq),
                                                            jnp.float32)), t, t),
        "segment ids": (lambda: dict(mask=masks.causal(), segment_ids=documents(4, t)), t, t),
        "cross, ragged Tq != Tk": (lambda: dict(), max(16, (2 * t) // 3), t),
        "block-sparse block_mask": (lambda: dict(mask=masks.causal(), block_mask=block_mask()),
                                    t, t),
        "2-D neighborhood": (lambda: dict(mask=masks.neighborhood((side, side), 5)),
                             side * side, side * side),
    }


def run_flash_checks(run: Run, sz: Sizes):
    b, (hq, hkv) = 2, sz.check_heads
    for dtype in sz.check_dtypes:
        for name, (kwargs_fn, tq, tk, *dim) in flash_checks(sz, run.args.seed).items():
            d = min(dim[0], sz.check_dim) if dim else sz.check_dim
            if sz.flash_check_cases is not None and name not in sz.flash_check_cases:
                continue
            if dtype == "float32" and name not in ("causal", "sinks + soft-cap", "segment ids"):
                continue  # fp32: a subset (time); bf16 covers every feature
            rng = np.random.default_rng([run.args.seed, zlib.crc32(f"{name}{dtype}".encode())])
            diff = {n: jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
                    for n, t, h in (("q", tq, hq), ("k", tk, hkv), ("v", tk, hkv))}
            weights = dict(o=jnp.asarray(rng.standard_normal((b, tq, hq, d)), jnp.float32),
                           lse=jnp.asarray(rng.standard_normal((b, hq, tq)), jnp.float32))
            kw = kwargs_fn()
            if "sinks" in kw:
                diff["sinks"] = kw.pop("sinks")
            want = None
            # the Mosaic forward serves bf16 without soft-cap / segment ids: there, both paths
            both = dtype == "bfloat16" and name not in ("sinks + soft-cap", "segment ids")
            for path, ctx in run.paths(both):
                row = run.row(part="check", family="flash", case=name, impl=path, dtype=dtype,
                              shape=f"B={b} Tq={tq} Tk={tk} H={hq}/{hkv} D={d}")
                if row.get("status"):
                    continue
                try:
                    want = want or _loss_and_grads(_attend("reference", kw), diff, {}, weights)[0]
                    with ctx():
                        got, row["kernels"] = _loss_and_grads(_attend("pallas", kw), diff, {},
                                                              weights)
                    _verdict(row, _compare(got, want), TOL[("flash", dtype)])
                except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
                    fail_row(row, e)
                _print_check(row)
        run.save()


def _attend(impl: str, kw: dict):
    """``(**arrays) -> {"o", "lse"}`` of ``jattn.attention`` (fp32 inputs for the reference)."""

    def call(**a):
        if impl == "reference":
            a = {n: x.astype(jnp.float32) for n, x in a.items()}
        o, lse = jattn.attention(**a, **kw, return_lse=True, implementation=impl)
        return dict(o=o, lse=lse)

    return call


def _verdict(row, errs, tol):
    worst = max(errs, key=errs.get)
    row.update(errors=errs, max_rel_err=errs[worst], worst=worst, tol=tol,
               status="ok" if errs[worst] <= tol else "failed")
    if row["status"] == "failed":
        row["reason"] = f"{worst}: rel err {errs[worst]:.2e} > {tol:.0e}"


def _print_check(row):
    err = row.get("max_rel_err")
    err = f"{err:.2e} ({row.get('worst')})" if err is not None else row.get("reason", "")
    print(f"check {row['family']:5s} {row['case']:26s} {row['impl']:18s} {row['dtype']:8s} "
          f"{row.get('status', '?'):7s} {err}", flush=True)


CHUNK_MECHS = {  # name -> (kernel kind, gate shape: None / "scalar" / "channel")
    "GLA per-channel gate": ("gla", "channel"),
    "GLA scalar gate": ("gla", "scalar"),
    "DeltaNet": ("delta", None),
    "Gated DeltaNet": ("delta", "scalar"),
    "KDA": ("delta", "channel"),
}


class Draw:
    """Fresh standard normals / uniforms as fp32 jax arrays, drawn on the device (numpy would
    spend seconds per 64K-token array on the host)."""

    def __init__(self, *seed: int):
        tag = zlib.crc32(repr(seed[1:]).encode()) % 2**31  # stable across processes
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed[0]), tag)

    def _next(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def normal(self, *shape, dtype=jnp.float32):
        return jax.random.normal(self._next(), shape, jnp.float32).astype(dtype)

    def uniform(self, *shape):
        return jax.random.uniform(self._next(), shape, jnp.float32)


def _chunk_inputs(draw: Draw, kind, gate, b, t, h, kd, dtype):
    diff = dict(q=draw.normal(b, t, h, kd, dtype=dtype),
                k=(draw.normal(b, t, h, kd) / math.sqrt(kd)).astype(dtype),
                v=draw.normal(b, t, h, kd, dtype=dtype),
                initial_state=draw.normal(b, h, kd, kd) * 0.1)
    if gate is not None:  # fla-style log-sigmoid / 16 gates, with some strong channels
        shape = (b, t, h, kd) if gate == "channel" else (b, t, h)
        g = jax.nn.log_sigmoid(draw.normal(*shape)) / 16
        diff["g"] = jnp.where(draw.uniform(*shape) < 0.05, g * 40, g)
    if kind == "delta":
        diff["beta"] = jax.nn.sigmoid(draw.normal(b, t, h))
    return diff


def chunk_timing_inputs(draw: Draw, kind, gate, b, t, h, kd) -> tuple:
    """``(q, k, v, *gates)`` for timing: gates ``g`` (if any) then ``beta`` (delta rule)."""
    d = _chunk_inputs(draw, kind, gate, b, t, h, kd, jnp.bfloat16)
    return (d["q"], d["k"], d["v"], *(d[n] for n in ("g", "beta") if n in d))


def chunk_call(kind, impl):
    """``(**inputs) -> {"o", "state"}`` for the pallas kernel or a ``jattn.linear`` impl."""

    def call(q, k, v, initial_state, g=None, beta=None):
        common = dict(initial_state=initial_state, output_final_state=True)
        if impl == "pallas":
            if kind == "gla":
                o, s = pallas_kernels.chunk_gla(q, k, v, g, **common)
            else:
                o, s = pallas_kernels.chunk_delta_rule(q, k, v, beta, g=g, use_qk_l2norm=True,
                                                       **common)
        else:
            f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
            q, k, v = f32(q), f32(k), f32(v)
            if kind == "gla":
                o, s = jl.gla(q, k, v, g, implementation=impl, **common)
            else:
                o, s = jl.delta_rule(q, k, v, beta, g=g, use_qk_l2norm=True,
                                     implementation=impl, **common)
        return dict(o=o, state=s)

    return call


def run_chunk_checks(run: Run, sz: Sizes):
    b, t, h, kd = 1, sz.check_t, 4 if not run.args.smoke else 1, min(sz.check_dim, 128)
    for dtype in sz.check_dtypes:
        for name, (kind, gate) in CHUNK_MECHS.items():
            if sz.chunk_check_mechs is not None and name not in sz.chunk_check_mechs:
                continue
            row = run.row(part="check", family="chunk", case=name, impl="pallas", dtype=dtype,
                          shape=f"B={b} T={t} H={h} K=V={kd}")
            if row.get("status"):
                continue
            draw = Draw(run.args.seed, name, dtype)
            diff = _chunk_inputs(draw, kind, gate, b, t, h, kd, dtype)
            weights = dict(o=draw.normal(b, t, h, kd), state=draw.normal(b, h, kd, kd))
            try:
                want = _loss_and_grads(chunk_call(kind, "reference"), diff, {}, weights)[0]
                got, row["kernels"] = _loss_and_grads(chunk_call(kind, "pallas"), diff, {},
                                                      weights)
                _verdict(row, _compare(got, want), TOL[("chunk", dtype)])
            except Exception as e:  # noqa: BLE001
                fail_row(row, e)
            _print_check(row)
        run.save()
