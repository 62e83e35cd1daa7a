"""MQAR sweep: accuracy vs state size per mechanism (Zoology, Arora et al. 2023, Fig. 2 style).

    python -m studies.mqar_sweep --workdir /tmp/mqar_sweep --preset cpu \\
        --mechanisms softmax gla deltanet --d-models 32 64 [--config.train_steps=600 ...]

Runs ``configs/mqar.py:<preset>`` once per (mechanism, d_model) into
``WORKDIR/<mechanism>_d<d>/`` through the runner (in this process, one after the other; a run
that already has a ``summary.json`` is reused, an interrupted one resumes from its checkpoint),
then writes ``WORKDIR/mqar_sweep.json`` (one row per run: mechanism, d_model, state_size,
accuracy, steps, wall time) and ``WORKDIR/mqar_sweep.png`` (accuracy vs per-layer state size,
log x, one line per mechanism). ``--plot-only`` redraws from existing summaries.
"""

from __future__ import annotations

import functools
import json
import os

from studies.cli import parse_args, sweep_parser, sweep_rows, train_unless_done


def run_name(mechanism: str, d_model: int) -> str:
    return f"{mechanism.replace(':', '-')}_d{d_model}"


def run_one(workdir: str, preset: str, mechanism: str, d_model: int, overrides: dict) -> dict:
    """Trains (or reuses) one run; returns its table row."""
    from configs.mqar import get_config

    def make_config():
        config = get_config(preset)
        config.model.mechanism = mechanism
        config.model.d_model = d_model
        return config

    path = os.path.join(workdir, run_name(mechanism, d_model))
    return row(train_unless_done(path, make_config, overrides,
                                 f"mqar_sweep {mechanism} d={d_model}"))


def row(summary_path: str) -> dict:
    with open(summary_path) as f:
        s = json.load(f)
    c = s["config"]
    return {
        "mechanism": s["mechanism"],
        "d_model": s["d_model"],
        "state_size": s["state_size_per_layer"][0],
        "accuracy": s["accuracy"],
        "seq_len": s["seq_len"],
        "num_kv_pairs": s["num_kv_pairs"],
        "vocab_size": s["vocab_size"],
        "train_steps": s["step"],
        "learning_rate": c.get("learning_rate"),
        "wall_time_s": round(s["wall_time_s"], 1),
        "run": os.path.basename(os.path.dirname(summary_path)),
    }


def plot(rows: list[dict], path: str) -> str:
    from experiments.plots import subplots

    fig, ax = subplots(figsize=(6.4, 4.4), dpi=110)
    for mech in sorted({r["mechanism"] for r in rows}):
        pts = sorted(
            (r["state_size"], r["accuracy"], r["d_model"]) for r in rows if r["mechanism"] == mech
        )
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=mech)
        for x, y, d in pts:
            ax.annotate(
                f"d={d}",
                (x, y),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=line.get_color(),
            )
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("state size per layer (floats; softmax: KV cache 2Td)")
    ax.set_ylabel("MQAR accuracy (held out)")
    r0 = rows[0]
    ax.set_title(
        f"MQAR: T={r0['seq_len']}, {r0['num_kv_pairs']} pairs, vocab "
        f"{r0['vocab_size']}, {r0['train_steps']} steps"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    p = sweep_parser(__doc__, preset="cpu", preset_help="ARG of configs/mqar.py (e.g. cpu, 256)",
                     mechanisms=["softmax", "gla", "deltanet"])
    p.add_argument("--d-models", nargs="+", type=int, default=[32, 64])
    args, overrides = parse_args(p, argv)
    runs = [(run_name(mech, d),
             functools.partial(run_one, args.workdir, args.preset, mech, d, overrides))
            for mech in args.mechanisms for d in args.d_models]
    rows = sweep_rows(args.workdir, runs, args.plot_only, row)
    table = os.path.join(args.workdir, "mqar_sweep.json")
    with open(table, "w") as f:
        json.dump(rows, f, indent=1)
    png = plot(rows, os.path.join(args.workdir, "mqar_sweep.png"))
    print(f"{'mechanism':>16} {'d':>4} {'state':>8} {'acc':>6} {'steps':>6} {'wall s':>7}")
    for r in rows:
        print(
            f"{r['mechanism']:>16} {r['d_model']:>4} {r['state_size']:>8} "
            f"{r['accuracy']:>6.3f} {r['train_steps']:>6} {r['wall_time_s']:>7}"
        )
    print(f"[mqar_sweep] table: {table}\n[mqar_sweep] plot: {png}")
    return rows


if __name__ == "__main__":
    main()
