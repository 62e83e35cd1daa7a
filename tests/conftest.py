"""Test-suite setup: an 8-device simulated CPU mesh (set before JAX initializes)."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Property tests draw the same examples on every run (seeded from each test's source), so CI
# cannot fail at random on a new draw; `pytest --hypothesis-profile=explore` draws fresh ones
# (pin what it finds with @example).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")


@pytest.fixture(scope="module")
def fast_compiles():
    """Skip XLA optimizations for a module: interpret-mode Pallas kernels are XLA while-loops
    whose compile time dominates. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
