"""The one sharding path, end to end through the runner on the 8 simulated CPU devices.

Each test here fails when nothing is sharded (the state of issue 16: every Decoder/ViT parameter
replicated while the loss curves still matched): the specs of real models' parameters and
optimizer moments, the bytes each device holds, the compiled step's memory and its collectives,
and the `context` mesh axis (batch sequence split, training equal to one device).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs.common import base_config
from experiments.sharding import batch_spec, make_global_batch, make_mesh, mesh_shape
from experiments.trainer import Trainer, train
from models.sharding import DEFAULT_RULES, MESH_AXES, axis_rules
from tests import testing as T

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

MESHES = {"fsdp4_tensor2": {"fsdp": 4, "tensor": 2}, "fsdp8": {"fsdp": 8}}


def _override(config, overrides: dict):
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if last not in node:  # a typo or a moved key would silently add an unused one
            raise KeyError(f"config has no key {key!r}")
        node[last] = value
    return config


def decoder_config(**overrides):
    """MQAR on a 2-layer Decoder whose every dimension the meshes divide (vocab 64, d 32,
    2 heads of 16, SwiGLU hidden 2 * 32 * 4 // 3 rounded by the model)."""
    from configs.mqar import get_config

    return _override(get_config("tiny"), {
        "model.d_model": 32, "model.num_heads": 2, "mesh.data": 1, "train_steps": 8, "log_every": 1,
        "eval_every": 0, "checkpoint_every": 0, "eval_batches": 0, "histogram_every": 0,
        **overrides})


def vit_config(**overrides):
    """The digits ViT at its test size (width 16, 2 heads, MLP 32, 1 layer)."""
    from configs.vit_digits import get_config

    return _override(get_config("tiny"), {"mesh.data": 1, "progress_bar": False, **overrides})


def _mesh_keys(mesh: dict) -> dict:
    return {f"mesh.{k}": v for k, v in mesh.items()}


# The specs the default rules give, written out by hand (logical axes of each kernel in
# models/attention.py and models/layers.py): q/k/v `(embed, heads, kv)`, o `(heads, kv, embed)`,
# MLP in `(embed, mlp)` / out `(mlp, embed)`, embedding `(vocab, embed)`, head `(embed, vocab)`,
# norm scales `(embed,)`.
def expected_specs(mesh_name: str) -> dict[str, P]:
    t = "tensor" if mesh_name == "fsdp4_tensor2" else None
    return {
        "q_proj": P("fsdp", t, None), "k_proj": P("fsdp", t, None),
        "v_proj": P("fsdp", t, None), "o_proj": P(t, None, "fsdp"),
        "mlp.up": P("fsdp", t), "mlp.gate": P("fsdp", t), "mlp.down": P(t, "fsdp"),
        "embed.embedding": P(t, "fsdp"), "head": P("fsdp", t),
        "vit.head": P("fsdp", None), "patch_embed": P(None, "fsdp"),
        "pos_embed": P(None, "fsdp"), "norm": P("fsdp"),
    }


def _path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _expected_for(path: str, table: dict[str, P], vit: bool) -> tuple[str, P] | None:
    """(table key, spec) of a parameter path such as ``layers.0.attn.q_proj.kernel``."""
    if path.endswith("bias"):
        return None
    for key in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.up", "mlp.gate", "mlp.down",
                "embed.embedding", "patch_embed", "pos_embed"):
        if key in path:
            return key, table[key]
    if path.startswith("head."):
        key = "vit.head" if vit else "head"
        return key, table[key]
    if path.endswith(".scale") and "norm" in path:
        return "norm", table["norm"]
    return None


def _device0_bytes(tree) -> int:
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == d0)


