r"""Attention analysis: pure functions of attention weights, activations and head matrices.

Weights follow the ``jattn.attention_weights`` layout ``p [B, H, Tq, Tk]`` (rows sum to
one for softmax); a stack over layers is ``[L, B, H, Tq, Tk]``. Every function accepts numpy
or JAX arrays, returns JAX arrays, and is jittable unless noted (Python-level options such
as ``k``, ``eps`` or ``grid_shape`` are static).

Contents, with the paper each implements:

- :func:`sink_importance`, :func:`sink_score`: attention-sink metric ``Sink_k^eps``
  (Gu et al. 2024, "When Attention Sink Emerges in Language Models").
- :func:`attention_entropy`, :func:`mean_attention_distance`: per-query entropy and mean
  attention distance (Dosovitskiy et al. 2021, ViT, Fig. 7 / App. D.7).
- :func:`attention_rollout`: Abnar & Zuidema 2020, "Quantifying Attention Flow".
- :func:`massive_activations`: Sun et al. 2024, "Massive Activations in LLMs".
- :func:`token_norm_ratio`: value-state drain / residual-state peak at a token
  (Guo et al. 2024, "Active-Dormant Attention Heads").
- :func:`head_ablation_importance`: Michel et al. 2019, "Are Sixteen Heads Really Better
  than One?" (ablation and gradient proxy).
- :func:`retrieval_score`: copy-paste retrieval heads (Wu et al. 2024, "Retrieval Head
  Mechanistically Explains Long-Context Factuality"); :func:`retrieval_head_scores` /
  :func:`retrieval_heads` per (layer, head) from a teacher-forced forward pass.
- :func:`kq_diagonal_ratio`, :func:`kq_homogeneity`, :func:`ov_last_entry_ratio`,
  :func:`ov_zero_sum_ratio`, :func:`head_omega`, :func:`head_mu`, :func:`icl_patterns`:
  KQ/OV patterns of multi-head softmax attention trained on in-context linear regression
  (He, Pan, Chen, Yang 2025, "In-Context Linear Regression Demystified").
"""

from jattn.analysis.heads import head_ablation_importance, retrieval_score
from jattn.analysis.icl import (
    head_mu,
    head_omega,
    icl_patterns,
    kq_diagonal_ratio,
    kq_homogeneity,
    ov_last_entry_ratio,
    ov_zero_sum_ratio,
)
from jattn.analysis.maps import attention_entropy, attention_rollout, mean_attention_distance
from jattn.analysis.retrieval import retrieval_head_scores, retrieval_heads
from jattn.analysis.sinks import (
    massive_activations,
    sink_importance,
    sink_score,
    token_norm_ratio,
)

__all__ = [
    "sink_importance",
    "sink_score",
    "attention_entropy",
    "mean_attention_distance",
    "attention_rollout",
    "massive_activations",
    "token_norm_ratio",
    "head_ablation_importance",
    "retrieval_score",
    "retrieval_head_scores",
    "retrieval_heads",
    "kq_diagonal_ratio",
    "kq_homogeneity",
    "ov_last_entry_ratio",
    "ov_zero_sum_ratio",
    "head_omega",
    "head_mu",
    "icl_patterns",
]
