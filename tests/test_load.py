"""experiments.load: a trained run's checkpoint, restored into a freshly built model."""

import json

import jax
import numpy as np
import pytest

import experiments
from experiments.trainer import Trainer
from tests import testing as T

RUN = dict(train_steps=6, checkpoint_every=3, log_every=3, eval_every=6, keep_checkpoints=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (6 steps, checkpoints at 3 and 6); the trainer's model at its last step."""
    workdir = tmp_path_factory.mktemp("run")
    trainer = Trainer(T.tiny_config(**RUN), str(workdir))
    trainer.run()
    return workdir, trainer


def _inputs(config) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(7), (5, config.model.dim)))


def test_load_restores_the_latest_checkpoint_into_the_trainers_model(trained):
    workdir, trainer = trained
    model, config, step = experiments.load(workdir)
    assert step == 6 and config.task == "regression" and config.train_steps == 6
    x = _inputs(config)
    np.testing.assert_array_equal(model(x), trainer.model(trainer.final_state)(x))
    assert dict(config.mesh) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_load_an_earlier_step_differs_from_the_latest(trained):
    workdir, trainer = trained
    earlier, config, step = experiments.load(workdir, step=3)
    x = _inputs(config)
    assert step == 3
    assert not np.array_equal(earlier(x), trainer.model(trainer.final_state)(x))


def test_load_leaves_the_run_directory_unchanged(trained):
    workdir, _ = trained
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    experiments.load(workdir)
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_load_errors_name_the_argument(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(FileNotFoundError, match="no config.json"):
        experiments.load(tmp_path)
    with pytest.raises(ValueError, match=r"step=4: not a checkpoint .*\[3, 6\]"):
        experiments.load(workdir, step=4)
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        experiments.load(tmp_path)


def test_load_is_the_function_also_through_jattn_lab():
    import jattn_lab.experiments

    assert jattn_lab.experiments.load is experiments.load
    assert json.dumps(experiments.__all__) == '["load"]'