@pytest.mark.parametrize("model", ["decoder", "vit"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_params_and_moments_sharded_as_the_rules_say(model, mesh_name, tmp_path):
    mesh = MESHES[mesh_name]
    make = decoder_config if model == "decoder" else vit_config
    trainer = Trainer(make(**_mesh_keys(mesh)), str(tmp_path))
    with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
        state = trainer._init()
    params = state["params"]
    table = expected_specs(mesh_name)
    checked = set()
    for path, x in jax.tree.leaves_with_path(params):
        name = _path(path)
        match = _expected_for(name, table, vit=model == "vit")
        if match is None:
            continue
        checked.add(match[0])
        assert x.sharding.spec == match[1], (name, x.sharding.spec, match[1])
    must = {"q_proj", "k_proj", "v_proj", "o_proj", "mlp.up", "mlp.down", "norm"}
    must |= ({"patch_embed", "pos_embed", "vit.head"} if model == "vit"
             else {"embed.embedding", "head", "mlp.gate"})
    assert must <= checked, must - checked

    # Adam's moments are placed like their parameters, leaf by leaf.
    for moment in ("mu", "nu"):
        (_, tree), = optax.tree_utils.tree_get_all_with_path(state["opt_state"], moment)
        for (path, p), m in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(tree),
                                strict=True):
            assert m.sharding.spec == p.sharding.spec, (moment, _path(path))

    # Each device holds 1/fsdp of the parameters, plus the small replicated vectors.
    fsdp = mesh["fsdp"]
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    small = sum(x.nbytes for x in jax.tree.leaves(params) if x.ndim <= 1)
    held = _device0_bytes(params)
    assert held <= total / fsdp + small, (held, total, fsdp, small)
    assert _device0_bytes(state["opt_state"]) <= 2 * (total / fsdp + small) + 64


def lm_config(**overrides):
    """The character LM (a dense next-token loss at every position) with 2 layers, d 32."""
    from configs.char_lm import get_config

    return _override(get_config("tiny"), {"model.num_layers": 2, "mesh.data": 1,
                                          "progress_bar": False, **overrides})


def _compiled_step(config, tmp_path):
    """The runner's jitted train step, compiled for `config`'s mesh on a global token batch."""
    trainer = Trainer(config, str(tmp_path))
    b, t = config.batch_size, config.data.seq_len + 1
    with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
        batch = make_global_batch({"tokens": np.zeros((b, t), np.int32)}, trainer.mesh, b,
                                  trainer.rules)
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return trainer, compiled


@pytest.fixture(scope="module")
def fsdp8_step(tmp_path_factory):
    return _compiled_step(lm_config(**{"mesh.fsdp": 8}), tmp_path_factory.mktemp("fsdp8"))


def test_train_step_memory_falls_with_fsdp(fsdp8_step, tmp_path):
    _, one = _compiled_step(lm_config(), tmp_path)
    _, eight = fsdp8_step
    m1, m8 = one.memory_analysis(), eight.memory_analysis()
    # the state (params + Adam moments) dominates the arguments: ~1/8 of it per device
    assert m8.argument_size_in_bytes < m1.argument_size_in_bytes / 6, (
        m1.argument_size_in_bytes, m8.argument_size_in_bytes)
    assert m8.output_size_in_bytes < m1.output_size_in_bytes / 6
    assert m8.temp_size_in_bytes < m1.temp_size_in_bytes


_COLLECTIVE = re.compile(
    r"= (?P<shape>\w+\[[\d,]*\])\S* all-gather\(.*?replica_groups=(?P<groups>\S+)"
    r".*?op_name=\"(?P<op>[^\"]*)\"")


def test_fsdp_step_gathers_each_weight_per_layer_only(fsdp8_step):
    """The compiled fsdp=8 step's all-gathers are FSDP's: each gathers one parameter (its full
    shape) inside the model's forward or backward, at most twice (forward, backward), over all 8
    devices; none in the optimizer update, none of a float activation (the batch stays split).
    XLA may look the fsdp-sharded embedding table up with the token ids of the whole batch
    (at most B * T integers) instead of gathering the table: allowed.

    This fails if the parameters are replicated (no gathers), gathered wholesale (e.g.
    constrained to P() at the start of the step: gathers outside jvp/transpose(jvp)), or if an
    activation loses its batch sharding ([B, T, D] gathered)."""
    trainer, compiled = fsdp8_step
    hlo = compiled.as_text()
    gathers = [m.groupdict() for line in hlo.splitlines()
               if " all-gather(" in line and (m := _COLLECTIVE.search(line))]
    assert gathers, "no all-gather at all: the parameters are not sharded"

    abstract = trainer.abstract_state["params"]
    param_shapes = {}
    for x in jax.tree.leaves(abstract):
        if x.sharding.spec != P(*([None] * x.ndim)) and any(s for s in x.sharding.spec):
            key = f"f32[{','.join(map(str, x.shape))}]"
            param_shapes[key] = param_shapes.get(key, 0) + 1
    assert sum(param_shapes.values()) >= 10  # the embedding, 2 layers' kernels, norms, head

    counts: dict[str, int] = {}
    config = trainer.config
    for g in gathers:
        assert "jvp(" in g["op"], f"all-gather outside the model's forward/backward: {g}"
        if g["shape"].startswith("s32"):
            size = np.prod([int(d) for d in g["shape"][4:-1].split(",")])
            assert size <= config.batch_size * (config.data.seq_len + 1), f"ids? {g}"
            continue
        assert g["shape"] in param_shapes, f"all-gather of a non-parameter {g}"
        assert "8" in g["groups"], g  # over the fsdp axis (all 8 devices)
        counts[g["shape"]] = counts.get(g["shape"], 0) + 1
    for shape, n in param_shapes.items():
        # every sharded parameter is gathered (forward), at most once more (backward)
        assert n <= counts.get(shape, 0) <= 2 * n, (shape, n, counts.get(shape))


def test_residual_stream_constrained_at_every_block_boundary():
    """The embedding output and every block's output carry a sharding constraint: rows over
    data, sequence over context, width whole (pinned, not left to XLA's propagation)."""
    from flax import nnx

    from models import Decoder, DecoderConfig

    mesh = make_mesh({"data": 2, "context": 2, "tensor": 2})
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=3)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
        text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
            state, np.zeros((4, 8), np.int32)).as_text()
    residual = [line for line in text.splitlines() if "sharding_constraint" in line
                and '[{"data"}, {"context"}, {}]' in line and "tensor<4x8x16xf32>" in line]
    assert len(residual) == 1 + cfg.num_layers, residual


