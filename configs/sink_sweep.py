"""Attention sinks per mechanism (Gu et al., "When Attention Sink Emerges in Language Models",
2024): one small decoder trained on Bigram-Backcopy (Guo et al. 2024) with each mechanism.

    # every mechanism, one after the other (CPU: minutes each), table + bar plot
    python -m studies.sink_sweep --workdir /tmp/sink_sweep [--config.train_steps=400]
    # one run of the sweep by hand
    python -m experiments.run --config configs/sink_sweep.py --workdir /tmp/sink_fox \\
        --config.model.mechanism=fox

The base is ``configs/bigram_backcopy.py:cpu`` (d=64, sequences of 64, AdamW 2e-3) with
2 layers of 4 heads, so Gu et al.'s ``Sink_1^0.3`` (the percentage of (layer, head) pairs whose
mean weight on the first token exceeds 0.3; the task's eval metric ``sink_score``) moves in
steps of 12.5%. ``config.model.mechanism`` selects the mechanism; :data:`MECHANISMS` lists the
sweep's. RoPE positions (learned absolute positions would let a head find token 0 without a
sink); ``stick_breaking`` keeps RoPE too, so every run differs only in the mechanism.

ARG tokens: ``tiny`` (tests: d=16, sequences of 32, a few steps).
"""

import ml_collections

from configs.bigram_backcopy import get_config as bigram_backcopy_config
from configs.common import parse_tokens, set_fields

ARGS = "optional: tiny (tests); run the sweep with python -m studies.sink_sweep"
TOKENS = ("tiny",)
# Gu et al.'s and the issue's list: softmax, no normalization, softpick, FoX, output gate,
# learnable sink logit, stick-breaking, differential
MECHANISMS = ("softmax", "sigmoid", "softpick", "fox", "gated", "sinks", "stick_breaking", "diff")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = parse_tokens(arg, TOKENS, "sink_sweep")
    config = bigram_backcopy_config("tiny" if "tiny" in tokens else "cpu")
    set_fields(
        config, train_steps=400, eval_batch_size=32, log_every=50, eval_every=100,
        checkpoint_every=400, histogram_every=400,
        **{"model.num_layers": 2, "model.num_heads": 4, "model.positions": "rope"},
    )
    if "tiny" in tokens:
        set_fields(config, train_steps=4, log_every=2, eval_every=2, checkpoint_every=4,
                   histogram_every=4)
    return config
