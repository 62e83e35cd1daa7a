"""The one translation from a config's ``config.model`` subtree to a model's static config.

Every config file builds ``config.model`` with `configs.common.model_config`: fields of
`models.DecoderConfig` (ViT: ``size``, ``patch_size`` and `models.ViTConfig` fields) under the
names shared by all configs (``mechanism``, ``positions``, ``implementation``, ``init``). Tasks
call :func:`decoder_config` / :func:`vit_config` with the sizes their data decides (vocabulary,
``max_len``, classes, image size) instead of copying fields one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from experiments.config import ConfigError

# Keys of config.model that are not fields of the architecture: read by the task itself.
TASK_KEYS = ("init",)  # parameter init scheme ("models" | "pytorch"), tasks.base.apply_init
# config name -> ViTConfig field, where ViTConfig spells it differently
VIT_FIELDS = {"positions": "posemb"}


def _plain(value: Any) -> Any:
    """ConfigDict values as the hashable values the frozen model configs expect."""
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_fields(model: Mapping[str, Any], cls: type, renames: Mapping[str, str] | None = None,
                 **derived: Any) -> dict[str, Any]:
    """``config.model`` as keyword arguments of the dataclass `cls`.

    Drops :data:`TASK_KEYS`, maps ``implementation=""`` / ``linear_implementation=""`` to
    None (best for the platform), renames per `renames`, then lets `derived` (sizes the data
    decides) override. A key that is no field of `cls` raises a ConfigError naming it.
    """
    renames = renames or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    known = (fields - set(renames.values())) | set(renames)  # as a config spells them
    out: dict[str, Any] = {}
    for key, value in model.items():
        if key in TASK_KEYS:
            continue
        name = renames.get(key, key)
        if name not in fields:
            raise ConfigError(
                f"config.model.{key}={value!r}: not a field of {cls.__name__} (fields: "
                f"{', '.join(sorted(known))})"
            )
        if key in ("implementation", "linear_implementation") and not value:
            value = None
        out[name] = _plain(value)
    out.update(derived)
    return out


def decoder_config(model: Mapping[str, Any], **derived: Any):
    """`models.DecoderConfig` of ``config.model`` plus `derived` (e.g. ``vocab_size``,
    ``max_len``); a bad value raises the DecoderConfig's ValueError naming the field."""
    from models import DecoderConfig

    return DecoderConfig(**model_fields(model, DecoderConfig, **derived))


def vit_config(model: Mapping[str, Any], **derived: Any):
    """`models.ViTConfig` of ``config.model`` (``size`` and ``patch_size`` pick the variant,
    as in `models.vit_config("S/16")`) plus `derived` (``image_size``, ``channels``,
    ``num_classes``)."""
    from models import ViTConfig
    from models import vit_config as from_variant

    fields = dict(model)
    missing = [k for k in ("size", "patch_size") if k not in fields]
    if missing:
        raise ConfigError(f"config.model needs {', '.join(missing)} for a ViT")
    variant = f"{fields.pop('size')}/{fields.pop('patch_size')}"
    names = {f.name for f in dataclasses.fields(ViTConfig)}
    renames = {k: v for k, v in VIT_FIELDS.items() if v in names and k not in names}
    return from_variant(variant, **model_fields(fields, ViTConfig, renames, **derived))
