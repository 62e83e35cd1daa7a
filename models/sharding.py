"""Logical axis names for parameters and activations, and their mapping to a device mesh.

The one place where logical axes become mesh placements, for the models and the runner alike
(the runner's mesh and batch helpers in ``experiments.sharding`` resolve through here).

Every parameter of :mod:`models` is created through :func:`param` with a tuple of *logical*
axis names, one per dimension:

* ``"embed"``: the model width ``D``;
* ``"heads"``: query (and key/value) heads;
* ``"kv"``: the per-head feature dimension;
* ``"mlp"``: the MLP hidden width;
* ``"vocab"``: the vocabulary;
* ``None``: never sharded (norm scales, small gates, routers).

Activations use ``"batch"`` and ``"length"`` (the sequence ``T``). A list of *rules* maps
logical names to the axes of a mesh with axes :data:`MESH_AXES` = ``("data", "fsdp",
"context", "tensor")`` built with ``axis_types=(AxisType.Auto,) * 4``; :data:`DEFAULT_RULES`
is the one default table:

=========  ====================  =============================================================
logical    mesh axes             why
=========  ====================  =============================================================
batch      ("data", "fsdp")      data parallelism; FSDP is data parallel over the batch too
length     "context"             context parallelism: the sequence split across devices
embed      "fsdp"                FSDP: every weight sharded along the model width
heads      "tensor"              tensor (Megatron) parallelism: attention heads ...
mlp        "tensor"              ... MLP hidden units ...
vocab      "tensor"              ... and the vocabulary
kv         None                  the head dimension stays whole
=========  ====================  =============================================================

Logical names without a rule, rules naming an axis the mesh lacks, and dimensions the mesh
axis does not divide stay replicated, so one rule list serves every mesh shape (and tiny test
models). A mesh axis is used once per array: in an activation ``("batch", "length", "embed")``
the batch takes ``fsdp``, so the width stays whole between blocks.

Models initialize already sharded: under ``jax.set_mesh(mesh)`` and :func:`axis_rules`,
:func:`param` places a ``with_sharding_constraint`` on each freshly drawn value, so a jitted
constructor (``nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()`` or
:func:`create_sharded`) materializes each shard on its device and never the full array on one.
Outside a mesh the same code builds ordinary unsharded parameters. Each Param keeps its logical
names as ``logical_axes`` metadata and, when created under a mesh, the resolved mesh axes as
flax's ``out_sharding`` metadata (so ``nnx.get_partition_spec``, ``nnx.eval_shape`` and
``nnx.get_abstract_model`` see the same placement). :func:`logical_axes_of` reads the logical
names of any variable (also of task models written with ``nnx.with_partitioning``), and
:func:`partition_specs` turns a whole state into PartitionSpecs.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "LOGICAL_AXES",
    "DEFAULT_RULES",
    "axis_rules",
    "current_rules",
    "resolve_rules",
    "logical_to_spec",
    "param",
    "constrain",
    "logical_axes_of",
    "partition_specs",
    "create_sharded",
]

# Mesh axis order: `tensor` varies fastest (neighbouring devices, the most traffic), then
# `context` (a ring of K/V hops per layer), then `fsdp` (one gather per weight per layer).
MESH_AXES = ("data", "fsdp", "context", "tensor")

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# The one default table (see the module docstring); the first rule naming a logical axis wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


class _RulesContext(threading.local):
    rules: tuple = DEFAULT_RULES


_CTX = _RulesContext()


def _check_rules(rules: Rules) -> tuple:
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"rules[{i}] must be a (logical_name, mesh_axis) pair, got {rule!r}")
        name, axis = rule
        if axis is not None and not isinstance(axis, str):
            axis = tuple(axis)
            if not all(isinstance(a, str) for a in axis):
                raise ValueError(f"rules[{i}]: mesh axes must be strings, got {rule!r}")
        out.append((name, axis))
    return tuple(out)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[tuple]:
    """Context: logical-to-mesh rules used by :func:`param` and :func:`constrain`."""
    old = _CTX.rules
    _CTX.rules = _check_rules(rules)
    try:
        yield _CTX.rules
    finally:
        _CTX.rules = old


def current_rules() -> tuple:
    """The rules in effect (:data:`DEFAULT_RULES` unless inside :func:`axis_rules`)."""
    return _CTX.rules


def _mesh_axis_sizes(mesh) -> dict[str, int] | None:
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return None
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def resolve_rules(rules: Rules | None = None, mesh=None) -> tuple:
    """Complete ``rules`` for ``mesh``: every logical name maps to existing mesh axes or None.

    The result is safe for ``nnx.logical_axis_rules`` (flax maps an unknown logical name to
    itself, which a mesh without that axis rejects).
    """
    rules = current_rules() if rules is None else _check_rules(rules)
    sizes = _mesh_axis_sizes(mesh) or {}
    table = {}
    for name, axis in rules:
        axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        axes = tuple(a for a in axes if a in sizes)
        table.setdefault(name, axes[0] if len(axes) == 1 else (axes or None))
    for name in LOGICAL_AXES:
        table.setdefault(name, None)
    return tuple(table.items())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    rules: Rules | None = None, mesh=None) -> PartitionSpec:
    """PartitionSpec for logical ``axes`` under ``rules`` on ``mesh`` (default: current ones).

    A mesh axis is used at most once per array (first dimension wins) and only where it divides
    the dimension (when ``shape`` is given); otherwise that dimension stays replicated. Mesh axes
    of size 1 are left out, so the spec names only the axes that actually split the array.

    Example (mesh ``fsdp=4, tensor=2``, :data:`DEFAULT_RULES`): ``("embed", "heads", "kv")``
    -> ``P("fsdp", "tensor", None)``; the token batch ``("batch", "length")`` -> ``P("fsdp",
    None)`` (and ``P(("data", "fsdp"), "context")`` on a mesh where all three are > 1).
    """
    sizes = _mesh_axis_sizes(mesh)
    if sizes is None:
        return PartitionSpec(*([None] * len(axes)))
    table = dict(resolve_rules(rules, mesh))
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else target
        mesh_axes = tuple(a for a in mesh_axes if a not in used and sizes[a] > 1)
        if shape is not None and mesh_axes:
            n = math.prod(sizes[a] for a in mesh_axes)
            while mesh_axes and shape[i] % n:
                mesh_axes = mesh_axes[:-1]
                n = math.prod(sizes[a] for a in mesh_axes) if mesh_axes else 1
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                    else mesh_axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """A parameter drawn from ``init(key, shape, dtype)``, annotated with logical ``axes``.

    Inside a mesh (``jax.set_mesh``) the value is constrained to its sharding at creation.
    """
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} must name every dimension of shape {shape}")
    value = init(rngs.params(), shape, dtype)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return nnx.Param(value, logical_axes=axes)
    spec = logical_to_spec(axes, shape)
    if any(s is not None for s in spec):
        value = jax.lax.with_sharding_constraint(value, spec)
    return nnx.Param(value, logical_axes=axes, out_sharding=tuple(spec), eager_sharding=False)


# flax's own metadata keys for logical names (``nnx.with_partitioning``; older flax versions)
_FLAX_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def logical_axes_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names of a variable, one per dimension, or None if it has none.

    :func:`param` stores them as ``logical_axes`` metadata. Variables made elsewhere (task
    models built from flax layers with ``nnx.with_partitioning(init, ("embed", "mlp"))``)
    carry them in flax's ``out_sharding`` metadata, read when ``logical_axes`` is absent (for a
    :func:`param` created under a mesh, ``out_sharding`` holds the resolved *mesh* axes, not
    logical names, so it must never take precedence).
    """
    meta = var.get_metadata()
    names = meta.get("logical_axes")
    if not names:
        names = next((meta[k] for k in _FLAX_NAME_KEYS if meta.get(k)), None)
    if not names:
        return None
    return tuple(names)


