"""Bigram-Backcopy: several runs side by side (Guo et al. 2024, the Adam / SGD / ReLU figure).

    python -m studies.bb_compare /tmp/bb_adam /tmp/bb_sgd /tmp/bb_relu --out /tmp/bb.png

Reads each run's ``summary.json`` ``trajectory`` (a finished run, or the last finished stage of
one grown in stages) and draws one line per run in four panels: ``Attn<s>``, ``‖Val<s>‖``,
``‖Res<s>‖`` after layer 0 and the backcopy risk. Each line is labelled by what sets the runs
apart (layers, optimizer, learning rate, attention normalizer, width, batch). It also prints a
markdown table of each run's metrics at the steps they share (``--steps`` picks them).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

PANELS = (
    ("attn_sink", "Attn<s> (layer 0)", False),
    ("value_norm", "||Val<s>|| (layer 0)", False),
    ("residual_norm", "||Res<s>|| after layer 0", False),
    ("backcopy_risk", "backcopy risk (nats)", True),
)
# config keys (dotted) a label may mention, in this order, with how they read
LABEL_KEYS = (
    ("model.num_layers", "{}L"),
    ("optimizer", "{}"),
    ("learning_rate", "lr {:g}"),
    ("model.mechanism", "{}"),
    ("model.d_model", "d {}"),
    ("batch_size", "batch {}"),
    ("seq_len", "T {}"),
)
# where runs saved before the `config.model` subtree kept those keys
LEGACY_KEYS = {
    "model.num_layers": "num_layers",
    "model.mechanism": "normalizer",
    "model.d_model": "d_model",
}
_MISSING = object()


def config_value(config: dict[str, Any], key: str) -> Any:
    """``config[a][b]`` for the dotted `key` ``"a.b"`` of a saved run's config (also found
    under its :data:`LEGACY_KEYS` name in runs saved before the rename); a sentinel if absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            legacy = LEGACY_KEYS.get(key)
            return config.get(legacy, _MISSING) if legacy else _MISSING
        node = node[part]
    return node


def load(run_dir: str) -> dict[str, Any]:
    """``{"dir", "config", "trajectory"}`` of one run; a clear error if it has no trajectory."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no summary.json (has the run finished a stage?)")
    with open(path) as f:
        summary = json.load(f)
    if summary.get("config", {}).get("task") != "bigram_backcopy" or "trajectory" not in summary:
        raise ValueError(f"{run_dir}: not a bigram_backcopy run (no 'trajectory' in summary.json)")
    return {"dir": run_dir, "config": summary["config"], "trajectory": summary["trajectory"]}


def labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Per run, the config values that differ between the runs (the directory name if none)."""
    def shown(r: dict[str, Any], key: str) -> str:
        v = config_value(r["config"], key)
        return json.dumps(None if v is _MISSING else v)

    differing = [
        (key, fmt) for key, fmt in LABEL_KEYS if len({shown(r, key) for r in runs}) > 1
    ]
    out = []
    for r in runs:
        values = [(fmt, config_value(r["config"], key)) for key, fmt in differing]
        parts = [fmt.format(v) for fmt, v in values if v is not _MISSING]
        out.append(", ".join(parts) or os.path.basename(os.path.normpath(r["dir"])))
    return out


def table(runs: Sequence[dict[str, Any]], steps: Sequence[int] | None = None) -> str:
    """Markdown: one row per (run, metric), one column per step all runs logged."""
    by_step = [{p["step"]: p for p in r["trajectory"]} for r in runs]
    shared = sorted(set.intersection(*(set(s) for s in by_step)))
    if steps is not None:
        shared = [s for s in shared if s in set(steps)]
    lines = ["| run | metric | " + " | ".join(str(s) for s in shared) + " |",
             "| --- | --- |" + " --- |" * len(shared)]
    for label, points in zip(labels(runs), by_step, strict=True):
        for key, _, _ in PANELS:
            cells = " | ".join(f"{points[s].get(key, float('nan')):.4g}" for s in shared)
            lines.append(f"| {label} | {key} | {cells} |")
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], out: str) -> str:
    """The four panels, one line per run, written to `out` (PNG, atomically)."""
    from experiments.plots import subplots

    fig, axes = subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6), dpi=100)
    for label, run in zip(labels(runs), runs, strict=True):
        steps = [p["step"] for p in run["trajectory"]]
        for ax, (key, _, _) in zip(axes, PANELS, strict=True):
            ax.plot(steps, [p.get(key, float("nan")) for p in run["trajectory"]], label=label,
                    marker="." if len(steps) < 30 else None)
    for ax, (_, title, logy) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if logy:
            ax.set_yscale("log")
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("Bigram-Backcopy: " + ", ".join(sorted({os.path.basename(
        os.path.normpath(r["dir"])) for r in runs})))
    fig.tight_layout()
    tmp = f"{out}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with a summary.json)")
    parser.add_argument("--out", default="bb_compare.png", help="the figure's path")
    parser.add_argument("--steps", type=int, nargs="*", help="table columns (default: all shared)")
    args = parser.parse_args(argv)
    runs = [load(d) for d in args.runs]
    md = table(runs, args.steps)
    print(md)
    print(f"[bb_compare] figure: {plot(runs, args.out)}")
    return md


if __name__ == "__main__":
    main()
