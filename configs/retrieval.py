"""Long-range retrieval (passkey / needle-in-a-haystack and multi-query associative recall
over filler tokens) on a small `models.Decoder`; the benchmark of `studies.retrieval_bench`.

    # multi-query recall at T = 256 on a 2-core CPU (4 facts, 1-token values; ~13 min)
    python -m experiments.run --config configs/retrieval.py:cpu --workdir /tmp/retrieval_cpu
    # passkey at T = 2048 (one fact), a sparse mechanism
    python -m experiments.run --config configs/retrieval.py:passkey,2048 \\
        --workdir /tmp/passkey_2048 --config.model.mechanism=nsa
    # full vs MoBA / NSA / DSA, retrieval heads, accuracy vs KV-cache budget
    python -m studies.retrieval_bench --workdir /tmp/retrieval_bench --preset cpu

ARG tokens (combine with commas): ``passkey`` (one fact: needle in a haystack) or ``mqar``
(``num_facts`` = 4, the default); ``512`` / ``1024`` / ``2048`` pick ``seq_len`` (default 512);
``cpu`` sizes the run for a 2-core CPU: T = 256, 1-token values (4 facts, or 1 with
``passkey``), 900 steps of batch 32 at d = 64, lr 3e-3 (full attention learns to retrieve;
see experiments/README.md); ``tiny`` is for tests (a few steps, T = 64).

The sparse mechanisms' options (``model.attention_options``, one tuple for all of them: each
core reads its own) give every query about ``seq_len / 4`` keys (:func:`sparse_options`), so
``moba``, ``nsa`` and ``dsa`` run at about the same attention FLOPs as each other and half
those of full causal attention.

Keys: data ``seq_len``, ``num_facts``, ``value_len``, ``vocab_size``; model ``model.*``
(``mechanism``, ``d_model``, ``num_heads``, ``num_layers``, ``attention_options``, ...); plus
the runner's shared keys.
"""

import ml_collections

from configs.common import adamw_cosine_run, base_config, model_config, parse_tokens, tiny

ARGS = ("comma-separated tokens: passkey | mqar (1 or 4 facts, default mqar); 512 | 1024 | "
        "2048 (seq_len, default 512); cpu (a 2-core CPU run), tiny (tests)")
TOKENS = ("passkey", "mqar", "512", "1024", "2048", "cpu", "tiny")


def sparse_options(seq_len: int) -> tuple[tuple[str, int], ...]:
    """MoBA, NSA and DSA options giving each query about ``seq_len / 4`` keys: MoBA its block
    plus ``top_k`` blocks of 32; NSA a window of 32 and its block plus ``select`` blocks of 32
    (plus ``T / 16`` compressed blocks); DSA ``top_k`` tokens."""
    budget = max(seq_len // 4, 64)
    block, window = 32, 32
    return (("moba_block_size", block), ("moba_top_k", budget // block - 1),
            ("nsa_block_size", block), ("nsa_stride", block // 2),
            ("nsa_select", max((budget - window) // block - 1, 1)), ("nsa_window", window),
            ("dsa_top_k", budget), ("dsa_index_heads", 2), ("dsa_index_dim", 16))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = parse_tokens(arg, TOKENS, "retrieval")
    config = base_config(task="retrieval")
    # --- data ------------------------------------------------------------------------------------
    config.vocab_size = 64  # 16 keys, 16 value tokens, 31 filler tokens, the query marker
    config.seq_len = 512
    for t in ("512", "1024", "2048"):
        if t in tokens:
            config.seq_len = int(t)
    config.num_facts = 1 if "passkey" in tokens else 4
    config.value_len = 2
    # --- model -----------------------------------------------------------------------------------
    config.model = model_config(
        mechanism="softmax", d_model=64, num_heads=4, num_layers=2, mlp="swiglu",
        positions="rope", tie_embeddings=False, implementation="",
        attention_options=sparse_options(config.seq_len),
    )
    adamw_cosine_run(config, steps=4000, batch_size=32, learning_rate=1e-3, weight_decay=0.1,
                     logs=40, evals=8, checkpoints=2, eval_batches=2, eval_batch_size=64)
    if "cpu" in tokens:  # full attention learns to retrieve within ~10 min on 2 busy cores
        # T = 256, 1-token values, d = 64: recall is learned in hundreds of steps (the former
        # 150 steps of batch 8 at d = 32 and T = 512 stayed at chance; experiments/README.md)
        config.seq_len = 256
        config.value_len = 1
        config.model.attention_options = sparse_options(256)
        adamw_cosine_run(config, steps=900, batch_size=32, learning_rate=3e-3,
                         weight_decay=0.1, logs=18, evals=6, checkpoints=1, eval_batches=1,
                         eval_batch_size=64)
    if "tiny" in tokens:
        config.seq_len = 64
        config.model.attention_options = sparse_options(64)
        tiny(config, **{"model.d_model": 16, "model.num_heads": 2})
    return config
