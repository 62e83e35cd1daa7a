"""Packaging: the kernels-only distribution, jattn's wheel and its editable install.

Builds the wheels as a user would (``pip wheel --no-deps``, with build isolation: setuptools comes
from the package index; the tests skip when no index answers) from a copy of the repository, so
that the checkout gets no ``build/`` or ``*.egg-info``. The kernels wheel is then installed, with
``--no-index``, into a fresh virtual environment that holds JAX (and what JAX needs) but no flax,
and runs ``flash_attention`` there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a build of jattn reads (tests, benchmarks and notebooks are not packaged).
SOURCES = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "tools", "jattn",
           "pallas_kernels", "models", "experiments", "configs"]
OFFLINE = ("Could not find a version that satisfies", "No matching distribution",
           "Failed to establish a new connection", "Temporary failure in name resolution")


def _version() -> str:
    text = (REPO / "pallas_kernels" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _clean_env() -> dict:
    # Nothing from the test process may leak into the builds and the venv.
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "JATTN_EDITABLE_BUILD", "XLA_FLAGS")}


def _copy_sources(dst: Path) -> Path:
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "runs")
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


def _pip_wheel(project: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(project), "-w", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=300)
    if proc.returncode and any(s in proc.stdout + proc.stderr for s in OFFLINE):
        pytest.skip(f"no package index answers (build isolation needs setuptools):\n{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    src = _copy_sources(tmp / "src")
    return {"kernels": _pip_wheel(src / "pallas_kernels", tmp / "kernels"),
            "jattn": _pip_wheel(src, tmp / "jattn")}


def _metadata(wheel: Path) -> tuple[str, list[str], list[str]]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        text = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    version = re.search(r"^Version: (.+)$", text, re.M).group(1)
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    return version, requires, names


def test_kernels_wheel_depends_on_jax_only(wheels):
    version, requires, names = _metadata(wheels["kernels"])
    assert version == _version()
    assert sorted(re.match(r"[\w.-]+", r).group() for r in requires) == ["jax", "jaxlib"]
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"pallas_kernels"}
    assert "pallas_kernels/flash.py" in names and "pallas_kernels/pyproject.toml" not in names


def test_jattn_wheel_requires_the_kernels_at_its_version(wheels):
    version, requires, names = _metadata(wheels["jattn"])
    assert version == _version()
    assert f"jattn-pallas-kernels=={version}" in requires
    # One owner for pallas_kernels/: installing both wheels must not overwrite files.
    assert not any(n.startswith("pallas_kernels/") for n in names)
    assert "jattn/__init__.py" in names


def test_setup_py_bundles_the_kernels_only_in_an_editable_build(tmp_path):
    src = _copy_sources(tmp_path / "src")
    editable_packages, editable_requires = _setup_args(src, editable=True)
    wheel_packages, wheel_requires = _setup_args(src, editable=False)
    assert "pallas_kernels" in editable_packages and "pallas_kernels" not in wheel_packages
    assert not any("pallas-kernels" in r for r in editable_requires)
    assert f"jattn-pallas-kernels=={_version()}" in wheel_requires
    assert set(editable_packages) - set(wheel_packages) == {"pallas_kernels"}


def _setup_args(src: Path, *, editable: bool) -> tuple[list[str], list[str]]:
    env = {**_clean_env(), "JATTN_EDITABLE_BUILD": "1" if editable else ""}
    script = ("import setuptools\n"
              "setuptools.setup = lambda **kw: print(' '.join(kw['packages']), '|',\n"
              "                                      ' '.join(kw['install_requires']))\n"
              "import runpy; runpy.run_path('setup.py')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=src, capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    packages, requires = proc.stdout.split("|")
    return packages.split(), requires.split()


def test_build_backend_marks_only_the_editable_hooks(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    monkeypatch.delenv("JATTN_EDITABLE_BUILD", raising=False)
    import jattn_build

    seen = jattn_build._editable(lambda: os.environ.get("JATTN_EDITABLE_BUILD"))()
    assert seen == "1" and "JATTN_EDITABLE_BUILD" not in os.environ
    for hook in ("get_requires_for_build_editable", "prepare_metadata_for_build_editable",
                 "build_editable"):
        assert getattr(jattn_build, hook).__wrapped__ is getattr(jattn_build._setuptools, hook)
    assert jattn_build.build_wheel is jattn_build._setuptools.build_wheel


def test_editable_install_imports_pallas_kernels_from_the_checkout(tmp_path):
    """The README's `pip install -e .`, in a venv that borrows this machine's packages: it needs
    nothing PyPI lacks, and `import pallas_kernels` (from anywhere) reads the checkout."""
    src = _copy_sources(tmp_path / "src")
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False, symlinks=True)
    python = tmp_path / "venv" / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                           "-e", str(src)], capture_output=True, text=True, env=_clean_env(),
                          timeout=300)
    if proc.returncode and any(s in proc.stdout + proc.stderr for s in OFFLINE):
        pytest.skip(f"no package index answers (build isolation needs setuptools):\n{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = subprocess.run(
        [str(python), "-c", "import jattn, pallas_kernels; print(jattn.__file__); "
         "print(pallas_kernels.__file__); print(jattn.__version__)"],
        cwd=tmp_path, capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert where.returncode == 0, where.stderr
    jattn_file, kernels_file, version = where.stdout.split()
    assert Path(jattn_file).is_relative_to(src) and Path(kernels_file).is_relative_to(src)
    assert version == _version()


def _jax_closure() -> list[metadata.Distribution]:
    """The installed distributions that `jax` needs (its requirements, recursively; no extras)."""
    from packaging.requirements import Requirement

    todo, seen = ["jax"], {}
    while todo:
        dist = metadata.distribution(todo.pop())
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _jax_only_venv(root: Path) -> Path:
    """A fresh venv that sees this machine's JAX and its dependencies, and nothing else.

    Links their top-level entries (packages, .libs, dist-info) into one folder that a .pth file
    adds to the venv: no download of the 600 MB of jaxlib, and pip sees them as installed."""
    venv.create(root / "venv", with_pip=False, symlinks=True)
    python = root / "venv" / "bin" / "python"
    links = root / "jax_only"
    links.mkdir()
    for dist in _jax_closure():
        for entry in {Path(str(f)).parts[0] for f in dist.files or []}:
            target = Path(dist.locate_file(entry))
            if entry != ".." and target.exists() and not (links / entry).exists():
                (links / entry).symlink_to(target)
    site = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True, env=_clean_env()).strip()
    Path(site, "jax_only.pth").write_text(str(links) + "\n")
    return python


RUN_FLASH = """
import importlib.util, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
import pallas_kernels
assert importlib.util.find_spec("flax") is None, "flax is visible"
assert importlib.util.find_spec("jattn") is None, "jattn is visible"
assert pathlib.Path(pallas_kernels.__file__).is_relative_to(sys.prefix), pallas_kernels.__file__
q, k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 32)) for i in range(3))
o = pallas_kernels.flash_attention(q, k, v, block_q=64, block_kv=64, interpret=True)
s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
np.testing.assert_allclose(o, ref, atol=2e-5, rtol=2e-5)
print("ok", pallas_kernels.__version__)
"""


def test_kernels_wheel_runs_flash_attention_in_a_venv_without_flax(wheels, tmp_path):
    python = _jax_only_venv(tmp_path)
    # --no-index: its requirements must be met by JAX alone. This pip installs into the venv.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         str(wheels["kernels"])], capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    proc = subprocess.run([str(python), "-c", RUN_FLASH], cwd=tmp_path, capture_output=True,
                          text=True, env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["ok", _version()]
