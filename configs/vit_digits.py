"""ViT image classification: scikit-learn's 8x8 digits offline, or any image folder.

    python -m experiments.run --config configs/vit_digits.py --workdir /tmp/vit_digits
    python -m experiments.run --config configs/vit_digits.py --workdir /tmp/vit_folder \
        --config.data.image_folder=~/data/imagenette --config.data.image_size=64 \
        --config.data.channels=3 --config.model.patch_size=8 --config.model.size=S

`ARG`: `tiny` (tests, seconds) or the default `small` (800 steps, ~1.5 minutes on a shared
2-core CPU, ~93% held-out accuracy on digits). Switch attention with
`--config.model.mechanism=...`.
"""

import ml_collections

from configs.common import adamw_cosine_run, base_config, model_config

# What ARG may be (`--config FILE:ARG`), listed by `python -m experiments.run --help`.
ARGS = "a size: tiny (tests) | small (default)"
SIZES = {
    # name: (ViT size, patch, batch, steps, lr)
    "tiny": ("test", 2, 16, 30, 3e-3),
    "small": ("mu", 2, 64, 800, 2e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "small"
    if size not in SIZES:
        raise ValueError(f"configs/vit_digits.py:{size}: unknown size; choose one of {list(SIZES)}")
    vit, patch, batch, steps, lr = SIZES[size]
    config = base_config(task="vit_digits")
    config.data = ml_collections.ConfigDict(
        {
            "image_folder": "",
            "image_size": 8,
            "channels": 1,
            "eval_fraction": 0.2,
            "label_smoothing": 0.0,
        }
    )
    config.model = model_config(  # classes, image size and channels come from the data
        size=vit,
        patch_size=patch,
        pool="token",
        positions="learned",  # learned | sincos2d | none
        mechanism="softmax",
    )
    adamw_cosine_run(
        config, steps=steps, batch_size=batch, learning_rate=lr, weight_decay=0.05, logs=40,
        evals=8, checkpoints=4, eval_batches=5, eval_batch_size=64,
    )
    return config
