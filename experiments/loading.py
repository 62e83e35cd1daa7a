"""Load a trained run: ``model, config, step = experiments.load("runs/bigram_backcopy_cpu")``.

Reads ``DIR/config.json`` (written by the runner), rebuilds the task's model with the runner's
own code (:class:`experiments.trainer.Trainer`, so the state layout is the one it saved), and
restores the parameters of a checkpoint in ``DIR/checkpoints`` with orbax, read-only: the run
directory is never changed, and a checkpoint that does not verify (the fingerprint the runner
stored with it) is an error, not silently skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `import experiments` stays light: JAX, flax and orbax load on first use
    import ml_collections
    from flax import nnx

# One device: a loaded model is for analysis, plots and generation in a notebook.
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def load(
    workdir: str | Path, *, step: int | None = None, mesh: Mapping[str, int] | None = None
) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """Restores a run of ``python -m experiments.run`` into a freshly built model.

    Args:
      workdir: the run's ``--workdir`` (holds ``config.json`` and ``checkpoints/``).
      step: the checkpoint to load; ``None``: the newest one.
      mesh: the device mesh to place the parameters on, as ``config.mesh``
        (``{"data": ..., "fsdp": ..., "tensor": ...}``); ``None``: one device, whatever mesh
        the run trained on.

    Returns:
      ``(model, config, step)``: the ``nnx.Module`` holding the checkpoint's parameters (and
      other state), the run's config (``config.mesh`` set to the mesh loaded on), and the
      training step of the checkpoint.

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
      ValueError: ``step`` is not a saved checkpoint, or the checkpoint does not verify.
    """
    import jax
    import ml_collections
    import orbax.checkpoint as ocp

    from experiments.checkpoint import fingerprint
    from experiments.trainer import Trainer

    workdir = Path(workdir).expanduser().resolve()
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"workdir={str(workdir)!r}: no config.json; expected the --workdir of a run of "
            "`python -m experiments.run`")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    config.mesh = ml_collections.ConfigDict(dict(mesh) if mesh is not None else ONE_DEVICE)
    trainer = Trainer(config, str(workdir))

    directory = workdir / "checkpoints"
    manager = ocp.CheckpointManager(
        directory,
        item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False, read_only=True),
    )
    try:
        steps = sorted(manager.all_steps()) if directory.is_dir() else []
        if not steps:
            raise FileNotFoundError(f"workdir={str(workdir)!r}: no checkpoint in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"step={step}: not a checkpoint of {workdir}; saved steps: {steps}")
        with jax.set_mesh(trainer.mesh):
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(trainer.abstract_state),
                meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    state, meta = out["state"], out["meta"]
    if "fingerprint" in meta and fingerprint(state) != list(meta["fingerprint"]):
        raise ValueError(f"checkpoint step {step} in {directory} does not match the fingerprint "
                         "saved with it (corrupted); load another step=")
    return trainer.model(state), config, int(step)
