"""A newcomer's first hour, as a test: every ```python block of README.md runs verbatim, and
`python -m experiments.run --help` exits 0 and names every shipped config with its ARG.

Everything runs in a fresh interpreter whose working directory is outside the repository (a
newcomer's own folder), with the checkout on PYTHONPATH. Installing into a fresh venv as the
README says is tests/test_packaging.py's (the editable install, the wheels, the kernels-only
wheel in a venv without flax).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import testing as T

README = T.REPO / "README.md"
CONFIGS = T.REPO / "configs"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def _config_names() -> list[str]:
    """Every config file in configs/ (a module defining get_config), found independently of the
    runner's own discovery."""
    return sorted(
        p.stem for p in CONFIGS.glob("*.py")
        if any(isinstance(n, ast.FunctionDef) and n.name == "get_config"
               for n in ast.parse(p.read_text()).body)
    )


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=T.env(1), capture_output=True,
                          text=True, timeout=timeout)


def test_readme_has_python_blocks():
    assert _python_blocks(), "README.md has no ```python block"


def test_readme_python_blocks_run_verbatim_in_order(tmp_path):
    """The blocks as a reader pastes them, one after another into one session (a later block
    may use names an earlier one defined)."""
    blocks = _python_blocks()
    snippet = tmp_path / "readme_blocks.py"
    snippet.write_text("\n".join(f"# --- README block {i}\n{b}" for i, b in enumerate(blocks)))
    out = _run([str(snippet)], cwd=tmp_path)
    assert out.returncode == 0, f"a README block failed:\n{out.stderr[-3000:]}"


def test_help_exits_0_and_names_every_config_with_its_arg(tmp_path):
    out = _run(["-m", "experiments.run", "--help"], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    names = _config_names()
    assert len(names) >= 6, names
    listed = re.findall(r"^  (\w+)$", out.stdout, re.M)
    assert listed == names, out.stdout
    assert out.stdout.count("ARG: ") == len(names), out.stdout
    assert "ARG: (none)" not in out.stdout, out.stdout  # each config declares its ARGS
    assert "--workdir" in out.stdout and "--config" in out.stdout


@pytest.mark.parametrize("name", _config_names())
def test_config_args_name_its_tokens_and_sizes(name):
    """`ARGS` (what --help shows) mentions every token / size the config accepts."""
    module = importlib.import_module(f"configs.{name}")
    assert isinstance(getattr(module, "ARGS", None), str) and module.ARGS, name
    accepted = list(getattr(module, "TOKENS", ())) + list(getattr(module, "SIZES", {}))
    for token in accepted:
        assert re.search(rf"\b{re.escape(token)}\b", module.ARGS), (name, token, module.ARGS)


def test_runner_import_does_not_import_configs(tmp_path):
    code = ("import sys, experiments.run; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'configs']; "
            "assert not bad, bad")
    out = _run(["-c", code], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("config", ["mqar:tiny", "configs/mqar.py:tiny", "mqar.py"])
def test_config_is_found_from_outside_the_repository(tmp_path, config):
    # An unknown override fails right after the config loads: proof it was found, no training.
    out = _run(["-m", "experiments.run", f"--config={config}", f"--workdir={tmp_path / 'run'}",
                "--config.no_such_key=1"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "unknown config key 'no_such_key'" in out.stderr, out.stderr[-3000:]


def test_missing_config_is_one_line_naming_the_shipped_configs(tmp_path):
    out = _run(["-m", "experiments.run", "--config=configs/no_such.py", "--workdir=run"],
               cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    (line,) = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert line.startswith("error:") and "no_such.py" in line and "mqar" in line, line


def test_resolve_config_prefers_the_users_file(tmp_path, monkeypatch):
    from experiments import run

    monkeypatch.chdir(tmp_path)
    shipped = run.SHIPPED_CONFIGS / "mqar.py"
    assert run.resolve_config("mqar:cpu") == f"{shipped}:cpu"
    assert run.resolve_config("configs/mqar.py") == str(shipped)
    assert run.resolve_config("configs/no_such.py:x") == "configs/no_such.py:x"
    assert run.resolve_config("elsewhere/mqar.py") == "elsewhere/mqar.py"  # not a shipped path
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mqar.py").write_text("def get_config(arg=None): ...\n")
    assert run.resolve_config("configs/mqar.py:cpu") == "configs/mqar.py:cpu"
