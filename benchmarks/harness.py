"""Side-by-side timing harness: median wall time, compiled temp memory, a table and JSON.

Timings are ratios within one run (the machines are shared and noisy); memory is XLA's own
account from ``compiled.memory_analysis()``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax


def arguments(
    doc: str,
    *,
    lengths: list[int],
    heads: int,
    out: str | None,
    batch: int = 1,
    dtype: str | None = None,
    backward: bool = False,
    **sizes: int,
) -> argparse.ArgumentParser:
    """The flags the attention benchmarks share: ``--lengths``, ``--batch``, ``--heads``, one
    int flag per entry of `sizes` (``head_dim=64`` gives ``--head-dim``), ``--dtype`` and
    ``--no-backward`` when asked for, and ``--out``; the caller adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=lengths)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--heads", type=int, default=heads)
    for name, default in sizes.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    if dtype is not None:
        p.add_argument("--dtype", default=dtype)
    if backward:
        p.add_argument("--no-backward", action="store_true")
    p.add_argument("--out", default=out, help="JSON path")
    return p


def compile_fn(fn: Callable, *args):
    """Jit, lower and compile ``fn(*args)``; returns the compiled executable."""
    return jax.jit(fn).lower(*args).compile()


def temp_bytes(compiled) -> int | None:
    """Temporary (scratch) bytes XLA allocates for one call, or None if not reported."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backends without memory analysis
        return None


def time_compiled(compiled, *args, repeats: int = 5, min_time: float = 0.2) -> float:
    """Median seconds per call after one warm-up call; repeats until ``min_time`` is spent."""
    jax.block_until_ready(compiled(*args))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(fn: Callable) -> Callable:
    """``(q, k, v) -> grads of sum(fn(q, k, v))`` w.r.t. q, k and v."""
    return jax.grad(lambda q, k, v: fn(q, k, v).astype("float32").sum(), argnums=(0, 1, 2))


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "platform": dev.platform,
        "device": getattr(dev, "device_kind", str(dev)),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}"
        return "-" if x is None else str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