# ------------------------------------------------------------------ the context axis
def test_context_mesh_axis_and_batch_spec():
    assert MESH_AXES == ("data", "fsdp", "context", "tensor")
    assert dict(DEFAULT_RULES)["length"] == "context"
    assert base_config().logical_axis_rules == DEFAULT_RULES
    assert base_config().mesh.context == 1
    assert mesh_shape({"data": 2, "context": 4}, 8) == (2, 1, 4, 1)
    assert mesh_shape({"data": -1, "context": 2, "tensor": 2}, 8) == (2, 1, 2, 2)

    mesh = make_mesh({"data": 2, "fsdp": 2, "context": 2})
    assert mesh.axis_names == MESH_AXES
    with axis_rules(DEFAULT_RULES):
        assert batch_spec(mesh, (8, 16)) == P(("data", "fsdp"), "context")
        assert batch_spec(mesh, (8, 16, 3)) == P(("data", "fsdp"), "context", None)
        assert batch_spec(mesh, (8, 17)) == P(("data", "fsdp"), None)  # T+1 tokens: rows only
        assert batch_spec(mesh, (8,)) == P(("data", "fsdp"))
        assert batch_spec(mesh) == P(("data", "fsdp"))
        batch = make_global_batch({"tokens": np.arange(8 * 16).reshape(8, 16)}, mesh, 8)
    tokens = batch["tokens"]
    assert tokens.sharding.spec == P(("data", "fsdp"), "context")
    assert tokens.addressable_shards[0].data.shape == (2, 8)
    np.testing.assert_array_equal(np.asarray(tokens), np.arange(8 * 16).reshape(8, 16))


def _loss_curve(config, tmp_path, steps: int = 6) -> tuple[np.ndarray, dict]:
    """Losses of the runner's train step over the task's first `steps` batches."""
    return T.loss_curve(config, tmp_path, steps)


def test_context_parallel_training_matches_one_device(tmp_path):
    """A Decoder trained with the sequence split over `context` (the runner makes its attention
    context-parallel, which needs the blocked 'xla' kernel, not 'reference') follows the
    one-device loss curve; its batch is split over context."""
    one, _ = _loss_curve(decoder_config(), tmp_path / "one")
    got, run = _loss_curve(decoder_config(**{"mesh.data": 2, "mesh.context": 4,
                                             "model.implementation": ""}), tmp_path / "cp")
    inputs = run["batch"]["inputs"]  # [B=8, T=16]
    assert inputs.sharding.spec == P("data", "context")
    assert inputs.addressable_shards[0].data.shape == (4, 4)
    np.testing.assert_allclose(got, one, rtol=2e-5)
    assert one[-1] < one[0]


def test_context_mesh_config_key(tmp_path):
    """`config.mesh.context` (`--config.mesh.context=N`) reaches the runner's mesh and composes
    with fsdp (the regression task: its `[B, F]` inputs split F over context)."""
    summary = train(T.tiny_config(**{"mesh.context": 2, "mesh.fsdp": 2, "train_steps": 4,
                                     "eval_every": 0, "checkpoint_every": 0}), str(tmp_path))
    assert summary["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 1}
