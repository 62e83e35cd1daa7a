"""Context-parallel attention: per-device memory and ring / allgather / unsplit wall time.

    python -m benchmarks.context_parallel [--lengths 16384 65536] [--contexts 1 2 4 8]
        [--time-length 16384] [--time-context 8] [--out benchmarks/context_parallel.json]

Runs on 8 simulated CPU devices (``--xla_force_host_platform_device_count=8`` is set before JAX
starts). Memory: XLA's compiled per-device temp allocation (``memory_analysis()``) of causal
attention forward+backward, ``jax.grad`` of ``sum(out)`` w.r.t. q, k, v, with the sequence split
over a ``context`` mesh axis of 1 (the unsplit call on one device), 2, 4 and 8 devices; the
target is ~1/n for ``ring``. Time: the same step at one length, ring vs allgather vs unsplit;
the simulated devices share the host's cores, so this is the overhead of the split (the
permutes, hops and merges), not a speed-up.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn  # noqa: E402
from benchmarks import harness  # noqa: E402
from jattn import masks  # noqa: E402

MIB = 1 << 20


def _step(strategy: str | None):
    """fwd+bwd of causal attention; ``strategy=None`` is the unsplit call."""
    kw = {} if strategy is None else {"context_axis": "context", "context_strategy": strategy}
    return harness.fwd_bwd(lambda q, k, v: jattn.attention(q, k, v, mask=masks.causal(), **kw))


def _compile(strategy: str | None, n: int, b: int, t: int, h: int, d: int):
    """Compiled step and (mesh or None, args as ShapeDtypeStructs)."""
    if strategy is None:
        args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)] * 3
        return jax.jit(_step(None)).lower(*args).compile(), None
    mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])
    sharding = NamedSharding(mesh, P(None, "context"))
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.float32, sharding=sharding)] * 3
    with jax.set_mesh(mesh):
        return jax.jit(_step(strategy)).lower(*args).compile(), mesh


def memory_rows(lengths, contexts, b, h, d):
    rows = []
    for t in lengths:
        for n in contexts:
            row = {"T": t, "context": n}
            for strategy in ("ring", "allgather"):
                compiled, _ = _compile(None if n == 1 else strategy, n, b, t, h, d)
                mem = compiled.memory_analysis()
                row[f"{strategy} temp MiB"] = mem.temp_size_in_bytes / MIB
                row["args MiB"] = mem.argument_size_in_bytes / MIB
                row["out MiB"] = mem.output_size_in_bytes / MIB
                # What one device holds during the step: its shards of q/k/v and dq/dk/dv and
                # the scratch.
                row[f"{strategy} total MiB"] = (mem.temp_size_in_bytes
                                                + mem.argument_size_in_bytes
                                                + mem.output_size_in_bytes) / MIB
                if n == 1:
                    break  # one device: both strategies are the unsplit call
            rows.append(row)
            print(row, flush=True)
    base = {r["T"]: r for r in rows if r["context"] == 1}
    for r in rows:
        if r["T"] in base:
            for what in ("temp", "total"):
                r[f"ring {what} x unsplit"] = (r[f"ring {what} MiB"]
                                               / base[r["T"]][f"ring {what} MiB"])
    return rows


def time_rows(t, n, b, h, d, repeats):
    q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.float32)
               for key in jax.random.split(jax.random.key(0), 3))
    rows = []
    for strategy in (None, "ring", "allgather"):
        compiled, mesh = _compile(strategy, n, b, t, h, d)
        if mesh is None:
            sec = harness.time_compiled(compiled, q, k, v, repeats=repeats, min_time=0.0)
        else:
            sharded = [jax.device_put(x, NamedSharding(mesh, P(None, "context")))
                       for x in (q, k, v)]
            sec = harness.time_compiled(compiled, *sharded, repeats=repeats, min_time=0.0)
        rows.append({"impl": strategy or "unsplit (1 device)", "T": t,
                     "context": 1 if strategy is None else n, "fwd+bwd s": sec})
        print(rows[-1], flush=True)
    for r in rows:
        r["x unsplit"] = r["fwd+bwd s"] / rows[0]["fwd+bwd s"]
    return rows


def main(argv=None):
    p = harness.arguments(__doc__, lengths=[16384, 65536], heads=1, dim=32, repeats=2,
                          time_length=16384, time_context=8, out="benchmarks/context_parallel.json")
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-time", action="store_true")
    a = p.parse_args(argv)
    mem = memory_rows(a.lengths, a.contexts, a.batch, a.heads, a.dim)
    print(harness.table(mem, ["T", "context", "args MiB", "out MiB", "ring temp MiB",
                              "allgather temp MiB", "ring temp x unsplit", "ring total MiB",
                              "allgather total MiB", "ring total x unsplit"]))
    timing = []
    if not a.no_time:
        timing = time_rows(a.time_length, a.time_context, a.batch, a.heads, a.dim, a.repeats)
        print(harness.table(timing, ["impl", "T", "context", "fwd+bwd s", "x unsplit"]))
    harness.write_json(a.out, {
        "machine": harness.machine(),
        "config": {"B": a.batch, "H": a.heads, "D": a.dim, "dtype": "float32", "mask": "causal",
                   "devices": "8 simulated CPU devices"},
        "memory": mem, "timing": timing})


if __name__ == "__main__":
    main()
