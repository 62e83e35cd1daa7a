"""Kernel bodies and the two pallas_call drivers (TPU Mosaic, GPU Triton) for flash.py.

The math of one (query block, key block) tile lives in backend-neutral functions
(``_logits``, ``_visible``, ``_fwd_update``, ``_bwd_tile``); two drivers feed them:

* TPU: grid ``(B, Hq, nq, W)`` with the key-block axis innermost and sequential; the
  compacted block list is scalar-prefetched into SMEM and the k/v index maps follow it, so
  empty blocks are never DMA'd; running max / sum / accumulator live in VMEM scratch; row
  statistics are stored lane-broadcast ``[..., T, 128]`` as in splash attention. The dk/dv
  pass runs over ``(B, Hkv, nk, Hq // Hkv, Wq)`` and accumulates the query heads that share
  a kv head in scratch (GQA without copying k/v).
* GPU (Triton lowering): grid ``(nq, B, Hq)``; the kernel holds one query block and loops
  ``count`` times over its list, slicing the whole-sequence k/v refs (Triton has no scalar
  prefetch and no sequential grid axes). The dk/dv pass writes one slice per query head
  (fp32 when Hq > Hkv) and the wrapper sums the heads of a group.

Partial blocks evaluate ``mask_fn`` (plus key bounds and segment ids) from iota; full blocks
skip it. The forward pass saves each row's max ``m`` and ``log l`` separately, and the backward
recomputes ``p = exp((s - m) - log l)``: with huge logits (``|m| >> log l``) the fp32 sum
``lse = m + log l`` rounds ``log l`` away, and ``exp(s - lse)`` would give each of ``l`` tied keys
weight 1 instead of ``1 / l``. Rows with no visible key get ``l = 0``: output 0 and ``m = +inf``,
``log l = 0``, so every recomputed weight is exactly 0 and every gradient stays finite.

Layout: ``_flash_tiles`` (Config and the tile math), ``_flash_tpu`` and ``_flash_gpu`` (the
drivers); this module re-exports what ``flash.py`` uses.
"""

from pallas_kernels._flash_gpu import gpu_backward, gpu_forward
from pallas_kernels._flash_tiles import (
    LANES,
    MASK_VALUE,
    NORMALIZERS,
    SOFTPICK_EPS,
    Config,
)
from pallas_kernels._flash_tpu import tpu_backward, tpu_forward

__all__ = ["Config", "LANES", "MASK_VALUE", "NORMALIZERS", "SOFTPICK_EPS", "tpu_forward",
           "tpu_backward", "gpu_forward", "gpu_backward"]
