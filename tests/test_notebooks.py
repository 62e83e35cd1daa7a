"""Every notebook in colab/ executes top to bottom at its tiny CI size (JATTN_NOTEBOOK_SMOKE=1)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "colab/ holds no notebooks"


# suite time: these three run their tasks' tiny sizes, which the task tests also train;
# the default run keeps the quickstart and the kernels notebook
SLOW_NOTEBOOKS = {"icl_regression", "mqar_recall", "bigram_backcopy_sinks"}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
    for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is committed with outputs; clear them")
    # The kernel inherits this environment: tiny sizes, no display, one CPU device.
    monkeypatch.setenv("JATTN_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JATTN_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(path.parents[1]) + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


def _builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_build_notebooks", pathlib.Path(__file__).parents[1] / "colab" / "_build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pip_args(install_cell: str, source: str | None, monkeypatch) -> list[str]:
    """What the install cell would run on a fresh runtime (jattn not importable)."""
    import importlib.util
    import subprocess

    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    if source is None:
        monkeypatch.delenv("JATTN_SOURCE", raising=False)
    else:
        monkeypatch.setenv("JATTN_SOURCE", source)
    exec(install_cell, {})
    (cmd,) = calls
    return cmd[cmd.index("install") + 2:]  # after `install -q`


def test_every_notebook_installs_from_the_one_setting(monkeypatch):
    """One install cell (the builder's), whose default source is DEFAULT_SOURCE: the URL appears
    nowhere else; it installs the kernels distribution and jattn from the same source."""
    builder = _builder()
    for path in NOTEBOOKS:
        cells = [c.source for c in nbformat.read(path, as_version=4).cells
                 if c.cell_type == "code" and "JATTN_SOURCE" in c.source]
        assert cells == [builder.INSTALL], f"{path.name}: rebuild with colab/_build_notebooks.py"
    url = builder.DEFAULT_SOURCE
    assert _pip_args(builder.INSTALL, None, monkeypatch) == [
        f"jattn-pallas-kernels @ {url}#subdirectory=pallas_kernels", url]
    tagged = "git+https://example.org/me/jattn@v0.1.0"
    assert _pip_args(builder.INSTALL, tagged, monkeypatch) == [
        f"jattn-pallas-kernels @ {tagged}#subdirectory=pallas_kernels", tagged]
    assert _pip_args(builder.INSTALL, "/src/jattn", monkeypatch) == [
        "/src/jattn/pallas_kernels", "/src/jattn"]
    builder_text = (pathlib.Path(__file__).parents[1] / "colab" / "_build_notebooks.py").read_text()
    assert builder_text.count(url) == 1
