"""Linear / recurrent attention: gated linear attention, the delta rule, kernelized attention.

State ``S [B, H, K, V]`` (fp32 always), layout ``[B, T, H, D]``, gates in log space. Every
sequence function returns ``(o, final_state)`` and has four implementations: ``"reference"``
(a ``lax.scan`` over time), ``"recurrent"`` (a scan of the public ``*_step`` decoding functions),
``"chunk"`` (alias ``"xla"``; chunkwise-parallel, one shared backbone in
:mod:`jattn.linear.chunk`) and ``"pallas"`` (``pallas_kernels``); ``None`` picks Pallas on
GPU/TPU when available, else chunk.

* :func:`gla`: GLA (per-channel gate), RetNet / Lightning (:func:`retnet_decay`,
  :func:`lightning_decay`), Mamba2-style scalar decay.
* :func:`delta_rule`: DeltaNet, Gated DeltaNet, Kimi Delta Attention.
* :func:`dplr_delta_rule`: the diagonal-plus-low-rank transition (RWKV-7).
* :func:`delta_product`: DeltaProduct, ``n_h`` Householder steps per token.
* :func:`loglinear_gla`: log-linear attention (Fenwick-tree states) over GLA / Mamba-2 gates.
* :func:`linear_attention`: feature-map attention (elu+1, relu, Performer, Hedgehog, Based's
  Taylor map, DPFP, or any callable), causal or not, normalized or not.
* :func:`efficient_attention`: Shen et al.'s softmax-over-features form (non-causal).
* :func:`agent_attention`: agent tokens between two softmax attentions (Han et al. 2024;
  non-causal). :func:`flow_attention`: Flowformer's conservation flows (Wu et al. 2022;
  non-causal and causal; :func:`flow_attention_recurrent` continues the causal form for decoding).
* Decoding: :func:`gla_step`, :func:`delta_rule_step`, :func:`dplr_delta_rule_step`,
  :func:`linear_attention_step`.
* Packed sequences: ``segment_ids [B, T]`` on :func:`gla`, :func:`delta_rule`,
  :func:`dplr_delta_rule`, :func:`delta_product` and (causal) :func:`linear_attention`
  restarts the state at each change of id, in every implementation (the Pallas kernels mask
  in-chunk pairs across segments). ``cu_seqlens [N + 1]`` (flash-linear-attention's offsets,
  ``B = 1``) on the same functions but ``delta_product`` adds per-document initial / final
  states ``[N, H, K, V]`` (:mod:`jattn.linear._packing`).
* Context parallelism: ``context_axis=`` on :func:`gla`, :func:`delta_rule` and
  :func:`linear_attention` splits T over a mesh axis (:mod:`jattn.linear.context_parallel`).
"""

from jattn.linear._checks import UnstableDeltaRuleWarning
from jattn.linear.agent import agent_attention, pool_agents
from jattn.linear.chunk import chunk_recurrence
from jattn.linear.delta import delta_rule
from jattn.linear.delta_product import delta_product
from jattn.linear.dplr import dplr_delta_rule
from jattn.linear.feature_maps import (
    FEATURE_MAPS,
    dpfp,
    elu1,
    hedgehog,
    hedgehog_params,
    performer,
    performer_features,
    relu,
    taylor,
)
from jattn.linear.flowformer import FlowState, flow_attention, flow_attention_recurrent
from jattn.linear.gla import gla, lightning_decay, retnet_decay
from jattn.linear.kernelized import efficient_attention, linear_attention
from jattn.linear.loglinear import loglinear_gla, loglinear_gla_step
from jattn.linear.recurrent import (
    LinearAttentionState,
    delta_rule_step,
    dplr_delta_rule_step,
    gla_step,
    l2norm,
    linear_attention_step,
)

__all__ = [
    "FEATURE_MAPS",
    "FlowState",
    "LinearAttentionState",
    "UnstableDeltaRuleWarning",
    "agent_attention",
    "chunk_recurrence",
    "delta_product",
    "delta_rule",
    "delta_rule_step",
    "dpfp",
    "dplr_delta_rule",
    "dplr_delta_rule_step",
    "efficient_attention",
    "elu1",
    "flow_attention",
    "flow_attention_recurrent",
    "gla",
    "gla_step",
    "hedgehog",
    "hedgehog_params",
    "l2norm",
    "lightning_decay",
    "linear_attention",
    "linear_attention_step",
    "loglinear_gla",
    "loglinear_gla_step",
    "performer",
    "performer_features",
    "pool_agents",
    "relu",
    "retnet_decay",
    "taylor",
]
