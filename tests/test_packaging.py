"""Packaging: the kernels-only distribution, jattn's wheel and its editable install.

Builds the wheels as a user would (``pip wheel --no-deps``, with build isolation: setuptools comes
from the package index; the tests skip when no index answers) from a copy of the repository, so
that the checkout gets no ``build/`` or ``*.egg-info``. The kernels wheel is then installed, with
``--no-index``, into a fresh virtual environment that holds JAX (and what JAX needs) but no flax,
and runs ``flash_attention`` there.
"""

from __future__ import annotations

import json
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
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md",
           "tools", "jattn", "jattn_lab", "pallas_kernels", "models", "experiments", "configs",
           "studies"]
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
    # The lab packages only under jattn_lab: no generic top-level names in site-packages.
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"jattn", "jattn_lab"}
    assert {"jattn_lab/models/__init__.py", "jattn_lab/experiments/run.py",
            "jattn_lab/configs/bigram_backcopy.py"} <= set(names)


def test_sdist_builds_the_same_wheel(tmp_path):
    """`python -m build` makes the wheel from the sdist: it must carry the build backend and
    the version source (MANIFEST.in)."""
    src = _copy_sources(tmp_path / "src")
    script = ("import sys; sys.path.insert(0, 'tools'); import jattn_build\n"
              "print(jattn_build.build_sdist(sys.argv[1]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sdist")], cwd=src,
                          capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    sdist = tmp_path / "sdist" / proc.stdout.split()[-1]
    version, requires, names = _metadata(_pip_wheel(sdist, tmp_path / "wheel"))
    assert version == _version() and f"jattn-pallas-kernels=={version}" in requires
    assert "jattn_lab/experiments/run.py" in names
    assert not any(n.startswith(("pallas_kernels/", "models/", "tools/")) for n in names)


def test_setup_py_packages_for_editable_and_wheel_builds(tmp_path):
    src = _copy_sources(tmp_path / "src")
    editable_packages, editable_requires = _setup_args(src, editable=True)
    wheel_packages, wheel_requires = _setup_args(src, editable=False)
    assert "pallas_kernels" in editable_packages and "pallas_kernels" not in wheel_packages
    assert not any("pallas-kernels" in r for r in editable_requires)
    assert f"jattn-pallas-kernels=={_version()}" in wheel_requires
    # The checkout as laid out (plus the jattn_lab alias) vs only jattn and jattn_lab.*.
    assert {"jattn", "jattn_lab", "models", "experiments", "configs"} <= set(editable_packages)
    assert {p.split(".")[0] for p in wheel_packages} == {"jattn", "jattn_lab"}
    assert "jattn_lab.experiments.tasks" in wheel_packages


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
        [str(python), "-c", "import jattn, pallas_kernels, jattn_lab.models as m; "
         "print(jattn.__file__); print(pallas_kernels.__file__); print(m.__file__); "
         "print(jattn.__version__)"],
        cwd=tmp_path, capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert where.returncode == 0, where.stderr
    *files, version = where.stdout.split()
    assert all(Path(f).is_relative_to(src) for f in files), files
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


USER_FOLDERS = """
import importlib.util, pathlib, sys
from flax import nnx
from jattn_lab.configs.bigram_backcopy import get_config
from jattn_lab.experiments.tasks import get_task
import jattn_lab

config = get_config("cpu")
model = get_task(config.task)(config).build_model(nnx.Rngs(0))
assert jattn_lab.INSTALLED and pathlib.Path(jattn_lab.__file__).is_relative_to(sys.prefix)
# jattn's code never touched the user's folders (nor any top-level `models` at all) ...
assert not {"models", "experiments", "configs"} & set(sys.modules), sorted(sys.modules)
for name, m in list(sys.modules.items()):
    if name.startswith("jattn"):
        assert pathlib.Path(m.__file__).is_relative_to(sys.prefix), (name, m.__file__)
# ... and the user's own packages are still theirs.
import models, configs, experiments
assert models.OWNER == configs.OWNER == experiments.OWNER == "user"
print(type(model).__name__)
"""


def test_user_folders_named_models_configs_experiments_do_not_shadow_the_wheel(wheels, tmp_path):
    """A Colab-like working directory with the user's own models/, configs/ and experiments/:
    the installed jattn (both wheels) still builds its model, and the user's imports still get
    the user's packages."""
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False, symlinks=True)
    python = tmp_path / "venv" / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheels["kernels"]), str(wheels["jattn"])],
        capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path / "content"
    for name in ("models", "configs", "experiments"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text('OWNER = "user"\n')
    proc = subprocess.run([str(python), "-c", USER_FOLDERS], cwd=work, capture_output=True,
                          text=True, env={**_clean_env(), "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[-1] == "Decoder"
    # The runner of the wheel, on a shipped config file, from the same directory.
    configs = subprocess.check_output(
        [str(python), "-c", "from jattn_lab import configs; print(configs.__path__[0])"],
        cwd=tmp_path, text=True, env=_clean_env()).strip()
    run = subprocess.run(
        [str(python), "-m", "jattn_lab.experiments.run", f"--config={configs}/regression.py:2",
         "--workdir=run", "--config.progress_bar=False", "--config.mesh.data=1",
         "--config.eval_every=2", "--config.checkpoint_every=2"],
        cwd=work, capture_output=True, text=True, timeout=300,
        env={**_clean_env(), "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((work / "run" / "summary.json").read_text())["step"] == 2


CHECKOUT_ALIAS = """
import sys
import configs.regression, experiments.tasks, models.layers
import jattn_lab
from jattn_lab import models as lab_models
import jattn_lab.experiments.tasks.base as lab_base
from jattn_lab.configs.regression import get_config
from jattn_lab.experiments.tasks import get_task

assert not jattn_lab.INSTALLED
assert lab_models is models and jattn_lab.experiments is experiments
assert lab_base is sys.modules["experiments.tasks.base"]
assert get_config is configs.regression.get_config
assert get_task("regression") is experiments.tasks.get_task("regression")  # one registry
assert models.__spec__.name == "models" and lab_base.__spec__.name == "experiments.tasks.base"
print("ok")
"""


def _checkout_env() -> dict:
    return {**_clean_env(), "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def test_jattn_lab_aliases_the_checkout_packages():
    """In the checkout, jattn_lab.X is the top-level X (same modules, one task registry), so
    code written for an installed jattn runs against the repository."""
    proc = subprocess.run([sys.executable, "-c", CHECKOUT_ALIAS], cwd=REPO, capture_output=True,
                          text=True, env=_checkout_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # runpy through the alias: `python -m jattn_lab.experiments.run` runs experiments/run.py.
    proc = subprocess.run([sys.executable, "-m", "jattn_lab.experiments.run", "--helpshort"],
                          cwd=REPO, capture_output=True, text=True, env=_checkout_env(),
                          timeout=120)
    assert "--workdir" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_jattn_lab_names_a_shadowing_folder_in_the_checkout(tmp_path):
    """The checkout resolves X through sys.path, where a user's folder can come first: then
    jattn_lab.X says which folder shadows which, instead of running the user's code."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, "-c", "import jattn_lab.models"], cwd=tmp_path,
                          capture_output=True, text=True, env=_checkout_env(), timeout=120)
    assert proc.returncode != 0
    assert "shadows it" in proc.stderr and str(tmp_path / "models") in proc.stderr, proc.stderr
