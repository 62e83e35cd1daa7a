"""The version of jattn and of its kernels distribution: the one place it is written.

It lives here, not in ``jattn/``, because the kernels distribution must build from its own
directory alone (``pip install ./pallas_kernels``: a source tree or sdist of this folder sees
nothing above it), while jattn's build reads this file from the repository root. Both
``pyproject.toml`` files read it with setuptools' ``attr:``, without importing JAX.
"""

__version__ = "0.1.0"
