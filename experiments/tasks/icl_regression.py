r"""In-context linear regression with one multi-head attention layer (He, Pan, Chen, Yang 2025).

"In-Context Linear Regression Demystified: Training Dynamics and Mechanistic
Interpretability of Multi-Head Softmax Attention". The exact setup:

- Data (``d = config.dim = 5``, ``L = config.num_pairs = 40``, ``sigma^2 =
  config.noise_var = 0.1``): ``x_i, x_q ~ N(0, I_d)``, ``beta ~ N(0, I_d / d)``,
  ``y = beta^T x + eps``, ``eps ~ N(0, sigma^2)`` on every ``y`` including the query target.
  Tokens ``z_i = (x_i, y_i) in R^{d+1}``; the query token is ``z_q = (x_q, 0)``.
- Model (:class:`ICLAttention`): ONE attention layer, ``H`` heads of dimension ``D = d+1``,
  no biases, no positional encoding, no MLP, no residual. Only the query position is
  output and it attends to the ``L`` context tokens only (not to itself)::

      yhat = sum_h [O_h V_h Z softmax(Z^T K_h^T Q_h z_q / sqrt(D))]_last

  with ``Z = [z_1 .. z_L]`` and ``Q_h, K_h, V_h, O_h`` in ``R^{D x D}``. The softmax part
  is ``jattn.attention`` with the query as its own 1-token sequence (``Tq = 1``,
  ``Tk = L``), so "keys are the L context tokens only" holds by construction and no mask
  is needed. We build the layer directly from ``nnx.Param``\s rather than
  ``models.Decoder``: the decoder adds embeddings, residuals, norms, an MLP and causal
  self-attention over all positions, none of which belong to this model.
  ``config.model.mechanism = "linear"`` drops the softmax (no normalization):
  ``yhat = sum_h [O_h V_h Z (Z^T K_h^T Q_h z_q) / sqrt(D)]_last``, i.e.
  ``jattn.linear.linear_attention`` with the identity feature map, ``normalize=False`` and
  the query's keys restricted to the context; its sum over ``L`` terms grows with ``L``,
  which gives the U-shaped length generalization.
- Training: MSE against the noisy ``y_q``, Adam (lr 1e-3), 256 prompts per step (config
  defaults).
- Only the last row of ``O_h`` reaches ``yhat``: the other rows get zero gradient and
  keep their initial values. The head's OV circuit is therefore its read-out row
  ``OV_h[-1, :] = O_h[-1, :] V_h`` (``D`` numbers); the pattern metrics use that row.

Data: prompt ``i`` is drawn on device from ``fold_in(fold_in(key(seed), stream), i)``
(:func:`make_examples`), so it depends only on ``(seed, i)``. The host side is an
``experiments.data.BatchedSource`` of indices only (one vectorized call per batch of 256):
the host builds no arrays per example, which matters for this tiny model on a small
shared CPU.

Evaluation: a fixed set of ``config.eval_examples`` prompts per evaluation length
(``config.eval_lengths``), shared by the model and the baselines (common random numbers):

- ``ridge``: the Bayes-optimal posterior mean, ``lambda = sigma^2 d``.
- ``gd``: one step of GD from 0, ``yhat = eta/L sum_i y_i x_i^T x_q``, with the step
  optimal at the training length: ``eta* = L/(L + 1 + d(1+sigma^2))``. Closed-form risk
  (``E||beta||^2 = 1``) at length ``n``:
  ``R = 1 + sigma^2 - 2 eta + eta^2 (1 + (1 + d(1+sigma^2))/n)``; at ``n = L = 40`` the
  minimum ``1 + sigma^2 - L/(L + 1 + d(1+sigma^2)) = 0.2398``.
- ``debiased_gd``: ``yhat = eta/L sum_i y_i (x_i - xbar)^T x_q`` (the first-order expansion
  of zero-sum softmax heads), step optimal at ``L``: ``eta* = L/(L + d(1+sigma^2))``;
  ``R = 1 + sigma^2 - 2 eta (n-1)/n + eta^2 (n-1)(n + d(1+sigma^2))/n^2``.
- ``kernel``: the single-head kernel estimator ``yhat = mu sum_i y_i softmax_i(omega
  x_i^T x_q)`` with ``omega = 1/sqrt(d)``, ``mu = sqrt(d)/(1 + (1+sigma^2) e d / L)`` (fixed
  at the training length, as a trained head would be).
- ``gd_per_length``: the closed form with the step re-optimized at each length (a lower
  bound for any fixed-step GD; not a Monte-Carlo figure).

Summary (``summary.json``): ``risk`` {length: MSE}, ``baselines`` {name: {length: MSE}},
``patterns`` (He et al. metrics from :mod:`jattn.analysis`: ``kq_diagonal_ratio``,
``kq_homogeneity``, ``ov_last_entry_ratio`` (means over heads, ``*_per_head``, and
``*_weighted``: weighted by each head's share ``|omega_h mu_h| / sum |omega mu|`` of the
effective GD step, so near-silent heads of large H do not dominate),
``ov_zero_sum_ratio``, per-head ``omega`` (logit scale ``1/sqrt(D)`` folded in, so
``softmax(omega x_i^T x_q)``) and ``mu``). Figures: ``risk_vs_length.png``,
``kq_ov_heads.png``, ``loss.png``. TensorBoard: ``eval/risk_L{n}`` and the pattern metrics
at every eval.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn
from experiments.config import ConfigError
from experiments.data import BatchedSource
from experiments.tasks.base import Batch, Metrics, Task, register
from experiments.tasks.icl_regression_data import (  # the data names stay importable from here
    baseline_predictions,
    debiased_gd_risk,  # noqa: F401
    debiased_gd_step,  # noqa: F401
    gd_risk,
    gd_step,
    make_examples,
    stream_key,
)
from jattn import analysis

TRAIN_STREAM, EVAL_STREAM = 0, 1
ATTENTIONS = ("softmax", "linear")

# He, Pan, Chen, Yang (2025): published test risk at these evaluation lengths (trained at
# L = 40, d = 5, sigma^2 = 0.1), and the derived linear-attention U shape.
PUBLISHED_LENGTHS = (10, 20, 40, 60, 80, 100)
PUBLISHED_RISK = {
    "softmax_H1": (0.840, 0.574, 0.405, 0.342, 0.303, 0.278),
    "softmax_H2": (0.573, 0.370, 0.241, 0.202, 0.178, 0.164),
    "softmax_H4": (0.577, 0.364, 0.245, 0.202, 0.182, 0.167),
    "softmax_H8": (0.592, 0.368, 0.244, 0.203, 0.181, 0.164),
    "gd": (0.643, 0.371, 0.241, 0.198, 0.174, 0.162),
    "debiased_gd": (0.614, 0.369, 0.243, 0.199, 0.176, 0.163),
    "ridge": (0.194, 0.135, 0.115, 0.109, 0.106, 0.104),
    "linear_derived": (0.746, 0.485, 0.240, 0.364, 0.859, 1.72),
}


# ----------------------------------------------------------------------------- model
class ICLAttention(nnx.Module):
    """One multi-head attention layer read at the query token (He et al. 2025).

    Parameters ``wq, wk, wv, wo [H, D, D]`` (``D = d + 1``; ``q_h = Q_h z`` with
    ``Q_h = wq[h]``), entries ``N(0, init_scale^2)``. A few hundred numbers: replicated,
    no logical axes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attention: str = "softmax",
        init_scale: float = 0.5,
        implementation: str | None = "reference",
        rngs: nnx.Rngs,
    ) -> None:
        D = dim + 1
        self.dim, self.num_heads, self.attention = dim, num_heads, attention
        self.implementation = implementation or None
        init = nnx.initializers.normal(init_scale)
        self.wq = nnx.Param(init(rngs.params(), (num_heads, D, D)))
        self.wk = nnx.Param(init(rngs.params(), (num_heads, D, D)))
        self.wv = nnx.Param(init(rngs.params(), (num_heads, D, D)))
        self.wo = nnx.Param(init(rngs.params(), (num_heads, D, D)))

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.dim + 1)

    def _qkv(self, x, y, xq):
        z = jnp.concatenate([x, y[..., None]], axis=-1)  # [B, L, D]
        zq = jnp.concatenate([xq, jnp.zeros_like(xq[..., :1])], axis=-1)  # [B, D]
        q = jnp.einsum("be,hfe->bhf", zq, self.wq[...])[:, None]  # [B, 1, H, D]
        k = jnp.einsum("ble,hfe->blhf", z, self.wk[...])
        v = jnp.einsum("ble,hfe->blhf", z, self.wv[...])
        return q, k, v

    def __call__(self, x: jax.Array, y: jax.Array, xq: jax.Array) -> jax.Array:
        """``x [B, L, d], y [B, L], xq [B, d] -> yhat [B]``."""
        q, k, v = self._qkv(x, y, xq)
        if self.attention == "softmax":
            o = jattn.attention(q, k, v, scale=self.scale, implementation=self.implementation)
        else:  # unnormalized linear attention: o = scale * q sum_j k_j^T v_j
            o = self.scale * jnp.einsum("bqhf,blhf,blhe->bqhe", q, k, v)
        return jnp.einsum("bhe,he->b", o[:, 0], self.wo[...][:, -1, :])

    def attention_weights(self, x, y, xq) -> jax.Array:
        """Softmax weights of the query over the context, ``[B, H, 1, L]``."""
        q, k, v = self._qkv(x, y, xq)
        return jattn.attention_weights(q, k, v, scale=self.scale)

    def kq(self) -> jax.Array:
        """``KQ_h = K_h^T Q_h [H, D, D]`` (rows: key coordinates, columns: query)."""
        return jnp.einsum("hfk,hfq->hkq", self.wk[...], self.wq[...])

    def ov(self) -> jax.Array:
        """``OV_h = O_h V_h [H, D, D]`` (rows: output coordinates, columns: input)."""
        return jnp.einsum("hof,hfi->hoi", self.wo[...], self.wv[...])


