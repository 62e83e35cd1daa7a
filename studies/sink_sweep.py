"""Sink sweep: Gu et al.'s sink score ``Sink_1^0.3`` and the final loss per attention mechanism.

    python -m studies.sink_sweep --workdir /tmp/sink_sweep [--mechanisms softmax sigmoid ...] \\
        [--preset tiny] [--config.train_steps=400 ...]

Trains ``configs/sink_sweep.py:<preset>`` once per mechanism into ``WORKDIR/<mechanism>/``
through the runner (in this process, one after the other; a run with a ``summary.json`` is
reused, an interrupted one resumes from its checkpoint), then writes ``WORKDIR/sink_sweep.json``
(one row per mechanism), ``WORKDIR/sink_sweep.md`` (a markdown table) and
``WORKDIR/sink_sweep.png`` (bars: sink score and final eval loss per mechanism).
``--plot-only`` redraws from existing summaries.
"""

from __future__ import annotations

import functools
import json
import os

from studies.cli import parse_args, sweep_parser, sweep_rows, train_mechanism

#: Gu et al. 2024 (a small LM, not this setup): Sink_1^0.3 in percent.
PUBLISHED = {"softmax": 18.0, "sigmoid": 0.4}


def run_one(workdir: str, preset: str, mechanism: str, overrides: dict) -> dict:
    """Trains (or reuses) one run; returns its table row."""
    from configs.sink_sweep import get_config

    return row(train_mechanism(workdir, get_config, preset, mechanism, overrides, "sink_sweep"))


def row(summary_path: str) -> dict:
    """One table row from a finished run's ``summary.json``."""
    with open(summary_path) as f:
        s = json.load(f)
    final, c = s["final"], s["config"]
    return {
        "mechanism": c["model"]["mechanism"],
        "sink_score": final["sink_score"],
        "attn_sink": final.get("attn_sink"),
        "eval_loss": final["eval_loss"],
        "train_loss": final["train_loss"],
        "backcopy_risk": final.get("backcopy_risk"),
        "train_steps": s["step"],
        "wall_time_s": round(s["wall_time_s"], 1),
    }


def table(rows: list[dict]) -> str:
    """Markdown: one line per mechanism (Gu et al.'s number where they report one)."""
    lines = ["| mechanism | Sink_1^0.3 (%) | Attn<s> layer 0 | eval loss | backcopy risk | "
             "steps | wall (s) | Gu et al. Sink_1^0.3 (%) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pub = PUBLISHED.get(r["mechanism"])
        lines.append(
            f"| {r['mechanism']} | {r['sink_score']:.1f} | {r['attn_sink']:.3f} | "
            f"{r['eval_loss']:.3f} | {r['backcopy_risk']:.3f} | {r['train_steps']} | "
            f"{r['wall_time_s']:.0f} | {'' if pub is None else f'~{pub:g}'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """Two bar panels: sink score (%) and final eval loss per mechanism."""
    from experiments.plots import subplots

    names = [r["mechanism"] for r in rows]
    xs = range(len(rows))
    fig, (ax0, ax1) = subplots(1, 2, figsize=(11, 4), dpi=110)
    ax0.bar(xs, [r["sink_score"] for r in rows], color="tab:blue")
    ax0.set_ylabel("Sink_1^0.3 (% of layer-head pairs)")
    ax0.set_ylim(0, 105)
    ax1.bar(xs, [r["eval_loss"] for r in rows], color="tab:orange")
    ax1.set_ylabel("final eval loss (nats/token)")
    for ax in (ax0, ax1):
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_xlabel("attention mechanism")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Bigram-Backcopy, {rows[0]['train_steps']} steps: attention sink per mechanism")
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    from configs.sink_sweep import MECHANISMS

    p = sweep_parser(__doc__, preset="", preset_help="ARG of configs/sink_sweep.py ('' or 'tiny')",
                     mechanisms=MECHANISMS)
    args, overrides = parse_args(p, argv)
    runs = [(mech.replace(":", "-"),
             functools.partial(run_one, args.workdir, args.preset, mech, overrides))
            for mech in args.mechanisms]
    rows = sweep_rows(args.workdir, runs, args.plot_only, row)
    md = table(rows)
    with open(os.path.join(args.workdir, "sink_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.workdir, "sink_sweep.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"[sink_sweep] figure: {plot(rows, os.path.join(args.workdir, 'sink_sweep.png'))}")
    return rows


if __name__ == "__main__":
    main()
