"""Per-device compiled memory of jattn.linear with context parallelism (``context_axis``).

    python -m benchmarks.context_parallel_linear [--lengths 16384] [--contexts 1 2 4 8]
        [--out benchmarks/context_parallel_linear.json]

B=1, H=4, K=V=64, fp32, chunk 64, forward+backward (gradients w.r.t. every input, including the
initial state). ``context=1`` is the unsplit call on one device; ``context=n`` splits T over a
mesh axis of n devices (on a CPU host: ``--xla_force_host_platform_device_count``, set here).
Memory is XLA's per-device account (``memory_analysis()`` of the SPMD-partitioned program):
temp (scratch) and argument bytes. Target: both fall ~1/n.

* ``gla``: per-channel gate; ``kda``: delta rule with a per-channel gate and q/k L2-norm;
  ``linear_attention``: causal, elu+1 features, normalized.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn.linear as jl  # noqa: E402
from benchmarks import harness  # noqa: E402

B, H, K, V = 1, 4, 64, 64


def case(name: str, context_axis):
    """``(loss fn, argument names)``; arguments: q, k [B,T,H,K], v, g, beta [B,T,H], S0."""
    if name == "gla":
        f = lambda q, k, v, g, S0: jl.gla(q, k, v, g, initial_state=S0, context_axis=context_axis)
        return f, ("q", "k", "v", "g", "S0")
    if name == "kda":
        f = lambda q, k, v, g, beta, S0: jl.delta_rule(
            q, k, v, beta, g=g, initial_state=S0, use_qk_l2norm=True, context_axis=context_axis
        )
        return f, ("q", "k", "v", "g", "beta", "S0")
    f = lambda q, k, v: jl.linear_attention(q, k, v, context_axis=context_axis)
    return f, ("q", "k", "v")


def measure(name: str, T: int, n: int) -> dict:
    mesh = Mesh(np.array(jax.devices()[:n]), ("context",), axis_types=(AxisType.Auto,))
    seq, rep = NamedSharding(mesh, P(None, "context")), NamedSharding(mesh, P())
    shapes = {
        "q": ((B, T, H, K), seq),
        "k": ((B, T, H, K), seq),
        "v": ((B, T, H, V), seq),
        "g": ((B, T, H, K), seq),
        "beta": ((B, T, H), seq),
        "S0": ((B, H, K, V), rep),
    }
    fn, names = case(name, "context" if n > 1 else None)
    args = [jax.ShapeDtypeStruct(shapes[a][0], jnp.float32, sharding=shapes[a][1]) for a in names]
    loss = lambda *xs: fn(*xs)[0].sum()
    with jax.set_mesh(mesh):
        compiled = harness.compile_fn(jax.grad(loss, argnums=tuple(range(len(args)))), *args)
    mem = compiled.memory_analysis()
    return {
        "fn": name,
        "T": T,
        "context": n,
        "temp_MiB": mem.temp_size_in_bytes / 2**20,
        "args_MiB": mem.argument_size_in_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    rows = [
        measure(name, T, n)
        for T in a.lengths
        for name in ("gla", "kda", "linear_attention")
        for n in a.contexts
    ]
    print(harness.table(rows, ["fn", "T", "context", "temp_MiB", "args_MiB"]))
    if a.out:
        harness.write_json(a.out, {"machine": harness.machine(), "rows": rows})


if __name__ == "__main__":
    main()