def _is_prng_key(value) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def partition_specs(state, rules: Rules | None = None, mesh=None):
    """PartitionSpec tree for an ``nnx.State`` (or module): each variable by its logical axes.

    Variables without logical axes (RNG counters, statistics) and PRNG keys are replicated
    (``P()``). Works on concrete and abstract (``nnx.eval_shape``) states; ``rules`` and
    ``mesh`` default to the current ones. ``nnx.to_pure_dict`` of the result gives the plain
    nested dict of specs that matches ``nnx.to_pure_dict(state)``.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def spec(x):
        if not isinstance(x, nnx.Variable):
            return PartitionSpec()
        value = x.get_value()
        axes = logical_axes_of(x)
        if not axes or _is_prng_key(value):
            return x.replace(PartitionSpec())
        shape = tuple(getattr(value, "shape", ()))
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} must name every dimension of the variable's "
                             f"shape {shape}")
        return x.replace(logical_to_spec(axes, shape, rules, mesh))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model: Callable[[], nnx.Module], mesh,
                   rules: Rules | None = None) -> nnx.Module:
    """Build ``make_model()`` with every parameter created directly in its sharding on ``mesh``.

    ``make_model`` is traced once abstractly (``nnx.eval_shape``) to read the logical axes, then
    run under ``jax.jit`` with those output shardings (the gemma-style recipe).
    """
    rules = current_rules() if rules is None else rules
    with jax.set_mesh(mesh), axis_rules(rules):
        abstract = nnx.eval_shape(make_model)
        graphdef, abs_state = nnx.split(abstract)
        specs = partition_specs(abs_state, rules, mesh)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

        def init():
            return nnx.state(make_model())

        state = jax.jit(init, out_shardings=shardings)()
        return nnx.merge(graphdef, state)
