"""jattn's blocked XLA attention vs ``jax.nn.dot_product_attention`` on the host platform.

    python -m benchmarks.attention [--lengths 1024 4096 8192] [--out benchmarks/attention.json]

For each mask (causal; sliding window 512) and length: forward and forward+backward time of
``jattn.attention(implementation="xla")`` and of ``jax.nn.dot_product_attention`` (which
computes the full square and masks it), their ratio, the ratio expected from FLOPs (1/density),
and compiled temp memory. B=1, H=8, D=64, fp32 by default.
"""

from __future__ import annotations

import functools

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


def main(argv=None):
    p = harness.arguments(__doc__, lengths=[1024, 4096, 8192], heads=8, head_dim=64, window=512,
                          dtype="float32", backward=True, out="benchmarks/attention.json")
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[16384],
                   help="lengths at which only compiled memory is reported")
    args = p.parse_args(argv)
    rows = run(args.lengths, args.batch, args.heads, args.head_dim, args.window,
               jnp.dtype(args.dtype), not args.no_backward, args.memory_lengths)
    cols = ["mask", "T", "density", "1/density", "fwd jattn ms", "fwd dpa ms", "fwd speedup",
            "fwd+bwd jattn ms", "fwd+bwd dpa ms", "fwd+bwd speedup", "fwd mem jattn MiB",
            "fwd mem dpa MiB", "fwd+bwd mem jattn MiB", "fwd+bwd mem dpa MiB"]
    print(harness.table(rows, cols))
    harness.write_json(args.out, {"machine": harness.machine(), "args": vars(args),
                                  "rows": rows})
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
