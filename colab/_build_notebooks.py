"""Writes the experiment notebooks of colab/ (without outputs). Run from the repo root:

    python colab/_build_notebooks.py

Each notebook's cells live in ``colab/notebooks/<name>.py`` (``CELLS``): a markdown title, the
install cell, then code cells; this builder fills in the shared install/setup cells. ``SMOKE`` (env
``JATTN_NOTEBOOK_SMOKE=1``, set by tests/test_notebooks.py) shrinks every size; runs go to
``JATTN_NOTEBOOK_WORKDIR`` (or ``./runs``). The hand-written notebooks (quickstart) get the
same install cell: the builder replaces theirs.

Where the notebooks install jattn from (when it is not importable: a fresh Colab runtime) is
one setting: the environment variable ``JATTN_SOURCE`` at run time, else ``DEFAULT_SOURCE``
below, written into every install cell. Either a pip URL of the repository
(``git+https://HOST/OWNER/jattn@REF``) or the path of a checkout. The install cell installs two
distributions from it: the kernels (``jattn-pallas-kernels``, its ``pallas_kernels/``
subfolder) and jattn, whose wheel requires them. Installed so, the lab packages are
``jattn_lab.models``, ``jattn_lab.experiments``, ``jattn_lab.configs`` (jattn_lab/__init__.py),
the names the notebooks use; from the checkout they alias the top-level packages.
"""

from __future__ import annotations

import importlib.util
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

# The one place that names where the notebooks install from (see the module docstring).
DEFAULT_SOURCE = "git+https://github.com/jattn-dev/jattn"

INSTALL = f"""\
# Install jattn when it is not importable yet (Colab). Locally: `pip install -e .` first.
# JATTN_SOURCE: a pip URL of the repository (git+https://...@REF) or a checkout's path.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jattn") is None:
    source = os.environ.get("JATTN_SOURCE", "{DEFAULT_SOURCE}")
    if source.startswith("git+"):  # the kernels are a subfolder of the same repository
        kernels, jattn = f"jattn-pallas-kernels @ {{source}}#subdirectory=pallas_kernels", source
    else:
        kernels, jattn = os.path.join(source, "pallas_kernels"), source
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", kernels, jattn])"""

SETUP = """\
import json, os, pathlib, subprocess, sys, time
import numpy as np
import matplotlib.pyplot as plt

SMOKE = os.environ.get("JATTN_NOTEBOOK_SMOKE") == "1"
WORKDIR = pathlib.Path(os.environ.get("JATTN_NOTEBOOK_WORKDIR") or "runs").resolve()
WORKDIR.mkdir(parents=True, exist_ok=True)


def run_experiment(config: str, workdir: pathlib.Path, *overrides: str) -> dict:
    \"\"\"`python -m jattn_lab.experiments.run --config CONFIGS/CONFIG --workdir DIR
    [--config.k=v ...]` in a subprocess; returns DIR/summary.json. Re-running resumes (or
    reuses) the run.\"\"\"
    from jattn_lab import configs
    config_path = pathlib.Path(configs.__file__).parent / config
    cmd = [sys.executable, "-m", "jattn_lab.experiments.run", f"--config={config_path}",
           f"--workdir={workdir}", "--config.progress_bar=False", *overrides]
    print("$", " ".join(cmd[1:]))
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise RuntimeError(f"run failed with exit code {out.returncode}")
    print(f"done in {time.time() - t0:.0f}s")
    return json.loads((workdir / "summary.json").read_text())"""

NOTEBOOK_DIR = HERE / "notebooks"  # one module per notebook, each defining CELLS
# Built notebooks, in the order they are written.
BUILT = ("icl_regression", "bigram_backcopy_sinks", "mqar_recall", "kernels")
HAND_WRITTEN = ("quickstart",)


def load_cells(name: str) -> list[tuple[str, str]]:
    """``colab/notebooks/<name>.py``'s CELLS, the shared install and setup cells filled in.

    Loaded by path (colab/ is not a package; tests load this builder the same way)."""
    spec = importlib.util.spec_from_file_location(f"_notebook_{name}", NOTEBOOK_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shared = {"install": INSTALL, "setup": SETUP}
    return [("code", shared[kind]) if kind in shared else (kind, src)
            for kind, src in module.CELLS]


def notebook(cells: list[tuple[str, str]], name: str) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(cells):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell.id = f"{name}-{i}"  # stable ids: rebuilding gives a clean diff
        nb.cells.append(cell)
    return nb




def main() -> None:
    for name in BUILT:
        path = HERE / f"{name}.ipynb"
        nbformat.write(notebook(load_cells(name), name), path)
        print("wrote", path)
    for name in HAND_WRITTEN:  # same install cell as the built ones
        path = HERE / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.source.startswith(INSTALL.splitlines()[0]):
                cell.source = INSTALL
        nbformat.write(nb, path)
        print("updated the install cell of", path)


if __name__ == "__main__":
    main()
