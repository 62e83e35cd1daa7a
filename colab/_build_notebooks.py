"""Writes the experiment notebooks of colab/ (without outputs). Run from the repo root:

    python colab/_build_notebooks.py

Each notebook: a markdown title, the install cell, then code cells. ``SMOKE`` (env
``JATTN_NOTEBOOK_SMOKE=1``, set by tests/test_notebooks.py) shrinks every size; runs go to
``JATTN_NOTEBOOK_WORKDIR`` (or ``./runs``). The hand-written notebooks (quickstart) get the
same install cell: the builder replaces theirs.

Where the notebooks install jattn from (when it is not importable: a fresh Colab runtime) is
one setting: the environment variable ``JATTN_SOURCE`` at run time, else ``DEFAULT_SOURCE``
below, written into every install cell. Either a pip URL of the repository
(``git+https://HOST/OWNER/jattn@REF``) or the path of a checkout. The install cell installs two
distributions from it: the kernels (``jattn-pallas-kernels``, its ``pallas_kernels/``
subfolder) and jattn, whose wheel requires them. Installed so, the lab packages are
``jattn_lab.models``, ``jattn_lab.experiments``, ``jattn_lab.configs`` (jattn_lab/__init__.py),
the names the notebooks use; from the checkout they alias the top-level packages.
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

# The one place that names where the notebooks install from (see the module docstring).
DEFAULT_SOURCE = "git+https://github.com/jattn-dev/jattn"

INSTALL = f"""\
# Install jattn when it is not importable yet (Colab). Locally: `pip install -e .` first.
# JATTN_SOURCE: a pip URL of the repository (git+https://...@REF) or a checkout's path.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jattn") is None:
    source = os.environ.get("JATTN_SOURCE", "{DEFAULT_SOURCE}")
    if source.startswith("git+"):  # the kernels are a subfolder of the same repository
        kernels, jattn = f"jattn-pallas-kernels @ {{source}}#subdirectory=pallas_kernels", source
    else:
        kernels, jattn = os.path.join(source, "pallas_kernels"), source
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", kernels, jattn])"""

SETUP = """\
import json, os, pathlib, subprocess, sys, time
import numpy as np
import matplotlib.pyplot as plt

SMOKE = os.environ.get("JATTN_NOTEBOOK_SMOKE") == "1"
WORKDIR = pathlib.Path(os.environ.get("JATTN_NOTEBOOK_WORKDIR") or "runs").resolve()
WORKDIR.mkdir(parents=True, exist_ok=True)


def run_experiment(config: str, workdir: pathlib.Path, *overrides: str) -> dict:
    \"\"\"`python -m jattn_lab.experiments.run --config CONFIGS/CONFIG --workdir DIR
    [--config.k=v ...]` in a subprocess; returns DIR/summary.json. Re-running resumes (or
    reuses) the run.\"\"\"
    from jattn_lab import configs
    config_path = pathlib.Path(configs.__file__).parent / config
    cmd = [sys.executable, "-m", "jattn_lab.experiments.run", f"--config={config_path}",
           f"--workdir={workdir}", "--config.progress_bar=False", *overrides]
    print("$", " ".join(cmd[1:]))
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise RuntimeError(f"run failed with exit code {out.returncode}")
    print(f"done in {time.time() - t0:.0f}s")
    return json.loads((workdir / "summary.json").read_text())"""


def notebook(cells: list[tuple[str, str]], name: str) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(cells):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell.id = f"{name}-{i}"  # stable ids: rebuilding gives a clean diff
        nb.cells.append(cell)
    return nb


