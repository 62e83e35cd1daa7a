"""Step-time overhead of the experiment runner vs the bare jitted train step (CPU).

    python -m benchmarks.runner_overhead [--steps 200] [--repeats 3] [--out FILE.json]

For each config, one `Trainer` is built and warmed up (a full short run compiles the
train step, eval, histogram and fingerprint functions). Then, alternating to share the
machine's noise fairly:
  * bare:   the same jitted `train_step` on one fixed device batch, `steps` times, then
            `block_until_ready` (no data pipeline, no logging, no checkpoints);
  * runner: `Trainer.run()` in a fresh workdir for the same `steps`: grain data with
            prefetch threads, host->device batch assembly, metric fetch + TensorBoard
            every `log_every`, eval + histograms + images, async orbax checkpoints, the
            final checkpoint wait (its `loop_time_s`).
Overhead = runner / bare - 1 (medians over repeats). "batch data" is the host CPU time to
produce and assemble one batch (no prefetch): on a CPU-only host it competes with the
step's compute, so it bounds what prefetching can hide. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np


def _configs(steps: int):
    from configs.char_lm import get_config as char_lm
    from configs.regression import get_config as regression

    out = {}
    c = char_lm("small")
    c.update(
        dict(
            train_steps=steps, log_every=10, eval_every=100, checkpoint_every=100, progress_bar=True
        )
    )
    out["char_lm small (d=64, T=64, B=32)"] = c
    c = regression()
    c.model.hidden = 1024
    c.model.dim = 256
    c.update(
        dict(
            train_steps=steps,
            batch_size=256,
            log_every=10,
            eval_every=100,
            checkpoint_every=100,
            progress_bar=True,
        )
    )
    out["regression MLP 256-1024 (B=256)"] = c
    return out


def _bare(trainer, state, batch, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t, state


def measure(name: str, config, steps: int, repeats: int) -> dict:
    from experiments import data as data_lib
    from experiments.sharding import make_global_batch
    from experiments.trainer import Trainer
    from models.sharding import axis_rules

    root = tempfile.mkdtemp(prefix="runner_overhead_")
    try:
        trainer = Trainer(config, os.path.join(root, "warmup"))
        trainer.run()  # compiles everything
        with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
            state = trainer._init()
            rows = data_lib.rows_for_process(trainer.mesh, config.batch_size)
            it = data_lib.train_iterator(
                trainer.task.train_source(),
                global_batch=config.batch_size,
                num_steps=steps,
                rows=rows,
                threads=0,
            )
            batch = make_global_batch(next(it), trainer.mesh, config.batch_size)
            _, state = _bare(trainer, state, batch, 3)
            t = time.perf_counter()  # host CPU cost of one batch (generation + assembly)
            for _ in range(20):
                make_global_batch(next(it), trainer.mesh, config.batch_size)
            host = (time.perf_counter() - t) / 20
        bare, runner = [], []
        for r in range(repeats):
            with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
                t, state = _bare(trainer, state, batch, steps)
            bare.append(t / steps)
            trainer.workdir = os.path.join(root, f"run{r}")
            summary = trainer.run()
            runner.append(summary["loop_time_s"] / steps)
        b, u = float(np.median(bare)), float(np.median(runner))
        return {
            "config": name,
            "steps": steps,
            "bare_ms": 1e3 * b,
            "runner_ms": 1e3 * u,
            "overhead_pct": 100.0 * (u / b - 1.0),
            "host_data_ms": 1e3 * host,
            "bare_all_ms": [1e3 * x for x in bare],
            "runner_all_ms": [1e3 * x for x in runner],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = [measure(n, c, args.steps, args.repeats) for n, c in _configs(args.steps).items()]
    machine = (
        f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
    )
    print(f"\nmachine: {machine}")
    print("| config | steps | bare step (ms) | runner step (ms) | overhead | batch data (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['steps']} | {r['bare_ms']:.2f} | {r['runner_ms']:.2f} | "
            f"{r['overhead_pct']:+.1f}% | {r['host_data_ms']:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
