"""The runner's real tasks (char_lm on models.Decoder, vit_digits on models.ViT) at tiny
size, and unit checks of the optimizer and data plumbing."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from experiments.config import ConfigError
from experiments.optim import decay_mask, make_optimizer, make_schedule
from tests import testing as T

pytest.importorskip("models")


def _config(module: str, arg: str, **overrides):
    import importlib

    config = importlib.import_module(f"configs.{module}").get_config(arg)
    config.progress_bar = False
    config.mesh.data = 1  # one device compiles fastest; sharding is tested in test_runner.py
    config.update_from_flattened_dict(overrides)
    return config


def test_char_lm_tiny_learns_and_reports(tmp_path):
    from experiments.trainer import train

    summary = train(_config("char_lm", "tiny"), str(tmp_path))
    loss = T.read_scalars(tmp_path, "train/loss")
    assert loss[-1][1] < 0.7 * loss[0][1], loss
    final = summary["final"]
    assert {"train_loss", "eval_loss", "eval_accuracy", "eval_bits_per_char"} <= set(final)
    assert 0.0 <= final["eval_accuracy"] <= 1.0
    assert summary["sample"]["greedy"].startswith(summary["sample"]["prompt"])
    assert (tmp_path / "loss.png").stat().st_size > 1000

    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    assert "images/attention/layer0" in acc.Tags()["images"]


def test_char_lm_reads_a_user_corpus(tmp_path):
    from experiments.tasks.char_lm import CharLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcab" * 400)
    task = CharLM(_config("char_lm", "tiny", corpus=str(corpus)))
    task.validate()
    assert task.vocab() == ["a", "b", "c"]
    batch = task.train_source().fn(np.array([3, 4, 5]))["tokens"]
    assert batch.shape == (3, 33) and batch.max() <= 2
    one = task.train_source().fn(np.array([4]))["tokens"]
    np.testing.assert_array_equal(one[0], batch[1])  # example i depends on (seed, i) only
    with pytest.raises(ConfigError, match="config.corpus"):
        CharLM(_config("char_lm", "tiny", corpus=str(tmp_path / "missing.txt"))).validate()


@pytest.mark.slow
def test_vit_digits_tiny_learns(tmp_path):
    from experiments.trainer import train

    summary = train(_config("vit_digits", "tiny", train_steps=60), str(tmp_path))
    assert summary["final"]["eval_accuracy"] > 0.3
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    assert "images/attention/cls_to_patches" in acc.Tags()["images"]


def test_vit_digits_data_and_image_folder(tmp_path):
    from PIL import Image

    from experiments.tasks.vit_digits import ViTDigits

    task = ViTDigits(_config("vit_digits", "tiny"))
    task.validate()
    ex = task.train_source()[0]
    assert ex["image"].shape == (8, 8, 1) and 0 <= int(ex["label"]) < 10
    assert len(task.eval_source()) == int(1797 * 0.2)

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                rgb = np.full((12, 10, 3), 40 * i, np.uint8)
                Image.fromarray(rgb).save(tmp_path / split / cls / f"{i}.png")
    folder = ViTDigits(
        _config("vit_digits", "tiny", **{"data.image_folder": str(tmp_path), "data.channels": 3})
    )
    folder.validate()
    train, held, n = folder.splits()
    assert n == 2 and len(train) == 6 and len(held) == 6
    ex = folder.train_source()[0]
    assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.float32


def test_weight_decay_mask_and_schedules():
    params = {
        "layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "embed": {"embedding": jnp.ones((3, 2))},
        "norm": {"scale": jnp.ones(2)},
    }
    mask = decay_mask(params, ("bias", "norm", "scale", "embed"))
    assert mask == {
        "layer": {"kernel": True, "bias": False},
        "embed": {"embedding": False},
        "norm": {"scale": False},
    }

    c = base_config("regression")
    c.update(
        dict(
            train_steps=100,
            warmup_steps=10,
            schedule="cosine",
            learning_rate=1.0,
            min_lr_ratio=0.1,
            optimizer="adamw",
            weight_decay=0.5,
            grad_clip_norm=1.0,
        )
    )
    sched = make_schedule(c)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1)
    c.warmup_steps = 0  # a non-zero learning rate at step 0
    tx, _ = make_optimizer(c)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, state, params)  # zero grads: only decay moves
    assert float(jnp.abs(updates["layer"]["kernel"]).sum()) > 0
    assert float(jnp.abs(updates["layer"]["bias"]).sum()) == 0
    assert float(jnp.abs(updates["embed"]["embedding"]).sum()) == 0
