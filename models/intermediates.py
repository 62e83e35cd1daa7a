"""Analysis intermediates: a module records a tensor where it computes it, one helper collects.

A module (a core, the attention block, a layer, the model) calls :func:`record` with a name and
the tensor, or a zero-argument function that computes it. It is ``nnx.Module.sow`` of an
``nnx.Intermediate``, done only inside ``nnx.capture``: a plain forward records nothing and
computes nothing extra (dense ``[B, H, T, T]`` attention weights cost memory), and flax's
deprecated sow-outside-capture path (which stores the value on the module) is never taken.

:func:`capture_intermediates` runs a model under ``nnx.capture`` and regroups what was recorded
by layer::

    logits, inter = capture_intermediates(model, tokens)   # model: Decoder / ViT / any module
    inter["layers"][i]["attention_weights"]                # [B, Hq, T, T], softmax-family layers
    inter["embedding_norms"]                               # [B, T] (Decoder)

It works inside ``jax.jit`` on a model rebuilt with ``nnx.merge`` (the trainer's pattern): the
records live on the modules only for the duration of the call and come back as arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

__all__ = ["capture_intermediates", "capturing", "record"]


def capturing(module: nnx.Module) -> bool:
    """True while ``module`` runs inside ``nnx.capture`` (flax gives every submodule a
    ``__captures__`` slot for the duration of the call)."""
    return hasattr(module, "__captures__")


def _keep_last(_previous: Any, value: Any) -> Any:
    # a module records each name once per forward; a second call of the same module in one
    # capture replaces the first value (as assigning into a dict did)
    return value


def record(module: nnx.Module, name: str, value: jax.Array | Callable[[], Any]) -> None:
    """Record ``value`` under ``name`` for :func:`capture_intermediates`, if capturing.

    ``value``: an array (pytree), or a zero-argument callable evaluated only when capturing
    (use it for tensors the forward does not otherwise compute, e.g. dense attention weights).
    """
    if not capturing(module):
        return
    if callable(value):
        value = value()
    module.sow(nnx.Intermediate, name, value, reduce_fn=_keep_last, init_fn=lambda: None)


def _flatten(tree: Mapping, path: tuple, into: dict, where: dict) -> dict:
    """Every leaf record under ``tree`` into ``into`` by its name; two modules recording the
    same name in one group is an error (the grouping would drop one)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _flatten(value, path + (key,), into, where)
            continue
        if key in into:
            raise ValueError(f"intermediate {key!r} recorded twice in one group: at "
                             f"{'/'.join(map(str, where[key]))} and "
                             f"{'/'.join(map(str, path + (key,)))}")
        into[key], where[key] = value, path + (key,)
    return into


def group_by_layer(records: Mapping, num_layers: int | None) -> dict:
    """Nested records (module path -> name -> array) to ``{name: array, "layers": [dict]}``.

    Records under ``layers/i/...`` (any depth: attention block, core, a hybrid's inner core)
    merge into ``layers[i]``; everything else merges into the top level. ``num_layers=None``:
    the module has no layer list (e.g. a single :class:`models.AttentionBlock`).
    """
    records = dict(records)
    out: dict = {}
    if num_layers is not None:
        per_layer = records.pop("layers", {})
        out["layers"] = [_flatten(per_layer.get(i, per_layer.get(str(i), {})), ("layers", i),
                                  {}, {})
                         for i in range(num_layers)]
    where: dict = {}
    _flatten(records, (), out, where)
    return out


def capture_intermediates(model: nnx.Module, *args: Any, method: str = "__call__",
                          **kwargs: Any) -> tuple[Any, dict]:
    """``(model.<method>(*args, **kwargs), intermediates)``, the second grouped by layer.

    For a :class:`models.Decoder`: ``intermediates["embedding_norms"] [B, T]`` and
    ``intermediates["layers"][i]`` with ``attention_weights [B, Hq, T, T]`` (softmax-family
    cores), ``values [B, T, Hkv, Dh]``, ``value_norms [B, T, Hkv]``, ``residual_norms [B, T]``
    and whatever the core records (``gate``, ``head_weights``, ``balance_loss``, ...). A
    :class:`models.ViT` gives the same ``layers`` list. Jittable.
    """
    fn = getattr(model, method)
    out, state = nnx.capture(fn, nnx.Intermediate)(*args, **kwargs)
    layers = getattr(model, "layers", None)
    num_layers = None if layers is None else len(layers)
    return out, group_by_layer(nnx.to_pure_dict(state), num_layers)
