"""Softmax-family variants that are not a normalizer of ``jattn.attention``: each has a
``"reference"`` form (materialized fp32 weights, the oracle) and an ``"xla"`` form (blocked over
``(query, key)`` tiles, O(T * block) memory, gradients by autodiff through rematerialized loops;
see :mod:`jattn.variants._tiles`). None has a Pallas kernel yet.

* :func:`clipped_softmax_attention`: ``clip((zeta - gamma) softmax(s) + gamma, 0, 1)``, two
  passes (Bondarenko et al. 2023).
* :func:`signed_attention`: ``sign(s) softmax(|s|)`` (Cog attention; Lv et al. 2024).
* :func:`top_theta_attention`, :func:`calibrate_top_theta`: per-head calibrated score
  thresholds (Berestizshevsky et al. 2025).
* :func:`gpsa_attention`: ConViT's gated positional self-attention (d'Ascoli et al. 2021).
* :func:`multi_token_attention`: convolutions over the score map and across heads before the
  softmax (Golovneva et al. 2025); the xla form reads halo tiles.
* :func:`dual_triangle_attention`: half of each head looks back, half forward (MECHANISMS.md);
  two :func:`jattn.attention` calls, so it also runs on the Pallas kernel.
"""

from jattn.variants.clipped import clipped_softmax_attention
from jattn.variants.dual_triangle import dual_triangle_attention, past_and_future_masks
from jattn.variants.gpsa import gpsa_attention, gpsa_locality_init
from jattn.variants.mta import mta_identity_kernels, multi_token_attention
from jattn.variants.signed import signed_attention
from jattn.variants.top_theta import calibrate_top_theta, top_theta_attention

__all__ = ["calibrate_top_theta", "clipped_softmax_attention", "dual_triangle_attention",
           "gpsa_attention", "gpsa_locality_init", "mta_identity_kernels",
           "multi_token_attention", "past_and_future_masks", "signed_attention",
           "top_theta_attention"]
