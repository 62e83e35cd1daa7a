"""Pallas chunked linear attention (GLA, Gated DeltaNet, KDA) vs jattn's XLA chunk form vs
Pallas causal flash attention.

    python -m benchmarks.linear_pallas [--lengths 2048 8192 16384] [--out FILE.json]
    python -m benchmarks.linear_pallas --small    # tiny sizes, interpret mode: a CPU smoke run

B=1, H=16, K=V=128, bf16, chunk 64; forward and forward+backward (grads of q, k, v).
Mechanisms: ``gla`` (per-channel gate), ``gdn`` (delta rule, scalar gate, q/k L2-norm),
``kda`` (delta rule, per-channel gate). Implementations: ``pallas``
(``pallas_kernels.chunk_gla`` / ``chunk_delta_rule``), ``xla_chunk`` (``jattn.linear.*``
with ``implementation="chunk"``) and ``flash_causal`` (``pallas_kernels.flash_attention``
with a causal block map; D=128), the quadratic baseline.

FLOP counts (model FLOPs of the chunk algorithm, per (b, h) and token, chunk C):
GLA forward ``2C(K+V) + 4KV`` (intra-chunk scores and A v, inter-chunk q h and k^T v);
delta rule forward ``2C(3K+2V) + 6KV`` (adds the UT transform's k k^T, T v, T k and w h);
backward counted as 2x forward. Flash: ``4 T^2 D / 2`` forward (causal), backward 2.5x.
TFLOP/s are these counts over the measured time: comparable across lengths and
implementations of the same mechanism, not across mechanisms. ``vs_xla_chunk`` is the
speedup of pallas over xla_chunk; ``relerr_vs_xla`` the forward output's relative RMSE
between the two (a sanity check at full size).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jattn.linear as jl
import pallas_kernels
from benchmarks import harness

PEAK_TFLOPS = 790.0  # H200 SXM dense bf16


def linear_flops(mech, b, h, t, kd, vd, c):
    per_tok = 2 * c * (kd + vd) + 4 * kd * vd
    if mech != "gla":
        per_tok = 2 * c * (3 * kd + 2 * vd) + 6 * kd * vd
    return float(b * h * t * per_tok)


def _causal_block_map(t, bq, bk):
    q0 = np.arange(-(-t // bq))[:, None] * bq
    k0 = np.arange(-(-t // bk))[None, :] * bk
    q1 = np.minimum(q0 + bq, t) - 1
    k1 = np.minimum(k0 + bk, t) - 1
    full = (k1 <= q0) & (q0 + bq <= t) & (k0 + bk <= t)
    return np.where(k0 > q1, 0, np.where(full, 2, 1)).astype(np.int8)


def _inputs(mech, b, t, h, kd, vd, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, kd), dtype)
    k = jax.random.normal(ks[1], (b, t, h, kd), dtype)
    v = jax.random.normal(ks[2], (b, t, h, vd), dtype)
    gshape = (b, t, h) if mech == "gdn" else (b, t, h, kd)
    # fla's GLA init: log-sigmoid gates / 16 (decay mostly in (0.9, 1)).
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], gshape, jnp.float32)) / 16
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), jnp.float32))
    if mech == "gla":
        k = k / np.sqrt(kd)
    return q, k, v, g, beta


def implementations(mech, g, beta, chunk, small, flash_block):
    """name -> fn(q, k, v) -> o."""

    def lin(impl):
        if mech == "gla":
            if impl == "pallas":
                return lambda q, k, v: pallas_kernels.chunk_gla(q, k, v, g, chunk_size=chunk)[0]
            return lambda q, k, v: jl.gla(q, k, v, g, chunk_size=chunk, implementation=impl)[0]
        kw = dict(g=g, use_qk_l2norm=True, chunk_size=chunk)
        if impl == "pallas":
            return lambda q, k, v: pallas_kernels.chunk_delta_rule(q, k, v, beta, **kw)[0]
        return lambda q, k, v: jl.delta_rule(q, k, v, beta, implementation=impl, **kw)[0]

    impls = {"pallas": lin("pallas"), "xla_chunk": lin("chunk")}
    if mech == "gla":  # the quadratic baseline once per length (it ignores the gates)

        def flash(q, k, v):
            t = q.shape[1]
            return pallas_kernels.flash_attention(
                q,
                k,
                v,
                block_map=_causal_block_map(t, flash_block, flash_block),
                mask_fn=lambda qi, ki, h: ki <= qi,
                block_q=flash_block,
                block_kv=flash_block,
            )

        impls["flash_causal"] = flash
    return impls


def run(lengths, mechs, b, h, kd, vd, chunk, dtype, small, flash_block):
    rows = []
    for t in lengths:
        for mech in mechs:
            q, k, v, g, beta = _inputs(mech, b, t, h, kd, vd, dtype, seed=t)
            outs = {}
            for name, fn in implementations(mech, g, beta, chunk, small, flash_block).items():
                if name == "flash_causal":
                    fwd_flops = 4.0 * b * h * t * t * kd * 0.5
                    bwd_mult = 3.5
                else:
                    fwd_flops = linear_flops(mech, b, h, t, kd, vd, chunk)
                    bwd_mult = 3.0
                for mode in ("fwd", "fwd+bwd"):
                    row = dict(
                        mech=mech if name != "flash_causal" else "softmax",
                        impl=name,
                        T=t,
                        mode=mode,
                    )
                    rows.append(row)
                    f = fn if mode == "fwd" else harness.fwd_bwd(fn)
                    try:
                        compiled = harness.compile_fn(f, q, k, v)
                        sec = harness.time_compiled(
                            compiled,
                            q,
                            k,
                            v,
                            repeats=2 if small else 10,
                            min_time=0.0 if small else 0.2,
                        )
                    except Exception as e:  # noqa: BLE001 - report and continue
                        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        print(name, mech, t, mode, row["note"], flush=True)
                        continue
                    if mode == "fwd" and name != "flash_causal":
                        outs[name] = compiled(q, k, v)
                        if name == "pallas":
                            row["out_dtype"] = str(outs[name].dtype)
                    if mode == "fwd" and name == "xla_chunk" and "pallas" in outs:
                        # forward agreement, reported on the pallas row: rel. RMSE vs xla
                        a = np.asarray(outs["pallas"].astype(jnp.float32), np.float64)
                        e = np.asarray(outs[name].astype(jnp.float32), np.float64)
                        err = float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))
                        for r in rows:
                            if (r["impl"], r["mech"], r["T"], r["mode"]) == (
                                "pallas",
                                mech,
                                t,
                                "fwd",
                            ):
                                r["relerr_vs_xla"] = err
                    flops = fwd_flops * (1.0 if mode == "fwd" else bwd_mult)
                    row.update(
                        ms=sec * 1e3,
                        tflops=flops / sec / 1e12,
                        temp_mb=(harness.temp_bytes(compiled) or 0) / 2**20,
                    )
                    print(
                        f"{row['mech']:8s} {name:12s} T={t:6d} {mode:8s} {row['ms']:10.3f} ms "
                        f"{row['tflops']:8.3f} TFLOP/s",
                        flush=True,
                    )
    # speedup of pallas over xla_chunk, same mechanism / length / mode
    base = {(r["mech"], r["T"], r["mode"]): r.get("ms") for r in rows if r["impl"] == "xla_chunk"}
    for r in rows:
        ref = base.get((r["mech"], r["T"], r["mode"]))
        if r["impl"] == "pallas" and ref and r.get("ms"):
            r["vs_xla_chunk"] = ref / r["ms"]
    return rows


def main(argv=None):
    p = harness.arguments(
        __doc__, lengths=[2048, 8192, 16384], heads=16, key_dim=128, value_dim=128, chunk=64,
        flash_block=128, dtype="bfloat16", out=None,  # benchmarks/linear_pallas[_small].json
    )
    p.add_argument(
        "--mechs", nargs="+", default=["gla", "gdn", "kda"], choices=["gla", "gdn", "kda"]
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="tiny sizes in interpret mode (CPU smoke run; timings meaningless)",
    )
    a = p.parse_args(argv)
    if a.small:
        a.lengths, a.heads, a.key_dim, a.value_dim, a.chunk, a.flash_block = (
            [64, 96],
            2,
            32,
            32,
            32,
            32,
        )
    out = a.out or (
        "benchmarks/linear_pallas_small.json" if a.small else "benchmarks/linear_pallas.json"
    )
    run_ = functools.partial(
        run,
        a.lengths,
        a.mechs,
        a.batch,
        a.heads,
        a.key_dim,
        a.value_dim,
        a.chunk,
        jnp.dtype(a.dtype),
        a.small,
        a.flash_block,
    )
    rows = run_()
    cols = [
        "mech",
        "impl",
        "T",
        "mode",
        "ms",
        "tflops",
        "vs_xla_chunk",
        "relerr_vs_xla",
        "temp_mb",
        "note",
    ]
    print(harness.table(rows, cols))
    payload = dict(machine=harness.machine(), peak_tflops=PEAK_TFLOPS, args=vars(a), rows=rows)
    harness.write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
