"""Cells of colab/mqar_recall.ipynb: MQAR associative recall.

Read by colab/_build_notebooks.py.
``CELLS``: ``(kind, source)`` pairs in order; kind ``"md"`` or ``"code"``, or ``"install"`` /
``"setup"`` for the shared install and setup cells the builder fills in.
"""

CELLS = [
    (
        "md",
        """\
# Multi-query associative recall (MQAR)

Zoology (Arora et al. 2023). A sequence starts with key-value pairs `k_1 v_1 ... k_P v_P`
(keys from the first half of the vocabulary, values from the second); later, the keys come
back as queries at power-law-distributed gaps, and the model must output each key's value
as the next token. Softmax attention solves it at any width (its KV cache grows with T);
a recurrent layer must fit all pairs in a fixed-size state.

This notebook trains the CPU preset `configs/mqar.py:cpu` (vocab 256, T = 64, 4 pairs,
2 layers, d = 64) for a few hundred steps with softmax attention and with GLA, then plots
held-out accuracy against training steps and state size. `JATTN_NOTEBOOK_SMOKE=1` runs a
few steps at tiny size.""",
    ),
    ("install", ""),
    (
        "code",
        """\
import json, os, pathlib, time
import numpy as np
import matplotlib.pyplot as plt

from jattn_lab.configs.mqar import get_config
from jattn_lab.experiments.tasks.mqar import IGNORE, mqar_batch
from jattn_lab.experiments.trainer import train

SMOKE = os.environ.get("JATTN_NOTEBOOK_SMOKE") == "1"
WORKDIR = pathlib.Path(os.environ.get("JATTN_NOTEBOOK_WORKDIR") or "runs").resolve()""",
    ),
    (
        "md",
        """\
## The data

Example `i` is a pure function of `(seed, i)`. Labels are `-100` (ignored) except right at
the query keys, where the label is the value that key was paired with.""",
    ),
    (
        "code",
        """\
b = mqar_batch(np.arange(1), seed=0, vocab_size=256, seq_len=32, num_kv_pairs=4)
x, y = b["inputs"][0], b["labels"][0]
print("inputs:", x.tolist())
print("labels:", [int(v) if v != IGNORE else "." for v in y])
for t in np.flatnonzero(y != IGNORE):
    print(f"  query key {x[t]} at position {t} -> answer {y[t]} "
          f"(pair at position {int(np.flatnonzero(x[:8] == x[t])[0])})")""",
    ),
    (
        "md",
        """\
## Train softmax attention and GLA

Measured with `configs/mqar.py:cpu` on a shared 2-core CPU (see `experiments/README.md`):
softmax attention at d = 64 reaches 91.7% held-out accuracy at step 250 and 99.7% at step
500; GLA at d = 32 and d = 64 is still near chance after 500 steps at this learning rate (the
recurrent mixers need longer training and a learning-rate sweep, as in Zoology), so expect
GLA's curve to stay low here. At the harder size (T = 256, 16 pairs), `configs/mqar.py:256,cpu`
(Zoology's mixture of sizes, constant lr 3e-3) takes softmax attention to 99.85% in 1000 steps
(~10 min on 2 cores); GLA and DeltaNet stay near 1/16 there at that budget.""",
    ),
    (
        "code",
        """\
summaries = {}
for mechanism in ("softmax", "gla"):
    config = get_config("tiny" if SMOKE else "cpu")
    config.model.mechanism = mechanism
    config.progress_bar = False
    config.mesh.data = 1
    if not SMOKE:
        config.train_steps, config.eval_every, config.checkpoint_every = 600, 100, 600
    t0 = time.time()
    summaries[mechanism] = s = train(config, str(WORKDIR / f"mqar_{mechanism}"))
    print(f"{mechanism:>8}: accuracy {s['accuracy']:.3f}, state size/layer {s['state_size']}, "
          f"{s['step']} steps in {time.time() - t0:.0f}s")""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for mech, s in summaries.items():
    curve = s["accuracy_curve"]
    axes[0].plot([p["step"] for p in curve], [p["accuracy"] for p in curve], marker="o",
                 label=mech)
    axes[1].scatter([s["state_size"]], [s["accuracy"]], s=60, label=mech)
axes[0].set_ylim(-0.03, 1.03)
axes[0].set_xlabel("step"); axes[0].set_ylabel("held-out accuracy"); axes[0].legend()
axes[1].set_xscale("log"); axes[1].set_xlabel("state size per layer (floats)")
axes[1].set_ylabel("accuracy"); axes[1].set_ylim(-0.03, 1.03); axes[1].legend()
for ax in axes:
    ax.grid(alpha=0.3)
plt.tight_layout(); plt.show()""",
    ),
    (
        "md",
        """\
For the full picture, sweep mechanisms and widths (one run each; a PNG of accuracy vs state
size and a JSON table):

```
python -m jattn_lab.studies.mqar_sweep --workdir runs/mqar_sweep --preset cpu \\
    --mechanisms softmax gla deltanet --d-models 32 64
```""",
    ),
]