# ------------------------------------------------------------------------------------------------
ICL = [
    (
        "md",
        """\
# In-context linear regression with multi-head softmax attention

He, Pan, Chen, Yang (2025), "In-Context Linear Regression Demystified". One attention layer
with H heads reads L = 40 pairs `(x_i, y_i)` and predicts `y_q` for a query `x_q`
(d = 5, noise variance 0.1). Trained heads implement (debiased) one-step gradient descent:
`KQ_h ~ omega_h I`, only the y -> output entry of `OV_h` is non-zero, and the heads' `mu_h`
sum to zero.

This notebook trains `configs/icl_regression.py` (a short run; the patterns need several
thousand steps, see `experiments/README.md`), then compares its test risk at several prompt
lengths with the baselines the task computes, and shows the learned KQ / OV matrices.
`JATTN_NOTEBOOK_SMOKE=1` makes it a few-step smoke run.""",
    ),
    ("code", INSTALL),
    ("code", SETUP),
    (
        "md",
        """\
## Train

`experiments.run` writes TensorBoard events, checkpoints, figures and `summary.json` into
the run directory (8000 steps: a few minutes on a CPU). Edit `STEPS` / `HEADS` to explore.
Measured here at 2000 steps (H = 2): the two heads still act like one kernel-estimator head
(risk .43 at L = 40, the `kernel` baseline .41); `configs/icl_regression.py` notes that the
heads split into the zero-sum pair by ~6k steps, after which the risk approaches debiased GD.""",
    ),
    (
        "code",
        """\
HEADS = 2
STEPS = 20 if SMOKE else 8000
overrides = [f"--config.model.num_heads={HEADS}", "--config.log_every=10" if SMOKE else
             "--config.log_every=100", f"--config.eval_every={STEPS}",
             f"--config.checkpoint_every={STEPS}"]
if SMOKE:  # a small fixed test set so evaluation takes a moment
    overrides += ["--config.eval_examples=1024", "--config.eval_batches=1"]
run_dir = WORKDIR / f"icl_h{HEADS}_{STEPS}"
summary = run_experiment(f"icl_regression.py:{STEPS}", run_dir, *overrides)
print("final:", {k: round(v, 4) for k, v in summary["final"].items()})""",
    ),
    (
        "md",
        """\
## Test risk vs prompt length, against the baselines

Trained at L = 40 and evaluated at every length on the same fixed prompts. `ridge` is
Bayes-optimal; `gd` is one step of GD with the step optimal at L = 40 (risk 0.2398 there);
`debiased_gd` is what zero-sum softmax heads implement to first order. Published (5e5 steps):
H = 2 reaches .573 / .370 / .241 / .202 / .178 / .164 at L = 10 ... 100.""",
    ),
    (
        "code",
        """\
risk, base = summary["risk"], summary["baselines"]
lengths = sorted(risk, key=int)
rows = {"trained (this run)": risk, **base}
print(f"{'L':>22}" + "".join(f"{n:>8}" for n in lengths))
for name, r in rows.items():
    print(f"{name:>22}" + "".join(f"{r[n]:8.3f}" if n in r else f"{'-':>8}" for n in lengths))

fig, ax = plt.subplots(figsize=(6, 4))
for name, r in rows.items():
    ls = [n for n in lengths if n in r]
    ax.plot([int(n) for n in ls], [r[n] for n in ls], marker="o" if name.startswith("trained")
            else ".", lw=2.5 if name.startswith("trained") else 1, label=name)
ax.axvline(summary["config"]["num_pairs"], color="gray", ls=":", lw=1)
ax.set_xlabel("prompt length L"); ax.set_ylabel("test risk (MSE vs noisy y_q)")
ax.set_title(f"H = {HEADS}, {summary['step']} steps"); ax.legend(fontsize=8); ax.grid(alpha=.3)
plt.show()""",
    ),
    (
        "md",
        """\
## KQ and OV per head

The task draws the x-block of `KQ_h = W_K^T W_Q` and the read-out row of `OV_h` for every
head (`kq_ov_heads.png`); the pattern metrics quantify them (diagonal ratio of KQ -> 1,
OV concentrated on the y entry -> 1, `sum_h mu_h` -> 0).""",
    ),
    (
        "code",
        """\
from IPython.display import Image, display
for fig_path in summary.get("figures", []):
    if "kq_ov" in fig_path:
        display(Image(filename=str(run_dir / fig_path)))
pat = summary["patterns"]
for key in ("kq_diagonal_ratio", "ov_last_entry_ratio", "ov_zero_sum_ratio", "gd_step"):
    if key in pat:
        print(f"{key:>22}: {pat[key]:.4f}")
for key in ("omega", "mu"):
    if key in pat:
        print(f"{key:>22}: {np.round(pat[key], 3).tolist()}")""",
    ),
]

