"""The runner's device mesh and batch placement.

Mesh axes are `models.sharding.MESH_AXES` = (`data`, `fsdp`, `context`, `tensor`), in this
order so that `tensor` is the fastest-varying axis and lands on neighbouring devices. Where
each array goes is decided in ONE place, `models.sharding`: its logical-axis rules resolve the
parameters, the optimizer state, the activation constraints inside the models and, here, the
batch. A batch array of shape `[B, T, ...]` has logical axes `("batch", "length", None, ...)`:
rows over (`data`, `fsdp`), the sequence over `context` (default rules), each only where the
mesh axis divides the dimension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.config import MESH_AXES, ConfigError
from models.sharding import Rules, logical_to_spec, resolve_rules


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a mesh config to axis sizes in `MESH_AXES` order.

    One axis may be -1: it takes the remaining devices. Without -1 the sizes may
    multiply to fewer than `num_devices` (the mesh then uses the first devices; single
    process only). Raises ConfigError if the sizes do not fit.
    """
    sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    if any(s == -1 for s in sizes.values()):
        if num_devices % known:
            raise ConfigError(
                f"config.mesh={dict(mesh_config)}: the fixed axes ({known} devices) do not "
                f"divide the {num_devices} available devices"
            )
        sizes = {a: (num_devices // known if s == -1 else s) for a, s in sizes.items()}
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ConfigError(
            f"config.mesh={dict(mesh_config)}: axis sizes multiply to {total} but only "
            f"{num_devices} devices are available (use -1 for one axis to take the rest)"
        )
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config: Mapping[str, int]) -> jax.sharding.Mesh:
    """A `jax.make_mesh` with axes `MESH_AXES` (data, fsdp, context, tensor), Auto types."""
    shape = mesh_shape(mesh_config, jax.device_count())
    n = math.prod(shape)
    devices = None
    if n < jax.device_count():
        if jax.process_count() > 1:
            raise ConfigError(
                f"config.mesh={dict(mesh_config)}: a multi-process run must use all "
                f"{jax.device_count()} devices"
            )
        devices = jax.devices()[:n]
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
    """Maps a tree of PartitionSpecs to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_axes(ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a batch array of rank `ndim`: rows, then the sequence, then features.

    Dimension 1 is the sequence for token and feature sequences (`[B, T]`, `[B, T, F]`); for
    arrays whose dimension 1 is something else (`[B, F]` features, `[B, H, W, C]` images) a
    context-parallel mesh splits that dimension instead, which XLA undoes where needed.
    """
    return ("batch", "length", *([None] * (ndim - 2)))[:ndim]


def batch_spec(
    mesh: jax.sharding.Mesh, shape: Sequence[int] | None = None, rules: Rules | None = None
) -> PartitionSpec:
    """PartitionSpec of a batch array of `shape` (rows over data x fsdp, sequence over context).

    Without `shape`: the spec of the leading (row) dimension alone, for any batch size the
    mesh divides. `rules` default to the current ones (`models.sharding.axis_rules`).
    """
    if shape is None:
        return logical_to_spec(("batch",), None, rules, mesh)
    return logical_to_spec(batch_axes(len(shape)), tuple(shape), rules, mesh)


def data_parallel_size(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> int:
    """Number of batch-row shards: the product of the mesh axes the `batch` rule names."""
    target = dict(resolve_rules(rules, mesh)).get("batch")
    axes = () if target is None else (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[a] for a in axes)


def make_global_batch(
    local_batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    global_batch: int,
    rules: Rules | None = None,
) -> dict[str, jax.Array]:
    """Assembles this host's rows of the batch into global `[global_batch, ...]` arrays.

    Each process passes the rows its devices hold (`experiments.data.rows_for_process`);
    each array is placed by `batch_spec` (token batches `[B, T]`: `P(("data", "fsdp"),
    "context")`).
    """
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        shape = (global_batch, *v.shape[1:])
        sharding = NamedSharding(mesh, batch_spec(mesh, shape, rules))
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out