def patterns(model: ICLAttention) -> dict[str, jax.Array]:
    """He et al. metrics: KQ x-block ``[H, d, d]``, OV read-out row ``[H, 1, D]``."""
    d = model.dim
    return analysis.icl_patterns(model.kq()[:, :d, :d], model.ov()[:, -1:, :], model.scale)


# ----------------------------------------------------------------------------- task
@register("icl_regression")
class ICLRegression(Task):
    """He et al. (2025) in-context linear regression; see the module docstring."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self._eval_sets: dict[int, dict[str, jax.Array]] | None = None
        self._baselines: dict[str, dict[str, float]] | None = None
        self._risk_fn = None

    def validate(self) -> None:
        c, m = self.config, self.config.model
        for key in ("model.num_heads", "dim", "num_pairs", "eval_examples"):
            v = m.num_heads if key == "model.num_heads" else c[key]
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"config.{key}={v!r}: must be an int > 0")
        if m.mechanism not in ATTENTIONS:
            raise ConfigError(
                f"config.model.mechanism={m.mechanism!r}: must be one of {ATTENTIONS}"
            )
        if not (isinstance(c.noise_var, int | float) and c.noise_var >= 0):
            raise ConfigError(f"config.noise_var={c.noise_var!r}: must be a number >= 0")
        lengths = tuple(c.eval_lengths)
        if not lengths or not all(isinstance(n, int) and n > 1 for n in lengths):
            raise ConfigError(f"config.eval_lengths={lengths!r}: must be ints > 1")

    # --- data ------------------------------------------------------------------------
    @staticmethod
    def _index_source(n: int) -> BatchedSource:
        return BatchedSource(lambda idx: {"index": np.asarray(idx, np.uint32)}, n)

    def train_source(self) -> BatchedSource:
        return self._index_source(self.config.train_steps * self.config.batch_size)

    def eval_source(self) -> BatchedSource:
        return self._index_source(1 << 16)

    def examples(self, index: jax.Array, length: int, stream: int) -> dict[str, jax.Array]:
        """Prompts ``index [N]`` of ``stream`` at context length ``length``."""
        c = self.config
        return make_examples(stream_key(c.seed, stream), index, length, c.dim, c.noise_var)

    # --- model -----------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        m = self.config.model
        return ICLAttention(
            self.config.dim,
            m.num_heads,
            attention=m.mechanism,
            init_scale=m.init_scale,
            implementation=m.implementation,
            rngs=rngs,
        )

    def _mse(self, model, batch: Batch, stream: int) -> jax.Array:
        ex = self.examples(batch["index"], self.config.num_pairs, stream)
        pred = model(ex["x"], ex["y"], ex["xq"])
        return jnp.mean((pred - ex["yq"]) ** 2)

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        return self._mse(model, batch, TRAIN_STREAM), {}

    def eval_metrics(self, model: nnx.Module, batch: Batch) -> Metrics:
        return {"loss": self._mse(model, batch, EVAL_STREAM)}

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        del batch
        d = self.config.dim
        out = {}
        for h in range(min(self.config.model.num_heads, 8)):
            out[f"kq/head{h}"] = model.kq()[h, :d, :d]
            out[f"ov/head{h}"] = model.ov()[h]
        return out

    # --- evaluation at every length ---------------------------------------------------
    def eval_sets(self) -> dict[int, dict[str, jax.Array]]:
        """The fixed evaluation prompts, one set per length (indices 0..eval_examples-1 of a
        length-specific stream, disjoint from training)."""
        if self._eval_sets is None:
            c = self.config
            idx = jnp.arange(c.eval_examples)
            self._eval_sets = {
                int(n): jax.jit(self.examples, static_argnums=(1, 2))(idx, int(n), 1000 + int(n))
                for n in c.eval_lengths
            }
        return self._eval_sets

    def risk(self, model: ICLAttention) -> dict[str, float]:
        """Test MSE against the noisy ``y_q`` at every evaluation length."""
        if self._risk_fn is None:
            graphdef = nnx.graphdef(model)

            @jax.jit
            def risk_fn(state, ex):
                m = nnx.merge(graphdef, state)
                chunks = []
                for s in range(0, ex["x"].shape[0], 8192):
                    sl = {k: v[s : s + 8192] for k, v in ex.items()}
                    chunks.append(jnp.sum((m(sl["x"], sl["y"], sl["xq"]) - sl["yq"]) ** 2))
                return sum(chunks) / ex["x"].shape[0]

            self._risk_fn = risk_fn
        state = nnx.state(model)
        return {str(n): float(self._risk_fn(state, ex)) for n, ex in self.eval_sets().items()}

    def baselines(self) -> dict[str, dict[str, float]]:
        """Baseline risks on the same evaluation prompts (Monte Carlo), plus the closed-form
        per-length-optimal GD."""
        if self._baselines is None:
            c = self.config
            fn = jax.jit(
                lambda ex: {
                    k: jnp.mean((p - ex["yq"]) ** 2)
                    for k, p in baseline_predictions(
                        ex, train_length=c.num_pairs, dim=c.dim, noise_var=c.noise_var
                    ).items()
                }
            )
            out: dict[str, dict[str, float]] = {}
            for n, ex in self.eval_sets().items():
                for name, v in fn(ex).items():
                    out.setdefault(name, {})[str(n)] = float(v)
            out["gd_per_length"] = {
                str(n): gd_risk(n, gd_step(n, c.dim, c.noise_var), c.dim, c.noise_var)
                for n in c.eval_lengths
            }
            self._baselines = out
        return self._baselines

    def periodic_metrics(self, model: nnx.Module, step: int) -> dict[str, float]:
        del step
        out = {f"risk_L{n}": v for n, v in self.risk(model).items()}
        pat = patterns(model)
        for k in ("kq_diagonal_ratio", "kq_homogeneity", "ov_last_entry_ratio"):
            out[k] = float(jnp.mean(pat[k]))
        out["ov_zero_sum_ratio"] = float(pat["ov_zero_sum_ratio"])
        return out

    # --- end of run ------------------------------------------------------------------
    def summary_fields(self, model, history) -> dict:
        del history
        pat = {k: np.asarray(v) for k, v in patterns(model).items()}
        summary_patterns = {
            "omega": pat["omega"].tolist(),
            "mu": pat["mu"].tolist(),
            "ov_zero_sum_ratio": float(pat["ov_zero_sum_ratio"]),
        }
        share = np.abs(pat["omega"] * pat["mu"])  # each head's share of the GD step
        share = share / max(float(share.sum()), 1e-30)
        for k in ("kq_diagonal_ratio", "kq_homogeneity", "ov_last_entry_ratio"):
            summary_patterns[k] = float(np.mean(pat[k]))
            summary_patterns[f"{k}_per_head"] = pat[k].tolist()
            summary_patterns[f"{k}_weighted"] = float(np.sum(share * pat[k]))
        summary_patterns["gd_step"] = float(np.sum(pat["omega"] * pat["mu"]))
        return {
            "risk": self.risk(model),
            "baselines": self.baselines(),
            "patterns": summary_patterns,
        }

    def write_figures(self, workdir: str, model, history) -> list[str]:
        from experiments.plots import plot_curves, subplots

        c = self.config
        paths = []
        risk, base = self.risk(model), self.baselines()
        lengths = [int(n) for n in risk]
        fig, ax = subplots(figsize=(6, 4), dpi=100)
        ax.plot(
            lengths,
            list(risk.values()),
            "o-",
            lw=2,
            label=f"trained ({c.model.mechanism}, H={c.model.num_heads})",
        )
        for name, vals in base.items():
            ax.plot(lengths, [vals[str(n)] for n in lengths], "--", label=name)
        ax.axvline(c.num_pairs, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("evaluation length L")
        ax.set_ylabel("test risk (MSE vs noisy y_q)")
        ax.set_ylim(0, min(2.0, 1.2 * max(max(risk.values()), 1 + c.noise_var)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"in-context regression, trained at L={c.num_pairs}")
        fig.tight_layout()
        paths.append(os.path.join(workdir, "risk_vs_length.png"))
        fig.savefig(paths[-1])

        kq, ov = np.asarray(model.kq()), np.asarray(model.ov())
        pat = {k: np.asarray(v) for k, v in patterns(model).items()}
        h = c.model.num_heads
        fig, axes = subplots(2, h, figsize=(max(2.2 * h + 1, 5.0), 4.8), dpi=100, squeeze=False)
        for i in range(h):
            for row, (mat, name) in enumerate(((kq[i], "KQ"), (ov[i, -1:, :], "OV[-1,:]"))):
                a = axes[row, i]
                lim = float(np.abs(mat).max()) or 1.0
                im = a.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
                a.set_xticks([])
                a.set_yticks([])
                val = pat["omega"][i] if row == 0 else pat["mu"][i]
                sym = "omega" if row == 0 else "mu"
                a.set_title(f"h{i} {name}\n{sym}={val:+.3f}", fontsize=8)
                fig.colorbar(im, ax=a, fraction=0.046)
        fig.suptitle(
            "KQ_h = K_h^T Q_h (rows: key coord., cols: query coord.; the last column meets\n"
            "the query's y = 0 and never trains) and OV_h's read-out row O_h[-1] V_h",
            fontsize=8,
        )
        fig.tight_layout()
        paths.append(os.path.join(workdir, "kq_ov_heads.png"))
        fig.savefig(paths[-1])

        paths.append(
            plot_curves(
                history,
                ("train/loss", "eval/loss"),
                os.path.join(workdir, "loss.png"),
                ylabel="MSE",
            )
        )
        return paths
