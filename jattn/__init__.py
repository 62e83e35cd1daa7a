"""jattn: attention mechanisms for research in JAX.

Pure functions, no state: ``attention`` (softmax family), ``masks``, ``position``,
``normalizers``, ``score_mods`` (programmable scores), ``linear`` (linear / recurrent
attention), ``analysis``, ``context_parallel`` (the sequence split over a mesh axis),
``variants`` (softmax-family variants with their own blocked forms).
"""

from jattn import (
    analysis,
    context_parallel,
    linear,
    masks,
    normalizers,
    position,
    score_mods,
    sparse,
    variants,
)
from jattn._block_mask import attention_block_sizes
from jattn.attention import attention, attention_weights

# One version for jattn and its kernels distribution (see pallas_kernels/_version.py).
from pallas_kernels._version import __version__ as __version__

__all__ = [
    "analysis",
    "attention",
    "attention_block_sizes",
    "attention_weights",
    "context_parallel",
    "linear",
    "masks",
    "normalizers",
    "position",
    "score_mods",
    "sparse",
    "variants",
]
