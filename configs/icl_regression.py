"""In-context linear regression, He, Pan, Chen, Yang (2025): one multi-head attention layer.

    python -m experiments.run --config configs/icl_regression.py --workdir /tmp/icl_h2
    python -m experiments.run --config configs/icl_regression.py --workdir /tmp/icl_h1 \\
        --config.model.num_heads=1
    python -m experiments.run --config configs/icl_regression.py --workdir /tmp/icl_lin \\
        --config.model.mechanism=linear

`ARG` sets the number of training steps (`configs/icl_regression.py:300` for a smoke
run). The setup (d = 5, L = 40, sigma^2 = 0.1, Adam 1e-3, batch 256) is the paper's; see
`experiments/tasks/icl_regression.py` and the ICL section of `experiments/README.md` for
the steps the reproduction needed.
"""

import ml_collections

from configs.common import base_config, model_config, set_fields

# What ARG may be (`--config FILE:ARG`), listed by `python -m experiments.run --help`.
ARGS = "an integer: the number of training steps (default 40000)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config(task="icl_regression")
    # the task's own one-layer model (experiments.tasks.icl_regression.ICLAttention); its
    # width d + 1 follows the data key `dim`
    config.model = model_config(
        num_heads=2,
        mechanism="softmax",  # softmax | linear (unnormalized, for the U-shape check)
        # std of the entries of Q_h, K_h, V_h, O_h at init. 0.1 left H = 2 on the single-head
        # saddle (both heads one sign, risk ~.405) for > 8k steps; 0.5 split the heads by ~6k.
        init_scale=0.5,
        implementation="reference",  # jattn.attention implementation ("" = default)
    )
    config.dim = 5  # d: x in R^d, tokens z = (x, y) in R^{d+1}
    config.num_pairs = 40  # L: in-context pairs at training
    config.noise_var = 0.1  # sigma^2 on every y, the query target included
    config.eval_lengths = (10, 20, 40, 60, 80, 100)
    config.eval_examples = 65536  # fixed test prompts per evaluation length
    set_fields(
        config, train_steps=int(arg) if arg else 40000, batch_size=256, learning_rate=1e-3,
        optimizer="adam", schedule="constant",
    )
    set_fields(
        config, log_every=500, eval_every=5000, checkpoint_every=10000, eval_batches=4,
        eval_batch_size=4096, histogram_every=0,
    )
    return config
