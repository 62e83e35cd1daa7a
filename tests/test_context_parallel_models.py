"""Context parallelism in the models and the runner (issue 16, section 2), 8 simulated devices.

* Every attention layer of a Decoder runs split along the sequence (``DecoderConfig.context_axis``)
  and equals the unsplit model; the runner turns it on for ``mesh.context > 1``, and the
  compiled step really contains the split attention (a spy on the jattn context-parallel entry
  points, and the ring's explicit ``collective_permute`` / LASP's ``all_gather`` in the lowered
  step: XLA's automatic partitioning inserts its collectives only later, when compiling).
* A hybrid ("LA": GLA + softmax) Decoder trained 20 steps with ``mesh.context=4`` (and
  ``data=2, context=4``) follows the one-device loss curve.
* A checkpoint saved on ``context=4`` resumes on ``context=1`` and on ``fsdp=8`` with the same
  next-step loss.
* Bad configurations raise ValueErrors that name what to change.
"""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn.context_parallel
import jattn.linear.context_parallel
from experiments.config import ConfigError
from experiments.sharding import make_mesh
from experiments.trainer import Trainer, train
from models import Decoder, DecoderConfig, ViT, vit_config
from models.decoder import set_context_parallel
from tests.testing import loss_curve

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

STEPS = 20


# ------------------------------------------------------------------ the model
def _forward_split_vs_unsplit(cfg: DecoderConfig, mesh_shape: dict, seq_len: int = 32):
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, seq_len), 0, cfg.vocab_size)
    want = model(tokens)
    set_context_parallel(model, "context")
    with jax.set_mesh(make_mesh(mesh_shape)):
        got = nnx.jit(lambda m, t: m(t))(model, tokens)
    return np.asarray(got), np.asarray(want)


# a representative of each way a core splits: softmax family (mask, sinks, output gate, MoH's
# per-token routing), each recurrent family (GLA, delta rule, kernelized) and the hybrid core
MECHANISMS = ["sliding_window:8", "sinks", "moh", "deltanet", "linear:elu1", "based"]
MORE_MECHANISMS = ["softmax", "sigmoid", "relu", "gated", "chunked:8", "gla", "retnet",
                   "gated_deltanet", "kda", "linear:hedgehog"]


def _mechanism_case(mech: str):
    cfg = DecoderConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=2, mechanism=mech,
                        positions="learned", max_len=64)
    got, want = _forward_split_vs_unsplit(cfg, {"data": 2, "context": 4})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("mech", MECHANISMS)
def test_each_core_family_split_equals_unsplit(mech):
    _mechanism_case(mech)


@pytest.mark.slow
@pytest.mark.parametrize("mech", MORE_MECHANISMS)
def test_every_mechanism_split_equals_unsplit(mech):
    _mechanism_case(mech)


def test_hybrid_allgather_and_rope_split_equals_unsplit():
    """RoPE positions are global token indices on every shard: the split model equals the
    unsplit one (all-gather strategy, GQA)."""
    cfg = DecoderConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        layer_pattern="LA", positions="rope", context_strategy="allgather")
    got, want = _forward_split_vs_unsplit(cfg, {"context": 8}, seq_len=48)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_set_context_parallel_reaches_every_core():
    model = Decoder(DecoderConfig(d_model=32, num_heads=2, layer_pattern="LA"),
                    rngs=nnx.Rngs(0))

    def settings():
        cfgs = [m.cfg for _, m in nnx.iter_modules(model) if hasattr(m, "cfg")]
        assert len(cfgs) == 1 + 2 * 2  # the decoder, then each layer's block and core
        return {(c.context_axis, c.context_strategy) for c in cfgs}

    set_context_parallel(model, "context", "allgather")
    assert settings() == {("context", "allgather")}
    set_context_parallel(model, None)
    assert settings() == {(None, "ring")}


def test_decoding_a_split_model_is_not_split():
    """Decoding steps (one token) never split: generate works on a model with context_axis."""
    model = Decoder(DecoderConfig(vocab_size=40, d_model=32, num_heads=2, layer_pattern="LA",
                                  context_axis="context"), rngs=nnx.Rngs(0))
    with jax.set_mesh(make_mesh({"context": 4})):
        out = model.generate(jnp.zeros((1, 3), jnp.int32), 2)
    assert out.shape == (1, 5)


