"""Paper studies: scripts that run several configs through the runner and compare them.

    python -m studies.bb_ablations --workdir DIR [--preset cpu] [--config.key=value ...]
    python -m studies.bb_compare RUN_DIR ... --out FIGURE.png
    python -m studies.mqar_sweep --workdir DIR --preset cpu [--config.key=value ...]

Layering: ``studies`` -> ``configs`` -> ``experiments`` (runner) -> ``models`` -> ``jattn``.
A study imports configs and the runner; nothing below imports a study. Config overrides use the
runner's syntax, ``--config.key=value`` (:func:`studies.cli.parse_args`).
"""
