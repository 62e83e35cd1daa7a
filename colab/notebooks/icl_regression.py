"""Cells of colab/icl_regression.ipynb: In-context linear regression (Garg et al.).

Read by colab/_build_notebooks.py.
``CELLS``: ``(kind, source)`` pairs in order; kind ``"md"`` or ``"code"``, or ``"install"`` /
``"setup"`` for the shared install and setup cells the builder fills in.
"""

CELLS = [
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
    ("install", ""),
    ("setup", ""),
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
