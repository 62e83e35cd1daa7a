"""jattn's PEP 517 build backend: setuptools, told whether the build is editable.

A wheel of jattn (``pip wheel .``, ``pip install .``, ``pip install git+...``) leaves the
``pallas_kernels`` package to its own distribution, ``jattn-pallas-kernels``
(``pallas_kernels/pyproject.toml``), and requires it at the same version. An editable install
(``pip install -e .``, the development checkout) instead serves ``pallas_kernels`` from the
checkout like the other packages: kernel edits are live, and the command needs nothing but PyPI
(the kernels distribution is not published there). setuptools asks the same ``setup.py`` for
both, so the editable hooks set ``JATTN_EDITABLE_BUILD=1`` for ``setup.py`` to read.
"""

from __future__ import annotations

import functools
import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the hooks this module does not wrap)

EDITABLE_ENV = "JATTN_EDITABLE_BUILD"


def _editable(hook):
    @functools.wraps(hook)
    def wrapped(*args, **kwargs):
        previous = os.environ.get(EDITABLE_ENV)
        os.environ[EDITABLE_ENV] = "1"
        try:
            return hook(*args, **kwargs)
        finally:
            if previous is None:
                os.environ.pop(EDITABLE_ENV, None)
            else:
                os.environ[EDITABLE_ENV] = previous

    return wrapped


get_requires_for_build_editable = _editable(_setuptools.get_requires_for_build_editable)
prepare_metadata_for_build_editable = _editable(_setuptools.prepare_metadata_for_build_editable)
build_editable = _editable(_setuptools.build_editable)
