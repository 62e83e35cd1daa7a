"""Softmax-family variants that are not a normalizer of ``jattn.attention``: each has a
``"reference"`` form (materialized fp32 weights, the oracle) and an ``"xla"`` form (blocked over
``(query, key)`` tiles, O(T * block) memory, gradients by autodiff through rematerialized loops;
see :mod:`jattn.variants._tiles`). None has a Pallas kernel yet.

* :func:`clipped_softmax_attention`: ``clip((zeta - gamma) softmax(s) + gamma, 0, 1)``, two
  passes (Bondarenko et al. 2023).
* :func:`signed_attention`: ``sign(s) softmax(|s|)`` (Cog attention; Lv et al. 2024).
"""

from jattn.variants.clipped import clipped_softmax_attention
from jattn.variants.signed import signed_attention

__all__ = ["clipped_softmax_attention", "signed_attention"]
