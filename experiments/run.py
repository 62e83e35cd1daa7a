r"""Experiment entry point.

    python -m experiments.run --config configs/NAME.py[:ARG] --workdir DIR \
        [--config.key=value ...]

`--config` takes a file, or a shipped config by name (`--config mqar:cpu`); a
`configs/NAME.py` that is not in the working directory is looked up among the shipped configs,
so the same command works from outside the repository. `--help` lists them with their ARGs.

Writes `DIR/config.json` (the resolved config), TensorBoard events in `DIR`,
checkpoints in `DIR/checkpoints`, and `DIR/summary.json` at the end. Re-running the
same command resumes from the latest complete checkpoint. One live run per workdir (a
lock in `DIR/.lock`). A workdir whose checkpoints are of another model is refused;
`--restart` moves the old run into `DIR/restart-backup-<time>/` and starts over.

Exit codes: 0 done; 2 a usage problem reported in one `error:` line (bad config value,
missing config file, unusable or busy workdir, incompatible checkpoints); 1 a full disk
(one line; rerun after freeing space to resume) or an unexpected error (a traceback).

Multi-process (one process per host): pass `--distributed` on TPU pods / SLURM /
Kubernetes (JAX detects the cluster), or give the coordinator explicitly:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (also read from
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).
"""

from __future__ import annotations

import ast
import logging as py_logging
import os
import re
import sys
import textwrap
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config: a file configs/NAME.py[:ARG], or a shipped config NAME[:ARG] "
    "(--help lists them).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created if missing).")
_RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "Start over in a workdir that holds a previous run: its files are moved (not deleted) "
    "into DIR/restart-backup-<time>/.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "HOST:PORT of process 0, for multi-process runs.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")), "Number of processes."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("JAX_PROCESS_ID", "0")), "This process's index."
)


# The shipped configs: `configs/` beside `experiments/`, in the checkout and in a wheel alike (where
# both live under `jattn_lab/`). Found on the filesystem: configs import models (and JAX), which
# `--help` and a bad path should not pay for, and the runner never imports `configs`.
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def describe_config(path: Path) -> dict | None:
    """``{"name", "summary", "args"}`` of a config file, read with `ast` (nothing is imported),
    or None if it defines no ``get_config`` (``common.py``, ``__init__.py``).

    ``summary`` is the module docstring's first paragraph on one line; ``args`` the module's
    ``ARGS`` string, the one declaration each shipped config makes for `--help`: what its ARG
    (``--config FILE:ARG``) may be.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
        return None
    doc = ast.get_docstring(tree) or ""
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    args = ""
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and target.id == "ARGS" and node.value is not None:
            args = ast.literal_eval(node.value)
    return {"name": path.stem, "summary": summary, "args": " ".join(str(args).split())}


def shipped_configs(folder: Path = SHIPPED_CONFIGS) -> list[dict]:
    """`describe_config` of every config file in ``folder``, by name."""
    found = (describe_config(p) for p in sorted(folder.glob("*.py")))
    return [d for d in found if d is not None]


def configs_help(folder: Path = SHIPPED_CONFIGS, width: int = 100) -> str:
    """The `--help` section listing the shipped configs, their ARGs and summaries."""
    lines = [f"Shipped configs ({folder}): --config NAME[:ARG] or --config configs/NAME.py[:ARG]"]
    for d in shipped_configs(folder):
        lines.append(f"  {d['name']}")
        for label, text in (("", d["summary"]), ("ARG: ", d["args"] or "(none)")):
            lines += textwrap.wrap(label + text, width, initial_indent=" " * 6,
                                   subsequent_indent=" " * (6 + len(label)))
    return "\n".join(lines)


def resolve_config(spec: str, folder: Path = SHIPPED_CONFIGS) -> str:
    """``FILE[:ARG]`` with FILE made a path that exists where it can be.

    A FILE that exists (relative to the working directory) is kept, so a user's own
    ``configs/x.py`` wins. Otherwise ``configs/NAME.py``, ``NAME.py`` and ``NAME`` name the
    shipped config ``NAME`` when there is one. Anything else is returned unchanged (and then
    reported as missing).
    """
    file, sep, arg = spec.partition(":")
    if os.path.isfile(file):
        return spec
    parts = Path(file).parts
    if len(parts) == 2 and parts[0] == "configs":
        parts = parts[1:]
    if len(parts) == 1:
        name = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
        shipped = folder / f"{name}.py"
        if name and shipped.is_file():
            return f"{shipped}{sep}{arg}"
    return spec


def _resolve_config_argv(argv: list[str]) -> list[str]:
    """argv with the `--config` value passed through `resolve_config`."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _print_help_and_exit(argv: list[str]) -> None:
    """Usage, the shipped configs, and the flags (all of absl's with --helpfull); exit 0."""
    full = "--helpfull" in argv
    flag_help = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
    print(f"{__doc__.strip()}\n\n{configs_help()}\n\nflags:\n{flag_help}")
    if not full:
        print("\nTry --helpfull to see the flags of all modules.")
    sys.exit(0)


