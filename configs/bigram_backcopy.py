"""Bigram-Backcopy (Guo et al. 2024, "Active-Dormant Attention Heads"): attention sinks,
value drains and residual peaks on a toy bigram + copy task.

    # CPU-friendly (~2-4 minutes on 2 cores): the sink forms within a few hundred steps
    python -m experiments.run --config configs/bigram_backcopy.py:cpu --workdir /tmp/bb_cpu
    # the paper's setup (1 layer, d=256, batch 512, AdamW 3e-4, 10k steps): an accelerator job
    # (~8.5 s/step on a 2-core CPU: the sink's 0.5 crossing at step ~390 is ~1 hour there;
    # runs resume from their last checkpoint, so --config.train_steps can grow in stages)
    python -m experiments.run --config configs/bigram_backcopy.py --workdir /tmp/bb
    # ablations: 3 layers; SGD; ReLU attention (comma-separated ARG tokens)
    python -m experiments.run --config configs/bigram_backcopy.py:3layer,sgd --workdir /tmp/bb_sgd
    python -m experiments.run --config configs/bigram_backcopy.py:relu --workdir /tmp/bb_relu
    # character bigrams of any text file instead of the synthetic P
    python -m experiments.run --config configs/bigram_backcopy.py:cpu --workdir /tmp/bb_txt \\
        --config.corpus=~/data/input.txt

ARG tokens (combine with commas): ``cpu`` (d=64, seq 64, batch 128, 800 steps, lr 2e-3),
``tiny`` (tests: d=16, seq 32, a few steps), ``1layer``/``3layer``, ``sgd`` (momentum 0.9,
lr 0.03), ``relu`` / ``sigmoid`` (``config.model.mechanism``, the attention normalizer; relu:
lr 3e-3 for 1 layer as in the paper). The learning rate a token sets can be overridden with
``--config.learning_rate``; the model's fields live under ``config.model``
(``--config.model.num_layers=2``).
"""

import ml_collections

from configs.common import base_config, model_config, parse_tokens, set_fields, tiny

# What ARG may be (`--config FILE:ARG`), listed by `python -m experiments.run --help`.
ARGS = ("comma-separated tokens: cpu (a 2-core CPU run), tiny (tests), 1layer | 3layer, "
        "sgd | adamw, relu | sigmoid | softmax; default: the paper's setup (1 layer, AdamW, "
        "softmax)")
TOKENS = ("cpu", "tiny", "1layer", "3layer", "sgd", "adamw", "relu", "sigmoid", "softmax")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = parse_tokens(arg, TOKENS, "bigram_backcopy")
    config = base_config(task="bigram_backcopy")
    # --- data: the paper's 65 characters + <s>, sequences of 256 inputs --------------------------
    config.vocab_size = 65  # characters, <s> excluded (ignored with a corpus)
    config.seq_len = 256  # inputs per sequence (seq_len + 1 tokens)
    config.corpus = ""  # a text file for character bigrams; "" = the synthetic P
    config.p_seed = 0  # seed of the synthetic P (the training `seed` draws data and init)
    config.zipf_exponent = 1.0
    config.row_concentration = 0.3
    config.num_triggers = 3
    # --- model: 1 head, LayerNorm, learned positions (vocabulary and max_len come from the data)
    config.model = model_config(
        num_layers=1,
        d_model=256,
        num_heads=1,
        mlp="relu",  # hidden 4 d_model
        norm="layernorm",
        positions="learned",
        use_bias=False,
        tie_embeddings=False,
        mechanism="softmax",  # softmax | relu | sigmoid
        init="pytorch",  # PyTorch defaults as in the paper's code, or "models" (our own)
        implementation="reference",  # jattn.attention implementation ("" = best available)
    )
    config.image_tokens = 64  # attention-map images: first N positions of one eval sequence
    # --- optimizer: AdamW 3e-4, betas (0.9, 0.99), wd 1e-4 on every parameter, no schedule ----
    set_fields(
        config, optimizer="adamw", learning_rate=3e-4, b1=0.9, b2=0.99, weight_decay=1e-4,
        no_decay=(), schedule="constant", warmup_steps=0, grad_clip_norm=0.0, batch_size=512,
        train_steps=10_000, momentum=0.9,  # momentum: the sgd ablation's
    )
    # --- logging: eval metrics at every log step (and step 0) on one fixed batch ---------------
    set_fields(
        config, eval_at_start=True, log_every=100, eval_every=100, eval_batches=1,
        eval_batch_size=64, checkpoint_every=1000, histogram_every=1000,
    )

    if "cpu" in tokens:
        # seq_len <= model.d_model: a previous-token head over learned positions fits
        set_fields(
            config, seq_len=64, batch_size=128, eval_batch_size=64, train_steps=800,
            learning_rate=2e-3, log_every=25, eval_every=25, checkpoint_every=400,
            histogram_every=400, **{"model.d_model": 64},
        )
    if "tiny" in tokens:
        tiny(config, seq_len=32, image_tokens=16, **{"model.d_model": 16})
    if "3layer" in tokens:
        config.model.num_layers = 3
    if "1layer" in tokens:
        config.model.num_layers = 1
    if "sgd" in tokens:
        config.optimizer = "sgd"
        config.learning_rate = 0.03
    for name in ("relu", "sigmoid", "softmax"):
        if name in tokens:
            config.model.mechanism = name
    m = config.model
    if m.mechanism == "relu" and m.num_layers == 1 and config.optimizer == "adamw":
        config.learning_rate = 3e-3
    return config