# ------------------------------------------------------------------ bad configurations
@pytest.mark.parametrize("fields, match", [
    ({"mechanism": "clipped_softmax"}, "mechanism 'clipped_softmax'.*cannot run context-parallel"),
    ({"positions": "alibi"}, "alibi.*dense"),
    ({"implementation": "reference"}, "implementation='reference'.*None or 'xla'"),
    ({"context_strategy": "ping"}, "context_strategy must be one of .*got 'ping'"),
])
def test_unsupported_configs_raise_at_config_time(fields, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(d_model=32, num_heads=2, context_axis="context", **fields)


@pytest.mark.parametrize("pattern, seq_len, multiple", [("LA", 36, 8), ("L", 34, 4)])
def test_length_not_divisible_raises(pattern, seq_len, multiple):
    """Softmax layers need T % 2n (zigzag); recurrent-only stacks T % n."""
    model = Decoder(DecoderConfig(vocab_size=40, d_model=32, num_heads=2, layer_pattern=pattern,
                                  context_axis="context"), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t))
    with jax.set_mesh(make_mesh({"context": 4})):
        with pytest.raises(ValueError, match=rf"multiple of {multiple}.*got T={seq_len}"):
            forward(model, jnp.zeros((2, seq_len), jnp.int32))
    no_context = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(no_context), pytest.raises(ValueError, match="'context' is not an axis"):
        forward(model, jnp.zeros((2, 32), jnp.int32))


def test_runner_rejects_a_model_that_cannot_split(tmp_path):
    with pytest.raises(ConfigError, match="mesh.context=4.*clipped_softmax"):
        Trainer(char_lm_config(**{"mesh.context": 4, "model.mechanism": "clipped_softmax"}),
                str(tmp_path))


def test_runner_length_not_divisible_raises(tmp_path, no_end_of_run_extras):
    """char_lm with seq_len 36 on context=4 (T = 36, not a multiple of 2 * 4): the first step
    raises the Decoder's message, naming the axis, its size and a length that works."""
    config = char_lm_config(**{"data.seq_len": 36, "mesh.context": 4, "train_steps": 1})
    with pytest.raises(ValueError, match="over 4 devices.*multiple of 8.*T=36.*e.g. 40"):
        train(config, str(tmp_path))


def test_runner_leaves_other_models_alone(tmp_path):
    """The runner makes only Decoders context-parallel (a ViT's class token makes T odd; an
    MLP has no sequence); their batches are still split, XLA partitions the rest."""
    trainer = Trainer(char_lm_config(**{"mesh.context": 4}), str(tmp_path))
    vit = ViT(vit_config("test/4", image_size=8, num_classes=3), rngs=nnx.Rngs(0))
    assert trainer._with_context_axis(vit).cfg.context_axis is None
    decoder = Decoder(DecoderConfig(d_model=32, num_heads=2), rngs=nnx.Rngs(0))
    assert trainer._with_context_axis(decoder).cfg.context_axis == "context"


def test_vit_split_equals_unsplit():
    """A ViT asked for context parallelism (ViTConfig.context_axis) splits like the Decoder."""
    cfg = vit_config("test/4", image_size=8, num_classes=3, pool="gap",
                     context_axis="context")
    model = ViT(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    set_context_parallel(model, None)
    want = model(images)
    set_context_parallel(model, "context")
    with jax.set_mesh(make_mesh({"context": 2})):
        got = nnx.jit(lambda m, x: m(x))(model, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the runner
def char_lm_config(**overrides):
    """char_lm tiny as a 2-layer hybrid: GLA then softmax ("LA"), d 32, T 32, batch 8."""
    from configs.char_lm import get_config

    config = get_config("tiny")
    values = {"model.num_layers": 2, "model.layer_pattern": "LA", "model.implementation": "",
              "data.seq_len": 32, "batch_size": 8, "train_steps": STEPS, "log_every": 1,
              "eval_every": 0, "eval_batches": 0, "histogram_every": 0, "checkpoint_every": 0,
              "sample_tokens": 1, "progress_bar": False, "mesh.data": 1, **overrides}
    for key, value in values.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


class _Spy:
    """Counts calls of the jattn context-parallel entry points (at trace time)."""

    def __init__(self, monkeypatch):
        self.calls = {"softmax": 0, "gla": 0}
        for module, name, kind in ((jattn.context_parallel, "attention", "softmax"),
                                   (jattn.linear.context_parallel, "gla_context_parallel",
                                    "gla")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), kind))

    def _wrap(self, fn, kind):
        def spied(*args, **kwargs):
            self.calls[kind] += 1
            return fn(*args, **kwargs)

        return spied


