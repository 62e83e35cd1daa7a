r"""Bigram-Backcopy: attention sinks, value drains and residual peaks.

Guo, Pai, Bai, Jiao, Jordan, Mei (2024), "Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs".

Data. Tokens are ``<s>`` (id 0, BOS) and ``V`` characters (ids ``1..V``). A bigram transition
matrix ``P [V+1, V+1]`` over characters (nothing transitions into ``<s>``: column 0 is zero);
its ``<s>`` row is the unigram marginal ``u``. The triggers are the ``num_triggers`` (3)
most frequent tokens under ``u``. A sequence of ``seq_len + 1`` tokens is

    x_0 = <s>;   x_1 ~ u with the triggers removed (renormalized);
    for t >= 2:  x_t = x_{t-2}            if x_{t-1} is a trigger   (backcopy)
                 x_t ~ P(. | x_{t-1})     otherwise                  (bigram)

(``x_1`` is never a trigger, so two triggers never follow each other and ``<s>`` never
reappears.) ``P`` is either synthetic (``config.corpus = ""``: seeded by ``config.p_seed``,
Zipf-like marginals ``pi_k ~ (k+1)^-zipf_exponent``, rows ``P[a] ~ pi * Gamma(row_concentration)``
and ``u`` the chain's stationary distribution, characters ordered by ``u``) or the character
bigrams of a text file ``config.corpus`` (``u`` = character frequencies; then ``V`` is the
number of distinct characters and ``config.vocab_size`` is ignored). Example ``i`` of the
training stream is drawn from ``np.random.default_rng((seed, i))`` (a fresh batch every step);
the fixed eval set from ``(seed, i, 1)``.

Oracle. The next-token distribution given the prefix is known exactly: after ``<s>`` it is
``u`` without triggers, after a trigger it is the point mass on ``x_{t-1}``, otherwise
``P(. | x_t)``. The excess cross-entropy of a model ``q`` at a position is therefore exactly
``KL(oracle || q)``; ``backcopy_risk`` / ``bigram_risk`` average it over positions whose input
token is / is not a trigger.

Model: ``models.Decoder`` as in the paper: pre-LN (LayerNorm without bias), learned absolute
positions, one head, ReLU MLP of width ``4d``, no biases, untied output layer. The attention
normalizer is ``config.model.mechanism``: ``softmax``, ``relu`` (``p_ij = relu(s_ij) / i``) or
``sigmoid``. ``config.model.init = "pytorch"`` (default) re-initializes it with PyTorch's defaults
as the paper's code does (:func:`models.layers.pytorch_default_init`; it reproduces the
published initial ``||Val<s>||`` and ``||Res<s>||``); ``"models"`` keeps ``models.Decoder``'s init.

Metrics (eval, on the fixed eval batch; layer 0 unless suffixed ``/layer{i}``):
* ``attn_sink`` = ``Attn<s>``: attention weight on position 0, averaged over the heads and over
  the queries whose token is not a trigger (position 0 included);
* ``value_norm`` = ``||Val<s>||``: norm of the value state of ``<s>`` (layer 0's ``x W_V`` at
  position 0, after the pre-LN);
* ``residual_norm`` = ``||Res<s>||``: norm of the residual stream of ``<s>`` after layer 0;
* ``backcopy_risk``, ``bigram_risk``: the excess cross-entropies above (nats);
* ``loss``: cross-entropy on all positions;
* extras: ``value_norm_ratio`` / ``residual_norm_ratio`` (``<s>``'s norm over the mean of the
  other positions', layer 0: a drain is << 1, a peak >> 1) and ``sink_score`` (Gu et al.'s
  ``Sink_0^0.3`` in percent of the (layer, head) pairs, ``jattn.analysis.sink_score``) and
  ``sink_score_rownorm`` (the same on row-normalized weights, as Gu et al. evaluate sigmoid
  attention).

``summary.json`` gets ``trajectory`` (one entry per eval: ``step`` and the metrics above),
``final`` (the same metrics at the end, plus the runner's ``train_loss`` and ``eval_*``
keys), the task's ``triggers`` and the ``published`` reference numbers. The figure
``bigram_backcopy.png`` plots the trajectories (after a resume, ``trajectory`` and the figure
cover the resumed segment only; TensorBoard holds the whole run). TensorBoard: the metrics
under ``eval/`` and per-layer attention maps of the first eval sequence under
``images/attention``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.config import ConfigError
from experiments.tasks.base import Batch, Metrics, Task, apply_init, register
from experiments.tasks.bigram_backcopy_data import (  # the data names stay importable from here
    BOS,  # noqa: F401
    BigramBackcopy,
    corpus_bigram,
    excess_risk,
    stationary,  # noqa: F401
    synthetic_bigram,
)
from experiments.tasks.model_config import decoder_config
from jattn import analysis
from models.intermediates import capture_intermediates

NORMALIZERS = ("softmax", "relu", "sigmoid")
METRICS = ("attn_sink", "value_norm", "residual_norm", "backcopy_risk", "bigram_risk")

#: Published numbers (Guo et al. 2024, as summarized for this project), for comparison.
PUBLISHED = {
    "adam_1layer": {
        "attn_sink": {0: 0.022, 200: 0.223, 300: 0.560, 1000: 0.779, 10000: 0.811},
        "value_norm": {0: 9.0, 200: 10.6, 1000: 4.9, 10000: 1.3},
        "backcopy_risk": {0: 4.3, 1000: 0.0074},
        "note": "the sink forms between steps ~150 and ~300; ||V<s>|| rises, then drains",
    },
    "residual_norm_3layer": {
        "adam": {0: 24.0, 10000: 141.0},
        "sgd": {0: 24.0, 10000: 20.0},
        "relu": {0: 23.0, 10000: 24.5},
        "note": "||Res<s>|| after layer 0 grows ~linearly with Adam only",
    },
    "relu_1layer": "Attn<s> ~ 0 throughout (no sink), ||V<s>|| grows (no drain), risks converge",
}


def _weights_mechanism(name: str) -> bool:
    """A registered softmax-family mechanism (its layers report ``attention_weights``)."""
    from models.registry import mechanism_kind

    try:
        return mechanism_kind(name) == "softmax"
    except ValueError:
        return False


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


# ================================================================================================
# The task.
# ================================================================================================
@register("bigram_backcopy")
class BigramBackcopyTask(Task):
    """Bigram-Backcopy (Guo et al. 2024) on a single-head pre-LN ``models.Decoder``."""

    headline_metrics = ("attn_sink",)  # the sink forming is the run's story

    def __init__(self, config) -> None:
        super().__init__(config)
        self._dist: BigramBackcopy | None = None
        self._chars: list[str] | None = None

    # --- data ------------------------------------------------------------------------
    def validate(self) -> None:
        c = self.config
        path = c.get("corpus", "")
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"config.corpus={path!r}: no such file")
        for key, lo in (
            ("vocab_size", 5),
            ("seq_len", 2),
            ("model.num_layers", 1),
            ("model.d_model", 1),
            ("num_triggers", 1),
        ):
            node, name = (c.model, key[6:]) if key.startswith("model.") else (c, key)
            v = node.get(name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ConfigError(f"config.{key}={v!r}: must be an int >= {lo}")
        if c.num_triggers * 2 >= c.vocab_size and not path:
            raise ConfigError(
                f"config.num_triggers={c.num_triggers!r}: too many for "
                f"config.vocab_size={c.vocab_size}"
            )
        if c.model.mechanism not in NORMALIZERS and not _weights_mechanism(c.model.mechanism):
            raise ConfigError(
                f"config.model.mechanism={c.model.mechanism!r}: must be one of {NORMALIZERS} "
                "or another softmax-family mechanism (the sink metrics read attention weights)"
            )
        if c.optimizer == "sgd" and c.learning_rate < 1e-3:
            print(
                f"[jattn] note: optimizer=sgd with learning_rate={c.learning_rate} (the paper's "
                "SGD ablation uses 0.03: configs/bigram_backcopy.py:sgd)"
            )

    def distribution(self) -> BigramBackcopy:
        if self._dist is None:
            c = self.config
            path = c.get("corpus", "")
            if path:
                with open(os.path.expanduser(path), encoding="utf-8") as f:
                    self._chars, p, u = corpus_bigram(f.read())
            else:
                p, u = synthetic_bigram(
                    c.vocab_size,
                    c.get("p_seed", 0),
                    c.get("zipf_exponent", 1.0),
                    c.get("row_concentration", 0.3),
                )
            self._dist = BigramBackcopy.from_bigram(p, u, int(c.num_triggers))
        return self._dist

    def _source(self, n: int, salt: tuple[int, ...]) -> grain.MapDataset:
        dist, seed, length = self.distribution(), int(self.config.seed), self.config.seq_len + 1

        def example(i: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng((seed, int(i), *salt))
            return {"tokens": dist.sample(rng, length)}

        return grain.MapDataset.range(n).map(example)

    def train_source(self) -> grain.MapDataset:
        return self._source(self.config.train_steps * self.config.batch_size, ())

    def eval_source(self) -> grain.MapDataset:
        return self._source(1 << 20, (1,))

    def tokens_per_example(self) -> int:
        return int(self.config.seq_len)

    # --- model -----------------------------------------------------------------------
    def model_config(self):
        c = self.config
        return decoder_config(c.model, vocab_size=self.distribution().num_tokens,
                              max_len=c.seq_len)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from models import Decoder

        return apply_init(Decoder(self.model_config(), rngs=rngs), rngs,
                          self.config.model.get("init", "pytorch"))

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce, {}

    # --- evaluation ------------------------------------------------------------------
    def eval_metrics(self, model: nnx.Module, batch: Batch) -> Metrics:
        dist = self.distribution()
        inputs = batch["tokens"][:, :-1]
        logits, inter = capture_intermediates(model, inputs)
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
        table = jnp.asarray(dist.oracle_table(), jnp.float32)
        kl, trig = excess_risk(logits, inputs, table, jnp.asarray(dist.is_trigger()))
        out = {
            "loss": ce.mean(),
            "backcopy_risk": _masked_mean(kl, trig),
            "bigram_risk": _masked_mean(kl, ~trig),
        }
        weights = []
        for i, layer in enumerate(inter["layers"]):
            sfx = "" if i == 0 else f"/layer{i}"
            if "attention_weights" in layer:  # [B, H, T, T]
                weights.append(layer["attention_weights"].astype(jnp.float32))
                to_bos = jnp.mean(weights[-1][:, :, :, 0], 1)
                out["attn_sink" + sfx] = _masked_mean(to_bos, ~trig)
            out["value_norm" + sfx] = jnp.mean(layer["value_norms"][:, 0])
            out["residual_norm" + sfx] = jnp.mean(layer["residual_norms"][:, 0])
        layer0 = inter["layers"][0]
        # ||Val<s>|| / mean ||Val_j|| (drain: << 1) and ||Res<s>|| / mean ||Res_j|| (peak: >> 1)
        out["value_norm_ratio"] = analysis.token_norm_ratio(
            jnp.moveaxis(layer0["value_norms"], 2, 1)
        )
        out["residual_norm_ratio"] = analysis.token_norm_ratio(layer0["residual_norms"])
        if weights:  # Gu et al.'s Sink_0^0.3 (% of (layer, head) pairs), all layers
            out["sink_score"] = analysis.sink_score(jnp.stack(weights), k=0, eps=0.3)
            # the same on row-normalized weights: what Gu et al. report for unnormalized
            # (sigmoid) attention; equal to sink_score when rows already sum to one
            out["sink_score_rownorm"] = analysis.sink_score(jnp.stack(weights), k=0, eps=0.3,
                                                            normalize=True)
        return out

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        n = min(int(self.config.get("image_tokens", 64)), self.config.seq_len)
        _, inter = capture_intermediates(model, batch["tokens"][:1, :n])
        out = {}
        for i, layer in enumerate(inter["layers"]):
            if "attention_weights" in layer:
                out[f"attention/layer{i}"] = jnp.mean(layer["attention_weights"][0], axis=0)
        return out

    # --- end of run ------------------------------------------------------------------
    def trajectory(self, history: Mapping[str, list[tuple[int, float]]]) -> list[dict[str, float]]:
        """One dict per eval step: ``step`` and every ``eval/`` metric except the loss."""
        by_step: dict[int, dict[str, float]] = {}
        for tag, points in history.items():
            if not tag.startswith("eval/") or tag == "eval/loss":
                continue
            for step, value in points:
                by_step.setdefault(int(step), {})[tag[len("eval/") :]] = float(value)
        return [{"step": s, **by_step[s]} for s in sorted(by_step)]

    def summary_fields(self, model, history) -> dict[str, Any]:
        traj = self.trajectory(history)
        final: dict[str, float] = {}
        for tag, points in history.items():
            if points and tag.split("/")[0] in ("train", "eval") and "/" in tag:
                prefix, name = tag.split("/", 1)
                final[f"{prefix}_{name}"] = float(points[-1][1])
        final["train_loss"] = final.pop("train_loss", float("nan"))
        if traj:
            for k, v in traj[-1].items():
                if k != "step":
                    final.pop(f"eval_{k}", None)
                    final[k] = v
        dist = self.distribution()
        fields: dict[str, Any] = {
            "trajectory": traj,
            "final": final,
            "triggers": list(dist.triggers),
            "num_tokens": dist.num_tokens,
            "published": PUBLISHED,
        }
        if self._chars is not None:
            fields["trigger_chars"] = [self._chars[t - 1] for t in dist.triggers]
        self._trajectory = traj
        return fields

    def write_figures(self, workdir: str, model, history) -> list[str]:
        traj = getattr(self, "_trajectory", None) or self.trajectory(history)
        if not traj:
            return []
        from experiments.plots import attention_map, overlay_published, save, subplots

        c, m = self.config, self.config.model
        steps = [p["step"] for p in traj]
        fig, axes = subplots(1, 4, figsize=(16, 3.6), dpi=100)
        panels = (
            ("attn_sink", "Attn<s> (layer 0)", False),
            ("value_norm", "||Val<s>|| (layer 0)", False),
            ("residual_norm", "||Res<s>|| after layer 0", False),
        )
        ylabels = ("attention on <s>", "||Val<s>||", "||Res<s>||", "excess risk (nats)")
        # The paper's numbers (summary.json "published") for the runs they describe.
        published: dict[int, tuple[dict, str]] = {}
        if int(m.num_layers) == 1 and m.mechanism == "softmax":
            ref = PUBLISHED["adam_1layer"]
            label = "published (1 layer, d=256, Adam)"
            published = {0: (ref["attn_sink"], label), 1: (ref["value_norm"], label),
                         3: (ref["backcopy_risk"], label + ": backcopy")}
        elif int(m.num_layers) == 3:
            variant = "relu" if m.mechanism == "relu" else c.optimizer
            if variant in PUBLISHED["residual_norm_3layer"]:
                published = {2: (PUBLISHED["residual_norm_3layer"][variant],
                                 f"published (3 layers, {variant})")}
        for ax, (key, title, logy) in zip(axes, panels, strict=False):
            ax.plot(steps, [p.get(key, np.nan) for p in traj], marker=".", label="layer 0")
            for i in range(1, int(m.num_layers)):  # deeper layers, dashed
                other = [p.get(f"{key}/layer{i}", np.nan) for p in traj]
                if key != "residual_norm" and not np.all(np.isnan(other)):
                    ax.plot(steps, other, ls="--", label=f"layer {i}")
            ax.set_title(title if int(m.num_layers) == 1 else title.replace(" (layer 0)", ""))
            if logy:
                ax.set_yscale("log")
        axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")
        for key in ("backcopy_risk", "bigram_risk"):
            axes[3].plot(steps, [max(p.get(key, np.nan), 1e-6) for p in traj], label=key)
        axes[3].set_yscale("log")
        axes[3].set_title("excess risk (nats)")
        for i, (points, label) in published.items():
            overlay_published(axes[i], points, label=label, xmax=steps[-1])
        for ax, ylabel in zip(axes, ylabels, strict=True):
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(ax.get_legend_handles_labels()[0]) > 1:
                ax.legend(fontsize=8)
        fig.suptitle(
            f"Bigram-Backcopy: {m.num_layers} layer(s), d={m.d_model}, {c.optimizer} "
            f"lr={c.learning_rate:g}, {m.mechanism} attention, batch {c.batch_size}, "
            f"seq {c.seq_len}"
        )
        fig.tight_layout()
        paths = [save(fig, os.path.join(workdir, "bigram_backcopy.png"))]
        # The trained model's attention on one sampled sequence (heads averaged), per layer.
        dist = self.distribution()
        n = min(int(c.get("image_tokens", 64)), int(c.seq_len))
        tokens = dist.sample(np.random.default_rng(1), n)
        _, inter = capture_intermediates(model, jnp.asarray(tokens)[None])
        maps = [np.asarray(layer["attention_weights"][0]).mean(0)
                for layer in inter["layers"] if "attention_weights" in layer]
        if maps:
            paths.append(attention_map(
                np.stack(maps), os.path.join(workdir, "attention_map.png"),
                suptitle=f"attention at step {steps[-1]} (heads averaged; key 0 = <s>)",
                marked_queries=np.flatnonzero(np.isin(tokens, dist.triggers)).tolist(),
                marked_label="trigger"))
        return paths
