"""Host-side compile time of a long flash attention call (issue 21: must not grow with S).

    python -m benchmarks.flash_compile_time cpu     # lower + XLA:CPU compile, interpret mode
    python -m benchmarks.flash_compile_time cuda    # jax.export for ("cuda",) from this host

Forward + backward of ``pallas_kernels.flash_attention`` at S = 65536 (B = H = 1, D = 64) with
``sliding_window(1024)`` and 128 x 128 blocks: a 512 x 512 block map. ``cpu`` includes XLA's
constant folding, which is where an in-graph ``argsort`` of a static block map used to cost
10-20 s; ``cuda`` only traces and lowers (XLA:GPU compiles on the device). Both print the number
of ``stablehlo.sort`` ops left in the module (0 when the block lists are compacted on the host).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax import export

from jattn import masks
from pallas_kernels import flash_attention

BLOCK = 128


def fwd_bwd_fn(seq_len: int, window: int, mode: str):
    mask = masks.sliding_window(window)
    backend = "cuda" if mode == "cuda" else "tpu"

    def fwd_bwd(q, k, v):
        def f(q, k, v):
            block_map = mask.block_map(seq_len, seq_len, BLOCK, BLOCK)  # static: Python ints
            return flash_attention(q, k, v, block_map=block_map,
                                   mask_fn=mask.index_fn(seq_len, seq_len), block_q=BLOCK,
                                   block_kv=BLOCK, interpret=mode == "cpu", backend=backend)
        o, pull = jax.vjp(f, q, k, v)
        return (o,) + pull(o)

    return fwd_bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("cpu", "cuda"))
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    fn = jax.jit(fwd_bwd_fn(args.seq_len, args.window, args.mode))
    dtype = jnp.bfloat16 if args.mode == "cuda" else jnp.float32
    x = jax.ShapeDtypeStruct((1, args.seq_len, 1, 64), dtype)
    t0 = time.perf_counter()
    if args.mode == "cuda":
        checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        text = export.export(fn, platforms=("cuda",), disabled_checks=checks)(x, x, x).mlir_module()
        print(f"export for cuda: {time.perf_counter() - t0:.2f} s; "
              f"sort ops: {text.count('stablehlo.sort')}")
        return
    lowered = fn.lower(x, x, x)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"cpu (interpret): lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, total {t2 - t0:.2f} s;"
          f" sort ops: {lowered.as_text().count('stablehlo.sort')}")


if __name__ == "__main__":
    main()
