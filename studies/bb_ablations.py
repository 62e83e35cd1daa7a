"""Bigram-Backcopy ablations grown side by side: 3-layer Adam vs SGD vs ReLU attention (Guo et
al. 2024: the residual peak of <s> grows under Adam, not under SGD or ReLU attention).

    # the paper's size (d 256, batch 512): an accelerator job, or CPU hours in resumable stages
    python -m studies.bb_ablations --workdir /tmp/bb_abl --steps 1000 --stage 50
    # CPU size (d 64, T 64) as measured in experiments/README.md
    python -m studies.bb_ablations --workdir /tmp/bb_abl_cpu --preset cpu --steps 1000 \\
        --config.batch_size=64 --config.eval_batch_size=64 --config.log_every=50 \\
        --config.eval_every=50
    # CPU-sized model, the paper's optimizers and batch (Adam 3e-4, SGD 0.03, batch 512)
    python -m studies.bb_ablations --workdir /tmp/bb_abl_b512 --preset cpu --paper-lrs \\
        --steps 3000 --stage 500 --config.batch_size=512

Runs ``configs/bigram_backcopy.py:<preset>,<variant>`` for each variant into
``WORKDIR/<variant>/`` through the runner, in this process, in stages: every run reaches
``--stage`` steps, then 2x``--stage``, ... up to ``--steps``, so an interrupted job (or one
stopped to free the machine) leaves all runs at about the same step; rerunning the same
command resumes each from its checkpoint. After every stage it rewrites
``WORKDIR/bb_ablations.png`` and ``WORKDIR/bb_ablations.md`` (``studies.bb_compare``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from studies import bb_compare
from studies.cli import parse_args

# variant -> (ARG tokens of configs/bigram_backcopy.py, learning rate at the CPU preset; the
# paper's rates come from the tokens themselves: Adam 3e-4, SGD 0.03)
VARIANTS = {
    "3layer_adam": ("3layer", 1e-3),
    "3layer_sgd": ("3layer,sgd", 0.03),
    "3layer_relu": ("3layer,relu", 1e-3),
}


def reached(run_dir: str) -> int:
    """The step of the run's last finished stage (0 if none)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["step"])


def advance(workdir: str, variant: str, preset: str, steps: int, overrides: dict,
            paper_lrs: bool = False) -> None:
    """Trains (resuming) `variant` up to `steps` unless it is there already.

    Under the ``cpu`` preset the variant's CPU learning rate replaces the paper's unless
    `paper_lrs`."""
    run_dir = os.path.join(workdir, variant)
    if reached(run_dir) >= steps:
        return
    from configs.bigram_backcopy import get_config
    from experiments.trainer import train

    tokens, cpu_lr = VARIANTS[variant]
    config = get_config(",".join(t for t in (preset, tokens) if t))
    if "cpu" in preset.split(","):
        config.learning_rate = get_config(tokens).learning_rate if paper_lrs else cpu_lr
    config.progress_bar = False
    config.update_from_flattened_dict(overrides)
    if "checkpoint_every" not in overrides and int(config.eval_every) > 0:
        # an interrupted stage loses at most one eval interval
        config.checkpoint_every = min(int(config.checkpoint_every), int(config.eval_every))
    config.train_steps = steps
    print(f"[bb_ablations] {variant} -> step {steps}", flush=True)
    train(config, run_dir)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", default="", help="extra ARG tokens, e.g. cpu (default: the paper)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=1000, help="final step of every run")
    p.add_argument("--stage", type=int, default=0, help="steps per stage (0: one stage)")
    p.add_argument("--paper-lrs", action="store_true",
                   help="keep the paper's learning rates (Adam 3e-4, SGD 0.03) under --preset cpu")
    args, overrides = parse_args(p, argv)
    if args.steps < 1 or args.stage < 0:
        raise SystemExit(f"--steps must be >= 1 and --stage >= 0, got {args.steps}, {args.stage}")
    if "train_steps" in overrides:
        raise SystemExit("use --steps, not --config.train_steps=")
    os.makedirs(args.workdir, exist_ok=True)
    stage = args.stage or args.steps
    md = ""
    for target in [*range(stage, args.steps, stage), args.steps]:
        for variant in args.variants:
            advance(args.workdir, variant, args.preset, target, overrides, args.paper_lrs)
        runs = [bb_compare.load(os.path.join(args.workdir, v)) for v in args.variants]
        md = bb_compare.table(runs)
        with open(os.path.join(args.workdir, "bb_ablations.md"), "w") as f:
            f.write(md + "\n")
        bb_compare.plot(runs, os.path.join(args.workdir, "bb_ablations.png"))
        print(f"[bb_ablations] all runs at step {target}: {args.workdir}/bb_ablations.png",
              flush=True)
    print(md)
    return md


if __name__ == "__main__":
    main()
