"""jattn's dependencies and packages, which depend on the kind of build (tools/jattn_build.py).

Everything else is in pyproject.toml.

* Editable (`pip install -e .`, the development checkout): the repository's top-level packages
  as they are, ``pallas_kernels`` included, and ``jattn_lab`` (an alias of the lab packages).
* Wheel (`pip wheel .`, `pip install .`, `pip install git+...`): ``jattn`` and the lab packages
  under ``jattn_lab`` only (``models/`` -> ``jattn_lab/models`` ...), their imports of each other
  rewritten to that name (see jattn_lab/__init__.py for why); the kernels are their own
  distribution, ``jattn-pallas-kernels`` (pallas_kernels/pyproject.toml), at the same version.
"""

import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# The one version source, shared with the kernels distribution (pallas_kernels/_version.py).
_version: dict = {}
with open(os.path.join(HERE, "pallas_kernels", "_version.py")) as f:
    exec(f.read(), _version)
VERSION = _version["__version__"]

# Tested with jax 0.10.2 (CPU, this project's CI) and jax 0.11.x (CUDA). The Pallas API moves
# fast: widen this range (here and in pallas_kernels/pyproject.toml) only after the kernel tests
# pass on the new version.
DEPENDENCIES = [
    "jax>=0.10.2,<0.12",
    "jaxlib>=0.10.2,<0.12",
    "numpy>=1.26",
    "flax>=0.12.0,<0.14",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.12",
    "tensorboard>=2.18",
    "ml_collections>=1.0",
    "absl-py>=2.1",
    "matplotlib>=3.8",
    "scikit-learn>=1.4",
    "tqdm>=4.66",
]
LAB = ("models", "experiments", "configs", "studies")
NAMESPACE = "jattn_lab"

_NAMES = "|".join(LAB)
# `from models.x import y` / `import experiments.x as y` at any indentation (docstring examples
# included, which then show the installed name), and module names in strings:
# "experiments.tasks.{name}" for importlib, "-m experiments.run" for subprocesses.
_FROM = re.compile(rf"^(\s*from\s+)({_NAMES})(?=[\s.])", re.M)
_IMPORT_AS = re.compile(rf"^(\s*import\s+)({_NAMES})((?:\.\w+)*\s+as\s+\w+\s*)$", re.M)
_IMPORT_BARE = re.compile(rf"^\s*import\s+(?:[\w.]+\s*,\s*)*({_NAMES})\b", re.M)
_STRING = re.compile(rf"""(["']|-m\s+)({_NAMES})\.""")


def namespaced_source(text: str, path: str = "<source>") -> str:
    """Source of a lab module with its imports of the lab packages moved under `jattn_lab`."""
    text = _FROM.sub(rf"\1{NAMESPACE}.\2", text)
    text = _IMPORT_AS.sub(rf"\1{NAMESPACE}.\2\3", text)
    bare = _IMPORT_BARE.search(text)
    if bare:  # `import models[.x]` binds the top-level name: no faithful one-line rewrite
        raise ValueError(f"{path}: write `from {bare.group(1)} import ...` or "
                         f"`import {bare.group(1)}.x as y` instead of {bare.group(0).strip()!r}")
    return _STRING.sub(rf"\1{NAMESPACE}.\2.", text)


class build_py_namespaced(build_py):
    """Copies the lab packages into the wheel with their imports rewritten (namespaced_source)."""

    def build_module(self, module, module_file, package):
        outfile, copied = super().build_module(module, module_file, package)
        package = package if isinstance(package, str) else ".".join(package)
        if package.split(".")[0] == NAMESPACE and outfile.endswith(".py"):
            with open(outfile) as f:
                text = f.read()
            with open(outfile, "w") as f:
                f.write(namespaced_source(text, module_file))
        return outfile, copied


lab_packages = find_packages(include=[f"{name}*" for name in LAB])
if os.environ.get("JATTN_EDITABLE_BUILD") == "1":
    # The development checkout: serve everything from it as laid out (kernel edits are live,
    # and the install needs nothing that PyPI lacks); jattn_lab aliases the top-level names.
    options = dict(packages=find_packages(include=["jattn*", "pallas_kernels*"]) + lab_packages,
                   install_requires=DEPENDENCIES)
else:
    options = dict(
        packages=find_packages(include=["jattn*"]) + [f"{NAMESPACE}.{p}" for p in lab_packages],
        package_dir={f"{NAMESPACE}.{name}": name for name in LAB},
        install_requires=[*DEPENDENCIES, f"jattn-pallas-kernels=={VERSION}"],
        cmdclass={"build_py": build_py_namespaced},
    )
    # bdist_wheel packs all of build/lib: copies left there by an older build (the kernels, the
    # top-level lab packages) would be smuggled into the wheel.
    for stale in ("pallas_kernels", *LAB):
        shutil.rmtree(os.path.join(HERE, "build", "lib", stale), ignore_errors=True)

setup(**options)
