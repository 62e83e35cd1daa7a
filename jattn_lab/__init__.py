"""jattn's lab packages under one unambiguous name: ``jattn_lab.models``, ``jattn_lab.experiments``,
``jattn_lab.configs``.

The repository keeps them at its top level (``models/``, ``experiments/``, ``configs/``), where
``python -m experiments.run --config configs/NAME.py`` runs them from the checkout. Installed
under those generic names, they would collide with a user's own folders (a ``models/`` in the
working directory, as in Colab's ``/content``): whichever comes first on ``sys.path`` wins, and
jattn's code (or the user's) imports the wrong package. So:

* A wheel (``pip install ./pallas_kernels .``, ``pip install git+...``) installs them only as
  ``jattn_lab.models`` etc., with their imports of each other rewritten at build time to that
  name (``setup.py``): nothing called ``models``, ``experiments`` or ``configs`` enters
  site-packages, and no folder of the user's can stand in for them.
  Run experiments with ``python -m jattn_lab.experiments.run``.
* In the checkout (the repository root on ``sys.path``, or ``pip install -e .``) the top-level
  packages are the code, and ``jattn_lab.X`` is an alias of ``X`` (the same module objects), so
  code written against ``jattn_lab`` runs unchanged in both.

Write ``from jattn_lab import models`` (or ``jattn_lab.experiments.load``) in code meant to run
against an installed jattn; the top-level names are for working in the repository.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

LAB_PACKAGES = ("models", "experiments", "configs", "studies")
_HERE = Path(__file__).resolve().parent
# In a wheel the packages are real subpackages of this one; in the checkout they are siblings.
INSTALLED = all((_HERE / name / "__init__.py").is_file() for name in LAB_PACKAGES)


def __getattr__(name: str) -> ModuleType:
    # `import jattn_lab; jattn_lab.models` without importing the subpackage first.
    if name in LAB_PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _AliasLoader(importlib.abc.Loader):
    """Loads ``jattn_lab.X...`` as the already-importable module ``X...`` (the same object)."""

    def __init__(self, target: str, target_spec: importlib.machinery.ModuleSpec):
        self.target, self.target_spec = target, target_spec

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        _check_checkout_module(module, self.target)
        self._target_module_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias spec on the module: give it its own back.
        module.__spec__ = self._target_module_spec

    def get_code(self, fullname):
        # runpy (`python -m jattn_lab.experiments.run`) runs the target's code as __main__.
        return self.target_spec.loader.get_code(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != __name__ or parts[1] not in LAB_PACKAGES:
            return None
        name = ".".join(parts[1:])
        target_spec = importlib.util.find_spec(name)
        if target_spec is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(name, target_spec), origin=target_spec.origin,
            is_package=target_spec.submodule_search_locations is not None)
        if target_spec.submodule_search_locations is not None:
            spec.submodule_search_locations = list(target_spec.submodule_search_locations)
        return spec


def _check_checkout_module(module: ModuleType, name: str) -> None:
    """In the checkout, `X` must be the repository's package, not a same-named folder that came
    first on sys.path (a user's ./models): say so instead of running someone else's code."""
    top = name.split(".")[0]
    expected = _HERE.parent / top
    found = Path(getattr(module, "__file__", None) or next(iter(module.__path__), "")).resolve()
    if not found.is_relative_to(expected):
        raise ImportError(
            f"jattn_lab.{name}: the module {name!r} comes from {found}, not from jattn's "
            f"checkout ({expected}): a folder named {top!r} earlier on sys.path shadows it. "
            f"Run from another directory, or install jattn as a wheel "
            f"(`pip install ./pallas_kernels .`), which has no top-level {top!r}.", name=name)


if not INSTALLED and not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    # First: the aliases' __path__ are the real packages' folders, where the path finder would
    # load `jattn_lab.models.decoder` a second time, as a module distinct from `models.decoder`.
    # It answers only for jattn_lab.{models,experiments,configs}.*.
    sys.meta_path.insert(0, _AliasFinder())
