"""Cells of colab/bigram_backcopy_sinks.ipynb: Bigram-Backcopy: attention sinks.

Read by colab/_build_notebooks.py.
``CELLS``: ``(kind, source)`` pairs in order; kind ``"md"`` or ``"code"``, or ``"install"`` /
``"setup"`` for the shared install and setup cells the builder fills in.
"""

CELLS = [
    (
        "md",
        """\
# Bigram-Backcopy: attention sinks, value drains, residual peaks

Guo, Pai, Bai, Jiao, Jordan, Mei (2024), "Active-Dormant Attention Heads". Tokens follow a
bigram chain, except that after one of three trigger tokens the next token copies the token
before the trigger. A one-layer transformer learns to copy at triggers and to do *nothing*
elsewhere: its head dumps attention on `<s>` (an attention sink), whose value state shrinks
(a value drain). This notebook trains the CPU preset `configs/bigram_backcopy.py:cpu`
(d = 64, 600 steps, ~2-4 minutes on 2 cores) through the runner's Python API and plots the
trajectory of the sink metrics and an attention map of the trained model.
`JATTN_NOTEBOOK_SMOKE=1` shrinks it to a few steps at d = 16.""",
    ),
    ("install", ""),
    (
        "code",
        """\
import json, os, pathlib, time
import numpy as np
import matplotlib.pyplot as plt
import jax.numpy as jnp

from jattn_lab.configs.bigram_backcopy import get_config
from jattn_lab.experiments.trainer import Trainer

SMOKE = os.environ.get("JATTN_NOTEBOOK_SMOKE") == "1"
WORKDIR = pathlib.Path(os.environ.get("JATTN_NOTEBOOK_WORKDIR") or "runs").resolve()
config = get_config("cpu")
config.progress_bar = False
config.mesh.data = 1
if SMOKE:
    config.update_from_flattened_dict({
        "model.d_model": 16, "seq_len": 32, "batch_size": 8, "eval_batch_size": 8,
        "train_steps": 6, "log_every": 2, "eval_every": 2, "checkpoint_every": 6,
        "histogram_every": 6, "image_tokens": 16})
run_dir = WORKDIR / f"bigram_backcopy_{config.train_steps}"
print(f"d={config.model.d_model} layers={config.model.num_layers} steps={config.train_steps} "
      f"lr={config.learning_rate} -> {run_dir}")""",
    ),
    (
        "code",
        """\
t0 = time.time()
trainer = Trainer(config, str(run_dir))
summary = trainer.run()
model = trainer.model(trainer.final_state)
print(f"trained in {time.time() - t0:.0f}s; triggers = {summary['triggers']}")
print({k: round(v, 4) for k, v in summary["final"].items()})""",
    ),
    (
        "md",
        """\
## The trajectory

`Attn<s>`: attention on position 0 from non-trigger queries; `||Val<s>||`: norm of `<s>`'s
value state; `||Res<s>||`: norm of `<s>`'s residual state after layer 0; excess risks at
trigger (backcopy) and non-trigger (bigram) positions against the exact oracle. Published
(1 layer, d = 256, Adam): `Attn<s>` .02 -> .56 (step 300) -> .81; `||Val<s>||` rises then
drains; the backcopy risk falls from 4.3 to ~.007 by step 1k.""",
    ),
    (
        "code",
        """\
traj = summary["trajectory"]
steps = [p["step"] for p in traj]
panels = [("attn_sink", "Attn<s>"), ("value_norm", "||Val<s>||"),
          ("residual_norm", "||Res<s>|| after layer 0")]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
for ax, (key, title) in zip(axes, panels):
    ax.plot(steps, [p.get(key, np.nan) for p in traj], marker=".")
    ax.set_title(title)
for key in ("backcopy_risk", "bigram_risk"):
    axes[3].plot(steps, [max(p.get(key, np.nan), 1e-6) for p in traj], marker=".", label=key)
axes[3].set_yscale("log"); axes[3].set_title("excess risk (nats)"); axes[3].legend()
for ax in axes:
    ax.set_xlabel("step"); ax.grid(alpha=0.3)
plt.tight_layout(); plt.show()
print(f"{'step':>6} {'attn_sink':>10} {'value_norm':>11} {'backcopy':>9} {'bigram':>8}")
shown = traj[:: max(1, len(traj) // 8)]
for p in shown + ([traj[-1]] if traj[-1] is not shown[-1] else []):
    print(f"{p['step']:>6} {p['attn_sink']:10.3f} {p['value_norm']:11.3f} "
          f"{p['backcopy_risk']:9.4f} {p['bigram_risk']:8.4f}")""",
    ),
    (
        "md",
        """\
## An attention map of the trained model

Rows are queries, columns keys. After training, queries whose token is a trigger attend to
the token before it (backcopy); the others put most of their weight on `<s>` (column 0).""",
    ),
    (
        "code",
        """\
dist = trainer.task.distribution()
n = min(32, config.seq_len)
tokens = dist.sample(np.random.default_rng(1), n)
_, inter = model(jnp.asarray(tokens)[None], return_intermediates=True)
w = np.asarray(inter["layers"][0]["attention_weights"][0].mean(0))
trig = np.isin(tokens, dist.triggers)
fig, ax = plt.subplots(figsize=(5.5, 5))
ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
ax.set_yticks(np.flatnonzero(trig), ["T"] * int(trig.sum()), fontsize=6, color="red")
ax.set_xlabel("key position (0 = <s>)"); ax.set_ylabel("query position (T = trigger)")
ax.set_title(f"layer 0 attention, step {summary['step']}")
plt.show()
print(f"mean attention on <s> from non-trigger queries: {w[~trig, 0].mean():.3f}")""",
    ),
    (
        "md",
        """\
## Loading the run later

`experiments.load(workdir)` rebuilds the model from the run's `config.json` and restores its
newest checkpoint (read-only; `step=` picks another): no orbax code. It returns
`(model, config, step)`; the loaded model gives the trained model's logits.""",
    ),
    (
        "code",
        """\
from jattn_lab.experiments import load

loaded, loaded_config, loaded_step = load(run_dir)
x = jnp.asarray(tokens)[None]
diff = float(jnp.abs(loaded(x) - model(x)).max())
print(f"{loaded_config.task} at step {loaded_step}: max |loaded - trained logits| = {diff:.1e}")
assert loaded_step == summary["step"] and diff < 1e-5""",
    ),
]
