"""The command line every study shares: argparse for its own flags plus the runner's
``--config.key=value`` overrides (parsed by `experiments.config.parse_overrides`)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from experiments.config import parse_overrides

OVERRIDES_HELP = (
    "config overrides for every run, as for `python -m experiments.run`: "
    "--config.KEY=VALUE (e.g. --config.log_every=25 --config.model.mechanism=gla)"
)


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``(args, overrides)``: the parser's flags, and the ``--config.KEY=VALUE`` items as a
    flat dict of dotted keys (for ``ConfigDict.update_from_flattened_dict``).

    ``--set KEY=VALUE ...`` (the studies' former syntax) is accepted as an alias. Any other
    unknown argument is a usage error (exit 2).
    """
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="alias of --config.KEY=VALUE (former syntax)")
    parser.epilog = OVERRIDES_HELP
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        overrides = parse_overrides([*args.set, *rest])
    except ValueError as e:
        parser.error(str(e))
    return args, overrides


def train_unless_done(path: str, make_config: Callable[[], Any], overrides: dict,
                      label: str) -> str:
    """Trains the config ``make_config()`` (with the ``--config.k=v`` overrides, no progress
    bar) into ``path`` unless the run already finished there; returns its ``summary.json``
    path. A study rerun therefore only trains what is missing."""
    summary_path = os.path.join(path, "summary.json")
    if not os.path.exists(summary_path):
        from experiments.trainer import train

        config = make_config()
        config.progress_bar = False
        config.update_from_flattened_dict(overrides)
        t0 = time.time()
        train(config, path)
        print(f"[{label}]: {time.time() - t0:.0f}s", flush=True)
    return summary_path