# ------------------------------------------------------------------------------------------------
BB = [
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
    ("code", INSTALL),
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

# ------------------------------------------------------------------------------------------------
MQAR = [
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
    ("code", INSTALL),
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

# ------------------------------------------------------------------------------------------------
KERNELS = [
    (
        "md",
        """\
# Pallas kernels: correctness on CPU, speed needs a GPU/TPU

`pallas_kernels` holds the block-sparse flash-attention kernel and the chunked linear
attention kernels. On a CPU they run in Pallas *interpret* mode: the same kernel program,
executed op by op. That checks the kernel's logic against the jattn reference, but says
nothing about its speed: interpret mode is slow by design. Real kernel timings need a GPU or
TPU (see `benchmarks/`). `JATTN_NOTEBOOK_SMOKE=1` uses tiny shapes.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import os, time
import jax, jax.numpy as jnp, numpy as np
import jattn, jattn.linear
import pallas_kernels
from jattn import masks as M
from jattn.testing import rel_rmse

SMOKE = os.environ.get("JATTN_NOTEBOOK_SMOKE") == "1"
print(jax.devices())
key = jax.random.PRNGKey(0)""",
    ),
    (
        "md",
        """\
## Flash attention (interpret mode) vs the reference

Causal, sliding-window and document (segment) masks; the kernel gets the mask as a block
map (empty tiles are skipped, full tiles are not masked) plus a predicate of indices for
partial tiles. Forward and `dq` against `jattn.attention(..., implementation="reference")`.""",
    ),
    (
        "code",
        """\
B, T, H, D = 1, (64 if SMOKE else 256), 2, 32
BQ = BK = 32 if SMOKE else 64
q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in jax.random.split(key, 3))
seg = jnp.asarray((np.arange(T) >= T // 3).astype(np.int32) + (np.arange(T) >= 2 * T // 3))[None]
cases = {
    "causal": (M.causal(), lambda qi, ki, h: ki <= qi, {}),
    "sliding window 24": (M.sliding_window(24), lambda qi, ki, h: (ki <= qi) & (ki > qi - 24), {}),
    "causal + 3 documents": (M.causal(), lambda qi, ki, h: ki <= qi, {"segment_ids": seg}),
}
print(f"{'mask':>22} {'fwd rel-RMSE':>13} {'dq rel-RMSE':>12}")
for name, (mask, fn, kw) in cases.items():
    bm = mask.block_map(T, T, BQ, BK)
    kern = lambda q: pallas_kernels.flash_attention(q, k, v, block_map=bm, mask_fn=fn,
                                                    block_q=BQ, block_kv=BK, **kw)
    ref = lambda q: jattn.attention(q, k, v, mask=mask, implementation="reference", **kw)
    o_k, o_r = kern(q), ref(q)
    g_k = jax.grad(lambda q: jnp.sum(jnp.sin(kern(q))))(q)
    g_r = jax.grad(lambda q: jnp.sum(jnp.sin(ref(q))))(q)
    print(f"{name:>22} {rel_rmse(o_k, o_r):13.1e} {rel_rmse(g_k, g_r):12.1e}")""",
    ),
    (
        "md",
        """\
## Chunked GLA (interpret mode) vs the reference scan

`S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`, with per-channel gates
(GLA) and scalar gates (RetNet / Mamba2 style); outputs and the final state.""",
    ),
    (
        "code",
        """\
Tl, Kd = (32 if SMOKE else 128), 16
ks = jax.random.split(jax.random.PRNGKey(1), 5)
ql, kl, vl = (jax.random.normal(kk, (1, Tl, 2, Kd)) for kk in ks[:3])
gates = {"per-channel (GLA)": jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, Tl, 2, Kd)) + 3),
         "scalar (RetNet-like)": jax.nn.log_sigmoid(jax.random.normal(ks[4], (1, Tl, 2)) + 3)}
print(f"{'gate':>22} {'o rel-RMSE':>11} {'state rel-RMSE':>15}")
for name, g in gates.items():
    o_k, s_k = pallas_kernels.chunk_gla(ql, kl, vl, g, output_final_state=True, chunk_size=16)
    o_r, s_r = jattn.linear.gla(ql, kl, vl, g, output_final_state=True,
                                implementation="reference")
    print(f"{name:>22} {rel_rmse(o_k, o_r):11.1e} {rel_rmse(s_k, s_r):15.1e}")""",
    ),
    (
        "md",
        """\
## Timing on this machine: jattn `xla` vs `jax.nn.dot_product_attention`

Both are plain XLA on a CPU (no kernel): jattn's blocked online softmax visits only
non-empty tiles, `dot_product_attention` computes the dense square and masks. Ratios are
what matter on a shared machine. These are *not* kernel timings.""",
    ),
    (
        "code",
        """\
def bench(f, *args, n=3):
    f = jax.jit(f); jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t0) / n

print(f"{'T':>6} {'mask':>12} {'jattn xla ms':>13} {'dpa ms':>8} {'dpa/xla':>8}")
for L in ((128, 256) if SMOKE else (512, 1024, 2048)):
    qL, kL, vL = (jax.random.normal(kk, (1, L, 4, 64)) for kk in jax.random.split(key, 3))
    for name, m, kw in [("causal", M.causal(), dict(is_causal=True)),
                        ("window 128", M.sliding_window(128),
                         dict(is_causal=True, local_window_size=(127, 0)))]:
        tx = bench(lambda q, k, v: jattn.attention(q, k, v, mask=m, implementation="xla"),
                   qL, kL, vL)
        td = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw), qL, kL, vL)
        print(f"{L:>6} {name:>12} {1e3 * tx:13.2f} {1e3 * td:8.2f} {td / tx:8.2f}")""",
    ),
    (
        "md",
        """\
On a GPU or TPU, `jattn.attention(..., implementation="pallas")` and
`jattn.linear.gla(..., implementation="pallas")` compile these kernels for real;
`benchmarks/` times them against `jax.nn.dot_product_attention` and the kernels in
`jax.experimental.pallas.ops`, and `benchmarks/RESULTS.md` logs the measured figures.""",
    ),
]


HAND_WRITTEN = ("quickstart",)


def main() -> None:
    for name, cells in {
        "icl_regression": ICL,
        "bigram_backcopy_sinks": BB,
        "mqar_recall": MQAR,
        "kernels": KERNELS,
    }.items():
        path = HERE / f"{name}.ipynb"
        nbformat.write(notebook(cells, name), path)
        print("wrote", path)
    for name in HAND_WRITTEN:  # same install cell as the built ones
        path = HERE / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.source.startswith(INSTALL.splitlines()[0]):
                cell.source = INSTALL
        nbformat.write(nb, path)
        print("updated the install cell of", path)


if __name__ == "__main__":
    main()
