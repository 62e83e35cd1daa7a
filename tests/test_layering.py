"""The package layering of the upper floors: studies -> configs -> experiments -> models.

Configs sit above the runner (they import `models`, never `experiments`); the runner never
imports configs or studies; every config spells a model field one way; the studies take the
runner's `--config.key=value` overrides."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported_packages(package: str) -> dict[str, set[str]]:
    """file -> top-level packages its import statements name (lazy imports included)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("experiments", {"configs", "studies", "tests"}),
    ("configs", {"experiments", "studies", "tests"}),
    ("models", {"experiments", "configs", "studies"}),
])
def test_no_import_runs_upward(package, forbidden):
    bad = {f: sorted(names & forbidden) for f, names in _imported_packages(package).items()
           if names & forbidden}
    assert not bad, f"{package} imports from a floor above it: {bad}"


CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_keeps_model_fields_in_config_model(name):
    from configs.common import RENAMED

    config = importlib.import_module(f"configs.{name}").get_config(
        "10" if name == "icl_regression" else None)
    assert "model" in config, name
    for key in ("mechanism", "positions", "implementation", "init", "d_model", "num_layers",
                "num_heads", *RENAMED):
        assert key not in config, f"configs/{name}.py: {key!r} belongs under config.model"
    assert not set(config.model) & set(RENAMED)


def test_model_config_rejects_old_spellings():
    from configs.common import model_config

    with pytest.raises(ValueError, match="'normalizer' is spelled 'mechanism'"):
        model_config(normalizer="relu")
    with pytest.raises(ValueError, match="'posemb' is spelled 'positions'"):
        model_config(posemb="learned")
    assert model_config(implementation=None).implementation == ""


def test_builder_names_an_unknown_model_key():
    from configs.common import model_config
    from experiments.config import ConfigError
    from experiments.tasks.model_config import decoder_config, vit_config

    cfg = decoder_config(model_config(d_model=16, num_heads=2, num_layers=1, init="pytorch",
                                      implementation=""), vocab_size=11, max_len=8)
    assert (cfg.vocab_size, cfg.max_len, cfg.implementation) == (11, 8, None)
    with pytest.raises(ConfigError, match="config.model.d_modle"):
        decoder_config(model_config(d_modle=16))
    vit = vit_config(model_config(size="test", patch_size=2, positions="sincos2d"),
                     image_size=8, channels=1, num_classes=3)
    assert (vit.posemb, vit.patch_size, vit.num_classes) == ("sincos2d", 2, 3)


def test_studies_take_the_runner_override_syntax(capsys):
    from studies.cli import parse_args

    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--workdir")
        return p

    args, overrides = parse_args(parser(), [
        "--workdir", "W", "--config.model.mechanism=gla", "--config.train_steps=6",
        "--set", "log_every=2", "schedule=constant"])
    assert args.workdir == "W"
    assert overrides == {"model.mechanism": "gla", "train_steps": 6, "log_every": 2,
                         "schedule": "constant"}
    for bad in (["--bogus=1"], ["--config.train_steps"]):
        with pytest.raises(SystemExit) as e:
            parse_args(parser(), bad)
        assert e.value.code == 2
    assert "--config.KEY=VALUE" in capsys.readouterr().err
