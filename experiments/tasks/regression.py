"""A tiny synthetic task to exercise the runner: regress a fixed random teacher MLP.

x ~ N(0, I_d); y = tanh(x W1) w2 + noise, with teacher weights drawn from
`config.seed + 1000`. The student is a 2-layer MLP whose weights carry logical axis
names (`embed`, `mlp`), so sharding over fsdp/tensor is exercised. Example `i` depends
only on `(seed, i)` (counter-based normals, generated a whole batch at a time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.config import ConfigError
from experiments.data import BatchedSource, counter_normal
from experiments.tasks.base import Batch, Metrics, Task, register


class MLP(nnx.Module):
    """`x -> gelu(x W1 + b1) W2 + b2` with W1 `("embed", "mlp")`, W2 `("mlp", "embed")`."""

    def __init__(self, dim: int, hidden: int, out: int, *, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            dim,
            hidden,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
        )
        self.down = nnx.Linear(
            hidden,
            out,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("mlp", None)),
        )
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.norm(jax.nn.gelu(self.up(x))))


@register("regression")
class Regression(Task):
    """Teacher-student MLP regression (mean squared error)."""

    headline_metrics = ("mae",)

    def validate(self) -> None:
        c = self.config
        for key in ("dim", "hidden", "teacher_hidden"):
            if not (isinstance(c.model[key], int) and c.model[key] > 0):
                raise ConfigError(f"config.model.{key}={c.model[key]!r}: must be an int > 0")

    def _teacher(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.config.model
        rng = np.random.default_rng(self.config.seed + 1000)
        w1 = rng.normal(size=(m.dim, m.teacher_hidden)) / np.sqrt(m.dim)
        w2 = rng.normal(size=(m.teacher_hidden, 1)) / np.sqrt(m.teacher_hidden)
        return w1.astype(np.float32), w2.astype(np.float32)

    def _source(self, offset: int, n: int) -> BatchedSource:
        w1, w2 = self._teacher()
        seed, dim, noise = self.config.seed, self.config.model.dim, self.config.data.noise

        def examples(indices: np.ndarray) -> dict[str, np.ndarray]:
            idx = np.asarray(indices, np.int64) + offset
            x = counter_normal(seed, 0, idx, (dim,))
            eps = counter_normal(seed, 1, idx, (1,))
            y = np.tanh(x @ w1) @ w2 + noise * eps
            return {"x": x, "y": y.astype(np.float32)}

        return BatchedSource(examples, n)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        m = self.config.model
        return MLP(m.dim, m.hidden, 1, rngs=rngs)

    def train_source(self) -> BatchedSource:
        return self._source(0, self.config.train_steps * self.config.batch_size)

    def eval_source(self) -> BatchedSource:
        return self._source(2**40, 1 << 16)  # a disjoint index range

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        pred = model(batch["x"])
        mse = jnp.mean((pred - batch["y"]) ** 2)
        return mse, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        del batch
        return {"weights/up_kernel": model.up.kernel[...]}
