"""Character-level LM on `models.Decoder`: the runner's first real task.

    python -m experiments.run --config configs/char_lm.py --workdir /tmp/char_lm
    python -m experiments.run --config configs/char_lm.py --workdir /tmp/tiny_shakespeare \
        --config.corpus=~/data/input.txt --config.train_steps=5000

`ARG` picks a size: `configs/char_lm.py:tiny` (tests, seconds), the default `small`
(a 2-layer, d=64 model, ~1-2 minutes on a laptop CPU), or `base` (6 layers, d=384).
Switch the attention mechanism with `--config.model.mechanism=sigmoid` (any name of
`models.mechanism_names()`) or hybrids with `--config.model.layer_pattern=LA`.
"""

import ml_collections

from configs.common import adamw_cosine_run, base_config, model_config

# What ARG may be (`--config FILE:ARG`), listed by `python -m experiments.run --help`.
ARGS = "a size: tiny (tests) | small (default) | base"
SIZES = {
    # name: (d_model, num_layers, num_heads, seq_len, batch, steps, lr)
    "tiny": (32, 1, 2, 32, 16, 30, 3e-3),
    "small": (64, 2, 4, 64, 32, 500, 3e-3),
    "base": (384, 6, 6, 256, 64, 5000, 1e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "small"
    if size not in SIZES:
        raise ValueError(f"configs/char_lm.py:{size}: unknown size; choose one of {list(SIZES)}")
    d, layers, heads, seq_len, batch, steps, lr = SIZES[size]
    config = base_config(task="char_lm")
    config.corpus = ""  # a text file; "" = the generated toy-grammar corpus
    config.data = ml_collections.ConfigDict(
        {"seq_len": seq_len, "eval_fraction": 0.1, "num_sentences": 6000}
    )
    config.model = model_config(  # vocabulary from the corpus, max_len = data.seq_len
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        mlp="swiglu",
        positions="rope",
        mechanism="softmax",
        layer_pattern="A",
        tie_embeddings=False,
        # jattn.attention implementation: "" = best for the platform, or "reference",
        # "xla", "pallas". The tiny test size uses the plain reference (fast to compile).
        implementation="reference" if size == "tiny" else "",
    )
    config.sample_prompt = "three plus four is"
    config.sample_tokens = 16 if size == "tiny" else 120
    adamw_cosine_run(
        config, steps=steps, batch_size=batch, learning_rate=lr, weight_decay=0.01, logs=30,
        evals=6, checkpoints=3, eval_batches=4,
    )
    return config
