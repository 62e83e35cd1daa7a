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


def train_mechanism(workdir: str, get_config: Callable[[str | None], Any], preset: str,
                    mechanism: str, overrides: dict, label: str) -> str:
    """:func:`train_unless_done` for ``get_config(preset)`` with ``model.mechanism`` set, in
    ``workdir/<mechanism>`` (``:`` spelled ``-``); returns its ``summary.json`` path."""

    def make_config():
        config = get_config(preset or None)
        config.model.mechanism = mechanism
        return config

    path = os.path.join(workdir, mechanism.replace(":", "-"))
    return train_unless_done(path, make_config, overrides, f"{label} {mechanism}")


def sweep_parser(doc: str, *, preset: str, preset_help: str,
                 mechanisms: Sequence[str]) -> argparse.ArgumentParser:
    """The flags every sweep shares: ``--workdir``, ``--preset`` (the config's ARG),
    ``--mechanisms`` and ``--plot-only``; a sweep adds its own before :func:`parse_args`."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", default=preset, help=preset_help)
    p.add_argument("--mechanisms", nargs="+", default=list(mechanisms))
    p.add_argument("--plot-only", action="store_true", help="only redraw from summaries")
    return p


def sweep_rows(workdir: str, runs: Sequence[tuple[str, Callable[[], dict]]], plot_only: bool,
               row: Callable[[str], dict]) -> list[dict]:
    """The table rows of a sweep's ``runs`` (``(run folder name, train-or-reuse -> row)``
    pairs): with ``plot_only``, only the finished runs' rows, read by ``row(summary_path)``,
    without training. No row at all exits with a message."""
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for name, run in runs:
        if plot_only:
            path = os.path.join(workdir, name, "summary.json")
            if os.path.exists(path):
                rows.append(row(path))
        else:
            rows.append(run())
    if not rows:
        raise SystemExit("no finished runs to plot")
    return rows
