"""Multi-query associative recall (Zoology, Arora et al. 2023) on a 2-layer `models.Decoder`.

    # CPU-sized preset (vocab 256, T=64, 4 pairs, d=64): softmax reaches ~100% in a few minutes
    python -m experiments.run --config configs/mqar.py:cpu --workdir /tmp/mqar_cpu
    # (T=256, 16 pairs) on CPU, trained on Zoology's size mixture: softmax > 99% by step ~600
    # (the measured run used --config.schedule=constant --config.train_steps=1000)
    python -m experiments.run --config configs/mqar.py:256,cpu --workdir /tmp/mqar_256_cpu
    # the paper's sizes: vocab 8192, (T, pairs) in {(64, 4), (128, 8), (256, 16)}
    python -m experiments.run --config configs/mqar.py:256 --workdir /tmp/mqar_256 \\
        --config.model.mechanism=gla --config.model.d_model=128
    # accuracy vs state size over mechanisms and widths
    python -m studies.mqar_sweep --workdir /tmp/mqar_sweep --preset cpu \\
        --mechanisms softmax gla deltanet --d-models 32 64

ARG tokens (combine with commas): ``64`` / ``128`` / ``256`` pick ``(seq_len, num_kv_pairs)``
= (64, 4) / (128, 8) / (256, 16) (default 64); ``cpu`` shrinks everything for a 2-core CPU
(vocab 256, d 64, batch 64, 1500 steps); ``tiny`` is for tests (a few steps, d 16).
``128`` and ``256`` train on the mixture of all sizes up to theirs (``train_mix``, as Zoology
does; evaluation is at the preset's size only); ``--config.train_mix=`` trains on one size.

Keys: data ``seq_len``, ``num_kv_pairs``, ``vocab_size``, ``power_a`` (query-gap power law),
``train_mix``; model ``model.mechanism`` (any registered attention mechanism name, see
``models.mechanism_names()``), ``model.d_model``, ``model.num_heads``, ``model.num_layers``,
``model.positions``, ``model.init``, ``model.embed_init_std``, ``model.tie_embeddings``,
``model.attention_options``; plus the runner's shared keys (``train_steps``,
``learning_rate``, ...).
"""

import ml_collections

from configs.common import base_config, model_config, parse_tokens, set_fields, tiny

# What ARG may be (`--config FILE:ARG`), listed by `python -m experiments.run --help`.
ARGS = ("comma-separated tokens: 64 | 128 | 256 (seq_len, num_kv_pairs) = (64, 4) | "
        "(128, 8) | (256, 16), default 64; cpu (a 2-core CPU run), tiny (tests)")
TOKENS = ("64", "128", "256", "cpu", "tiny")
SIZES = {"64": (64, 4), "128": (128, 8), "256": (256, 16)}
# Training mixture per preset (Zoology trains on several sizes at once). Measured at
# `:256,cpu` (batch 64, lr 3e-3 constant): softmax leaves the plateau ~150 steps sooner with it
# (held-out .96 at step 500, .99 at 600) than on (256, 16) alone (.06 at 600, .84 at 700).
MIXES = {"64": "", "128": "64:4,128:8", "256": "64:4,128:8,256:16"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = parse_tokens(arg, TOKENS, "mqar")
    config = base_config(task="mqar")
    # --- data (Zoology's defaults) ---------------------------------------------------------------
    config.vocab_size = 8192
    config.seq_len, config.num_kv_pairs = 64, 4
    for t in tokens:
        if t in SIZES:
            config.seq_len, config.num_kv_pairs = SIZES[t]
    config.power_a = 0.01
    # Zoology trains on a mixture of sizes: "64:4,128:8,256:16" gives every third training
    # example each size (shorter ones padded with random tokens); "" = (seq_len, num_kv_pairs)
    # only. Evaluation is always at (seq_len, num_kv_pairs).
    config.train_mix = MIXES[f"{config.seq_len}"]
    # --- model (vocabulary and max_len come from the data keys) -------------------------------
    config.model = model_config(
        mechanism="softmax",
        d_model=128,
        num_heads=1,
        num_layers=2,
        mlp="swiglu",
        positions="learned",
        tie_embeddings=False,
        # "models" (positions N(0, 0.02)) or "pytorch" (embeddings and positions N(0, 1),
        # linears U(+-1/sqrt(fan_in)): experiments.tasks.base.apply_init)
        init="models",
        embed_init_std=1.0,
        implementation="",  # jattn.attention implementation ("" = best for the platform)
        # the mechanism's own options, e.g. '(("conv_width", 0),)': DeltaNet without its convs
        attention_options=(),
    )
    # --- optimizer -------------------------------------------------------------------------------
    set_fields(
        config, optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, schedule="cosine",
        warmup_steps=200, grad_clip_norm=1.0, batch_size=64, train_steps=10_000,
    )
    # --- logging ---------------------------------------------------------------------------------
    set_fields(
        config, eval_at_start=False, log_every=100, eval_every=500, eval_batches=4,
        eval_batch_size=256, checkpoint_every=2000, histogram_every=5000,
    )

    if "cpu" in tokens:
        set_fields(
            config, vocab_size=256, batch_size=64, train_steps=1500, learning_rate=3e-3,
            warmup_steps=50, log_every=50, eval_every=250, eval_batch_size=128, eval_batches=4,
            checkpoint_every=1500, histogram_every=1500, **{"model.d_model": 64},
        )
    if "tiny" in tokens:
        config.train_mix = ""
        config.seq_len, config.num_kv_pairs = 16, 2
        tiny(config, vocab_size=64, eval_batches=1, warmup_steps=1,
             **{"model.d_model": 16, "model.implementation": "reference"})
    return config
