"""jattn's dependencies and packages, which depend on the kind of build (tools/jattn_build.py).

Everything else is in pyproject.toml.
"""

import os
import shutil

from setuptools import find_packages, setup

# The one version source, shared with the kernels distribution (pallas_kernels/_version.py).
_version: dict = {}
with open(os.path.join(os.path.dirname(__file__) or ".", "pallas_kernels", "_version.py")) as f:
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
PACKAGES = ["jattn*", "models*", "experiments*", "configs*"]

if os.environ.get("JATTN_EDITABLE_BUILD") == "1":
    # The development checkout (`pip install -e .`): serve the kernels from it like the rest,
    # so kernel edits are live and the install needs nothing that PyPI lacks.
    packages = find_packages(include=PACKAGES + ["pallas_kernels*"])
    requires = DEPENDENCIES
else:
    # A wheel: the kernels are their own distribution (pallas_kernels/pyproject.toml), at the
    # same version, so that installing both never puts two owners on pallas_kernels/.
    packages = find_packages(include=PACKAGES)
    requires = [*DEPENDENCIES, f"jattn-pallas-kernels=={VERSION}"]
    # bdist_wheel packs all of build/lib: a copy left there by an older build would smuggle
    # the kernels back into the wheel.
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.rmtree(os.path.join(here, "build", "lib", "pallas_kernels"), ignore_errors=True)

setup(packages=packages, install_requires=requires)
