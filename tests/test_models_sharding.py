"""models.sharding: logical axis rules -> mesh specs; sharded init and forward on the 8-device CPU
mesh (tests/conftest.py forces 8 host devices) match one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn.testing import assert_close
from models import Decoder, DecoderConfig, create_sharded, sharding

RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
         ("vocab", "tensor")]
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_logical_to_spec(mesh):
    spec = functools.partial(sharding.logical_to_spec, rules=RULES, mesh=mesh)
    assert spec(("embed", "heads", "kv")) == P("fsdp", "tensor", None)
    assert spec(("heads", "kv", "embed")) == P("tensor", None, "fsdp")
    assert spec(("vocab", "embed"), (32, 16)) == P("tensor", "fsdp")
    # A mesh axis is used once per array: "embed" loses "fsdp" to the batch.
    assert spec(("batch", None, "embed"), (8, 4, 16)) == P(("data", "fsdp"), None, None)
    # Indivisible dims and unknown mesh axes stay replicated.
    assert spec(("heads", "kv"), (3, 8)) == P(None, None)
    assert spec(("batch",), (2,)) == P("data")
    assert sharding.logical_to_spec(("embed",), rules=[("embed", "model")], mesh=mesh) == P(None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules=RULES, mesh=None) == P(None, None)
    resolved = dict(sharding.resolve_rules(RULES, mesh))
    assert resolved["kv"] is None and resolved["embed"] == "fsdp"
    with pytest.raises(ValueError, match="rules\\[0\\]"):
        sharding.logical_to_spec(("embed",), rules=["embed"], mesh=mesh)


def test_sharded_model_matches_one_device(mesh):
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=2,
                        layer_pattern="LA", tie_embeddings=False)
    single = Decoder(cfg, rngs=nnx.Rngs(0))
    sharded = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh, RULES)

    # Parameters are born sharded by their logical axes, with the same values.
    q = sharded.layers[1].attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor") or q.sharding.spec == P("fsdp", "tensor", None)
    assert sharded.head.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert sharded.layers[0].mlp.down.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert q.addressable_shards[0].data.shape == (8, 1, 8)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The flax metadata agrees with the placement.
    specs = nnx.get_partition_spec(nnx.state(sharded, nnx.Param))
    assert tuple(specs["layers"][1]["attn"]["q_proj"]["kernel"].get_value()) == \
        tuple(q.sharding.spec) + (None,) * (3 - len(q.sharding.spec))

    tokens = jax.random.randint(jax.random.key(0), (4, 12), 0, cfg.vocab_size)
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        x = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
        got = jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert len(got.sharding.device_set) == 8
    g1, s1 = nnx.split(single)
    want = jit(lambda s, x: nnx.merge(g1, s)(x))(s1, tokens)
    assert_close(got, want, rtol=1e-5, name="sharded logits")


def test_jitted_init_under_mesh_is_sharded(mesh):
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=1)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        model = nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()
    emb = model.embed.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    ref = Decoder(cfg, rngs=nnx.Rngs(0)).embed.embedding[...]
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(ref))
    assert jnp.isfinite(emb).all()


def test_partition_specs_read_logical_names_not_resolved_mesh_axes(mesh):
    """A param made under a mesh carries both its logical names and flax's `out_sharding` (the
    resolved mesh axes); specs come from the logical names, so other rules re-resolve them.
    Task models written with `nnx.with_partitioning` are read from `out_sharding`."""
    cfg = DecoderConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=1)
    with jax.set_mesh(mesh), sharding.axis_rules(RULES):
        model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    q = model.layers[0].attn.q_proj.kernel
    assert q.get_metadata()["out_sharding"] == ("fsdp", "tensor", None)
    swapped = [("embed", "tensor"), ("heads", "fsdp")]
    specs = sharding.partition_specs(model, swapped, mesh)
    assert specs["layers"][0]["attn"]["q_proj"]["kernel"].get_value() == P("tensor", "fsdp", None)

    with nnx.use_eager_sharding(False):
        dense = nnx.Linear(16, 32, rngs=nnx.Rngs(0), kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "mlp")))
    assert sharding.logical_axes_of(dense.kernel) == ("embed", "mlp")
    assert sharding.partition_specs(dense, RULES, mesh)["kernel"].get_value() == P("fsdp", "tensor")
    assert sharding.partition_specs(dense, RULES, mesh)["bias"].get_value() == P()