def _config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _explain_override_error(argv: list[str], err: Exception) -> str:
    """A message naming the bad `--config.KEY` override (unknown key or bad value)."""
    overrides = [a for a in argv if a.startswith("--config.")]
    path = _config_path(argv)
    config = None
    if path:
        try:
            config = config_flags.config_flags._LoadConfigModule(  # noqa: SLF001
                "config", path.split(":", 1)[0]
            )
            arg = path.split(":", 1)[1] if ":" in path else None
            config = config.get_config(arg) if arg is not None else config.get_config()
        except Exception:  # noqa: BLE001
            config = None
    for o in overrides:
        key = re.split(r"[= ]", o[len("--config.") :], maxsplit=1)[0]
        node = config
        ok = node is not None
        for part in key.split("."):
            if ok and hasattr(node, "keys") and part in node.keys():
                node = node[part]
            else:
                ok = False
        if config is not None and not ok:
            valid = sorted(config.keys())
            return f"unknown config key {key!r} (in {o!r}); top-level keys: {', '.join(valid)}"
    return f"bad config override: {err}"


def _fail(message: str, code: int = 2) -> None:
    """One `error:` line on stderr (a multi-line message joined), then exit (no traceback)."""
    one_line = "; ".join(ln.strip() for ln in str(message).splitlines() if ln.strip())
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_load_error(path: str | None) -> str | None:
    """Why the config file `path` (`FILE[:ARG]`) cannot be loaded, or None if it can be."""
    if path is None:
        return None
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
        names = ", ".join(d["name"] for d in shipped_configs())
        return f"config file {file!r} not found (--config={path}); shipped configs: {names}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with readable errors for bad `--config.*` overrides; `--help` lists
    the shipped configs; `--config` values are resolved by `resolve_config`."""
    if any(a in _HELP for a in argv[1:argv.index("--") if "--" in argv else len(argv)]):
        _print_help_and_exit(argv)
    argv = _resolve_config_argv(argv)
    missing = _config_load_error(_config_path(argv))
    if missing:
        _fail(missing)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(_explain_override_error(argv, e))
    except OSError as e:  # the config file failed to load (ml_collections wraps the cause)
        _fail(f"cannot load the config file: {e.__cause__ or e}")


class _DropDiskFullTracebacks(py_logging.Filter):
    """orbax logs a failed background save with its traceback; a full disk is reported by
    `main` in one line instead."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        from experiments.checkpoint import disk_full_cause

        return not (record.exc_info and disk_full_cause(record.exc_info[1]) is not None)


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize` for multi-process runs (before any device is touched)."""
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    elif _NUM_PROCESSES.value > 1:
        if not _COORDINATOR.value:
            raise app.UsageError("--num_processes > 1 needs --coordinator_address=HOST:PORT")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir=DIR is required")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_DropDiskFullTracebacks())
    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises here
    except OSError as e:
        _fail(f"cannot load the config file: {e.__cause__ or e}")
    maybe_initialize_distributed()

    from experiments.checkpoint import RunError, disk_full_cause
    from experiments.config import ConfigError
    from experiments.trainer import Trainer, format_metrics

    try:  # building the task and model validates the config (named ValueErrors)
        trainer = Trainer(config, _WORKDIR.value, restart=_RESTART.value)
    except (TypeError, ValueError) as e:
        _fail(str(e) or type(e).__name__)
    try:
        summary = trainer.run()
    except (RunError, ConfigError) as e:
        _fail(str(e))
    except Exception as e:
        cause = disk_full_cause(e)
        if cause is None:
            raise
        _fail(
            f"no space left on device ({str(cause).splitlines()[0]}); nothing half-written "
            "was kept: free space and rerun the same command to resume from the last "
            "complete checkpoint",
            code=1,
        )
    import jax

    if jax.process_index() == 0:
        final = format_metrics(summary["final"])
        print(f"[jattn] done: step {summary['step']} in {summary['wall_time_s']:.1f}s: {final}")
        print(f"[jattn] summary: {os.path.join(_WORKDIR.value, 'summary.json')}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
