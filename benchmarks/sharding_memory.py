"""Per-device memory of the runner's compiled train step on several meshes (8 CPU devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.sharding_memory \
        [--config configs/char_lm.py:base] [--out FILE.json]

For each mesh, the `Trainer` is built and its jitted train step compiled (not run) on a
global token batch; the table reports XLA's `compiled.memory_analysis()` per device
(arguments = parameters + optimizer state + batch; temp = activations, gradients and
gathered weights live during the step) and the parameter bytes device 0 holds under the
state's shardings. FSDP should divide the argument size by ~fsdp; data parallelism alone
should not. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import tempfile

import jax
import numpy as np

MESHES = {
    "1 device": {"data": 1},
    "data=8": {"data": 8},
    "fsdp=8": {"data": 1, "fsdp": 8},
    "fsdp=4, tensor=2": {"data": 1, "fsdp": 4, "tensor": 2},
    "data=2, context=4": {"data": 2, "context": 4},
}


def load_config(spec: str):
    """`path/to/config.py[:ARG]` -> the config (as `experiments.run` resolves it)."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(arg or None)


def _device0_bytes(abstract_tree) -> int:
    """Bytes of device 0's shards of a tree of sharded `ShapeDtypeStruct`s."""
    total = 0
    for x in jax.tree.leaves(abstract_tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def measure(config, mesh: dict) -> dict:
    from experiments.sharding import make_global_batch
    from experiments.trainer import Trainer
    from models.sharding import axis_rules

    config = config.copy_and_resolve_references()
    config.mesh.update({"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **mesh})
    config.progress_bar = False
    trainer = Trainer(config, tempfile.mkdtemp(prefix="sharding_memory_"))
    b = config.batch_size
    t = config.data.seq_len + 1
    with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
        batch = make_global_batch({"tokens": np.zeros((b, t), np.int32)}, trainer.mesh, b,
                                  trainer.rules)
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    m = compiled.memory_analysis()
    params = trainer.abstract_state["params"]
    return {
        "mesh": dict(trainer.mesh.shape),
        "param_count": trainer.param_count,
        "param_bytes_total": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))),
        "param_bytes_device0": _device0_bytes(params),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/char_lm.py:base")
    p.add_argument("--out", default="")
    args = p.parse_args()
    config = load_config(args.config)
    rows = {name: measure(config, mesh) for name, mesh in MESHES.items()}
    machine = (f"{platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
               f"({jax.default_backend()}, {jax.device_count()} devices)")
    mib = 2.0**20
    print(f"\nmachine: {machine}\nconfig: {args.config} "
          f"({next(iter(rows.values()))['param_count']:,} parameters)")
    print("| mesh | params on device 0 (MiB) | arguments (MiB) | temp (MiB) | outputs (MiB) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['param_bytes_device0'] / mib:.2f} | {r['argument_bytes'] / mib:.2f} "
              f"| {r['temp_bytes'] / mib:.2f} | {r['output_bytes'] / mib:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "config": args.config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
