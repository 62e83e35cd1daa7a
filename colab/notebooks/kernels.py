"""Cells of colab/kernels.ipynb: the Pallas kernels.

Read by colab/_build_notebooks.py.
``CELLS``: ``(kind, source)`` pairs in order; kind ``"md"`` or ``"code"``, or ``"install"`` /
``"setup"`` for the shared install and setup cells the builder fills in.
"""

CELLS = [
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
    ("install", ""),
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
