"""Pallas kernels for attention, importable with only JAX installed (no jattn, no flax).

* ``flash_attention``: block-sparse flash attention (softmax, sinks, soft-cap, segment ids, GQA).
* ``chunk_gla`` / ``chunk_delta_rule`` / ``chunk_dplr_delta_rule``: chunkwise-parallel gated
  linear attention, (gated) delta rule and diagonal-plus-low-rank delta rule (RWKV-7).

Each takes ``interpret=None`` (interpret on CPU, compile on GPU/TPU) and ``backend`` (``None``,
``"tpu"``, ``"cuda"``/``"gpu"``) so a CPU host can export kernels for an accelerator.
"""
from pallas_kernels._version import __version__  # noqa: F401

# Each kernel module adds its own export line below.
from pallas_kernels.chunk import (  # noqa: F401
    chunk_delta_rule,
    chunk_dplr_delta_rule,
    chunk_gla,
)
from pallas_kernels.flash import flash_attention  # noqa: F401