def _loss_curve(config, workdir):
    """Losses of the runner's train step over the first STEPS batches, and the lowered step."""
    losses, run = loss_curve(config, workdir, STEPS, lower_first=True)
    return losses, run["lowered"]


@pytest.fixture(scope="module")
def one_device_curve(tmp_path_factory):
    return _loss_curve(char_lm_config(), tmp_path_factory.mktemp("one"))[0]


# suite time: data=2 x context=4 (both axes) in the default run, context=4 alone slow
@pytest.mark.parametrize("mesh", [pytest.param({"context": 4}, marks=pytest.mark.slow),
                                  {"data": 2, "context": 4}],
                         ids=["context4", "data2_context4"])
def test_hybrid_training_matches_one_device(mesh, one_device_curve, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    config = char_lm_config(**{f"mesh.{k}": v for k, v in mesh.items()})
    got, lowered = _loss_curve(config, tmp_path)
    # the context path was taken by both layers: a model ignoring the axis fails here ...
    assert spy.calls["softmax"] >= 1 and spy.calls["gla"] >= 1, spy.calls
    # ... and the step holds the explicit collectives of the split attention: the ring's K/V
    # hops (and zigzag moves) and LASP-2's all-gather of the per-device state summaries
    assert len(re.findall(r"collective_permute", lowered)) >= 4
    assert "all_gather" in lowered
    np.testing.assert_allclose(got, one_device_curve, rtol=1e-4)
    assert one_device_curve[-1] < one_device_curve[0]


@pytest.fixture
def no_end_of_run_extras(monkeypatch):
    """Skip char_lm's greedy sample and loss figure (compile and plot time, not under test)."""
    from experiments.tasks.char_lm import CharLM

    monkeypatch.setattr(CharLM, "summary_fields", lambda self, model, history: {})
    monkeypatch.setattr(CharLM, "write_figures", lambda self, workdir, model, history: [])


# suite time: the resume on fsdp=8 (a different multi-device sharding) in the default run,
# on one device slow
@pytest.mark.parametrize("name, mesh", [pytest.param("one", {}, marks=pytest.mark.slow),
                                        ("fsdp8", {"mesh.fsdp": 8})], ids=["one", "fsdp8"])
def test_checkpoint_from_context4_resumes_on_other_meshes(name, mesh, tmp_path,
                                                          no_end_of_run_extras):
    """Checkpoints at steps 2 and 3 on context=4; resumed from step 2 on context=1 (one
    device) or on fsdp=8, step 3's loss is the context=4 run's: orbax restores the global
    arrays into the current mesh's shardings (the trainer's abstract state)."""
    saved = tmp_path / "context4"
    config = lambda **kw: char_lm_config(**{"train_steps": 3, "checkpoint_every": 2, **kw})
    want = train(config(**{"mesh.context": 4}), str(saved))["final"]["train_loss"]
    workdir = tmp_path / name
    shutil.copytree(saved, workdir)
    shutil.rmtree(workdir / "checkpoints" / "3")  # resume from step 2
    summary = Trainer(config(**mesh), str(workdir)).run()
    assert summary["resumed_from"] == 2
    assert summary["mesh"]["context"] == 1
    np.testing.assert_allclose(summary["final"]["train_loss"], want, rtol=1e-4)


def test_char_lm_attention_images_of_a_split_model(tmp_path):
    """The attention-map images read a prefix of the sequence that the split divides (32 image
    tokens over context=3: 30, a multiple of 2 * 3)."""
    config = char_lm_config(**{"data.seq_len": 36, "image_tokens": 32, "mesh.context": 3})
    trainer = Trainer(config, str(tmp_path))
    model = trainer._with_context_axis(trainer.task.build_model(nnx.Rngs(0)))
    tokens = jnp.zeros((2, 37), jnp.int32)
    with jax.set_mesh(trainer.mesh):
        images = nnx.jit(lambda m, b: trainer.task.eval_images(m, b))(model, {"tokens": tokens})
    assert images["attention/layer1"].shape == (30, 30)
