"""Pallas block-sparse flash attention vs XLA / cuDNN / tokamax / JAX's Pallas GPU attention.

    python -m benchmarks.flash [--lengths 1024 4096 16384] [--out benchmarks/flash.json]
    python -m benchmarks.flash --small      # tiny sizes, interpret mode: a CPU smoke run

B=1, H=16, D=128, bf16; masks: causal and sliding window 1024. Forward and forward+backward.
Achieved TFLOP/s use the standard count: forward ``4 * B * H * S * S * D * density`` (density =
visible fraction of the score matrix), forward+backward ``3.5x`` that (backward = 2.5x forward),
and are reported as a fraction of the H200's 790 TFLOP/s dense bf16 peak. Implementations that
cannot run here (cuDNN off GPU, tokamax not installed, mha with a window) are listed with the
reason instead of a time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from pallas_kernels import flash_attention

PEAK_TFLOPS = 790.0  # H200 SXM dense bf16


def density(s: int, window: int | None) -> float:
    """Visible fraction of the causal (window=None) or causal sliding-window score matrix."""
    i = np.arange(s, dtype=np.float64)
    seen = i + 1 if window is None else np.minimum(i + 1, window)
    return float(seen.sum() / (s * s))


def _mask(s, window):
    # Plain index predicates (the same as jattn.masks.causal / sliding_window), so this
    # benchmark needs only pallas_kernels.
    def fn(qi, ki, h):
        ok = (qi < s) & (ki < s) & (ki <= qi)
        return ok if window is None else ok & (ki > qi - window)

    return fn


def _block_map(s, bq, bk, window):
    q0 = np.arange(-(-s // bq))[:, None] * bq
    k0 = np.arange(-(-s // bk))[None, :] * bk
    q1, k1 = np.minimum(q0 + bq, s) - 1, np.minimum(k0 + bk, s) - 1
    empty = k0 > q1
    full = k1 <= q0
    if window is not None:
        empty |= k1 <= q0 - window
        full &= k0 > q1 - window
    full &= (q0 + bq <= s) & (k0 + bk <= s)
    return np.where(empty, 0, np.where(full, 2, 1)).astype(np.int8)


def implementations(s, d, window, small, block_q, block_kv):
    """name -> (fn(q, k, v) or None, reason if None)."""
    impls = {}
    bm = _block_map(s, block_q, block_kv, window)
    impls["pallas_flash"] = (functools.partial(
        flash_attention, block_map=bm, mask_fn=_mask(s, window), block_q=block_q,
        block_kv=block_kv), None)
    local = None if window is None else (window - 1, 0)
    impls["dpa_xla"] = (functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                          local_window_size=local, implementation="xla"), None)
    on_gpu = jax.default_backend() == "gpu"
    impls["dpa_cudnn"] = ((functools.partial(
        jax.nn.dot_product_attention, is_causal=True, local_window_size=local,
        implementation="cudnn"), None) if on_gpu else (None, "needs a CUDA GPU"))
    try:
        import tokamax  # type: ignore[import-not-found]

        impls["tokamax"] = (functools.partial(tokamax.dot_product_attention, is_causal=True,
                                              local_window_size=local), None)
    except ImportError:
        impls["tokamax"] = (None, "tokamax not installed")
    except Exception as e:  # noqa: BLE001
        impls["tokamax"] = (None, f"tokamax: {type(e).__name__}: {e}")
    if window is not None:
        impls["jax_pallas_mha"] = (None, "mha has no sliding window")
    elif not (on_gpu or small):
        impls["jax_pallas_mha"] = (None, "needs a GPU (Triton)")
    else:
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        sizes = gpu_attention.BlockSizes.get_default()
        if small:
            b = min(64, s)
            sizes = gpu_attention.BlockSizes(b, b, b, b, b, b)
        impls["jax_pallas_mha"] = (functools.partial(
            gpu_attention.mha, segment_ids=None, sm_scale=1.0 / math.sqrt(d), causal=True,
            block_sizes=sizes, interpret=small), None)
    return impls


def run(lengths, batch, heads, head_dim, window, dtype, with_backward, small, block_q,
        block_kv):
    rows = []
    for s in lengths:
        q, k, v = (jax.random.normal(kk, (batch, s, heads, head_dim), dtype)
                   for kk in jax.random.split(jax.random.PRNGKey(s), 3))
        for mask_name, win in (("causal", None), (f"window{window}", window)):
            dens = density(s, win)
            fwd_flops = 4.0 * batch * heads * s * s * head_dim * dens
            impls = implementations(s, head_dim, win, small, block_q, block_kv)
            expected = jax.jit(impls["dpa_xla"][0])(q, k, v).astype(jnp.float32)
            for name, (fn, reason) in impls.items():
                for mode in ("fwd", "fwd+bwd") if with_backward else ("fwd",):
                    row = dict(impl=name, mask=mask_name, S=s, mode=mode, density=dens)
                    rows.append(row)
                    if fn is None:
                        row["note"] = reason
                        continue
                    f = fn if mode == "fwd" else harness.fwd_bwd(fn)
                    try:
                        compiled = harness.compile_fn(f, q, k, v)
                        sec = harness.time_compiled(compiled, q, k, v, repeats=3 if small else 10)
                    except Exception as e:  # noqa: BLE001 - report and continue
                        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        continue
                    if mode == "fwd":  # sanity: relative RMS error vs XLA's output
                        got = compiled(q, k, v).astype(jnp.float32)
                        row["rel_err"] = float(jnp.linalg.norm(got - expected)
                                               / jnp.linalg.norm(expected))
                    flops = fwd_flops * (1.0 if mode == "fwd" else 3.5)
                    row.update(ms=sec * 1e3, tflops=flops / sec / 1e12,
                               peak_frac=flops / sec / 1e12 / PEAK_TFLOPS,
                               temp_mb=(harness.temp_bytes(compiled) or 0) / 2**20)
                    print(f"{name:15s} {mask_name:11s} S={s:6d} {mode:8s} "
                          f"{row['ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s", flush=True)
    return rows


def main(argv=None):
    p = harness.arguments(__doc__, lengths=[1024, 4096, 16384], heads=16, head_dim=128,
                          window=1024, block_q=128, block_kv=128, dtype="bfloat16",
                          backward=True, out="benchmarks/flash.json")
    p.add_argument("--small", action="store_true",
                   help="tiny sizes in interpret mode (CPU smoke run; timings meaningless)")
    a = p.parse_args(argv)
    if a.small:
        a.lengths, a.heads, a.head_dim, a.window = [128, 256], 2, 64, 64
        a.block_q = a.block_kv = 64
    rows = run(a.lengths, a.batch, a.heads, a.head_dim, a.window, jnp.dtype(a.dtype),
               not a.no_backward, a.small, a.block_q, a.block_kv)
    cols = ["impl", "mask", "S", "mode", "density", "ms", "tflops", "peak_frac", "temp_mb",
            "rel_err", "note"]
    print(harness.table(rows, cols))
    payload = dict(machine=harness.machine(), peak_tflops=PEAK_TFLOPS, args=vars(a), rows=rows)
    harness.write_json(a.out, payload)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
