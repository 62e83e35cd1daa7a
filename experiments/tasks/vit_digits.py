"""Image classification with `models.ViT`.

Default data: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes,
offline), split by a fixed permutation into train / held-out (`data.eval_fraction`).
Real datasets: `config.data.image_folder=PATH` with `PATH/train/<class>/*.png|jpg` and
`PATH/test/<class>/...` (or `val/`); images are read with PIL, converted to
`data.channels` channels and resized to `data.image_size`; classes are the sorted
sub-folder names.

Training data: epochs of the training set, each shuffled with `(seed, epoch)` by grain.
Loss: softmax cross-entropy (+ label smoothing `data.label_smoothing`); metrics:
accuracy. TensorBoard images: the class token's attention over the patch grid (last
layer, mean over heads) beside the input image.
"""

from __future__ import annotations

import math
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.config import ConfigError
from experiments.tasks.base import Batch, Metrics, Task, register
from experiments.tasks.model_config import vit_config
from models.intermediates import capture_intermediates

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolderSource:
    """A grain random-access source over `root/<class>/<image>` files.

    Element `i` is `{"image": float32 [H, W, C] in [0, 1], "label": int32}`.
    """

    def __init__(self, root: str, image_size: int, channels: int = 3) -> None:
        self.root = root
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"{root}: no class sub-folders")
        self.files: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            for name in sorted(os.listdir(os.path.join(root, cls))):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append((os.path.join(root, cls, name), label))
        if not self.files:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.image_size = image_size
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        from PIL import Image

        path, label = self.files[int(i)]
        with Image.open(path) as img:
            img = img.convert(self.mode).resize((self.image_size, self.image_size))
            x = np.asarray(img, dtype=np.float32) / 255.0
        if x.ndim == 2:
            x = x[..., None]
        return {"image": x, "label": np.int32(label)}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as `images [1797, 8, 8, 1]` in [0, 1] and `labels [1797]`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    return images, d.target.astype(np.int32)


class _ArraySource:
    """Random-access source over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.images[int(i)], "label": self.labels[int(i)]}


@register("vit_digits")
class ViTDigits(Task):
    """Image classification with a ViT (digits by default, or an image folder)."""

    headline_metrics = ("accuracy",)

    def __init__(self, config) -> None:
        super().__init__(config)
        self._splits: tuple | None = None

    def validate(self) -> None:
        d = self.config.data
        folder = os.path.expanduser(d.get("image_folder", ""))
        if folder and not os.path.isdir(os.path.join(folder, "train")):
            raise ConfigError(f"config.data.image_folder={folder!r}: needs a train/ sub-folder")
        if self.config.data.image_size % self.config.model.patch_size:
            raise ConfigError(
                f"config.model.patch_size={self.config.model.patch_size}: must divide "
                f"config.data.image_size={self.config.data.image_size}"
            )

    def splits(self):
        """(train source, eval source, number of classes)."""
        if self._splits is None:
            d = self.config.data
            folder = os.path.expanduser(d.get("image_folder", ""))
            if folder:
                train = ImageFolderSource(os.path.join(folder, "train"), d.image_size, d.channels)
                for name in ("test", "val", "validation"):
                    if os.path.isdir(os.path.join(folder, name)):
                        held = ImageFolderSource(
                            os.path.join(folder, name), d.image_size, d.channels
                        )
                        break
                else:
                    raise ConfigError(
                        f"config.data.image_folder={folder!r}: needs a test/ or val/ sub-folder"
                    )
                self._splits = (train, held, len(train.classes))
            else:
                images, labels = digits_arrays()
                perm = np.random.default_rng(0).permutation(len(labels))
                n_eval = int(len(labels) * d.eval_fraction)
                ev, tr = perm[:n_eval], perm[n_eval:]
                self._splits = (
                    _ArraySource(images[tr], labels[tr]),
                    _ArraySource(images[ev], labels[ev]),
                    10,
                )
        return self._splits

    def train_source(self) -> grain.MapDataset:
        train, _, _ = self.splits()
        needed = self.config.train_steps * self.config.batch_size
        epochs = math.ceil(needed / len(train))
        return grain.MapDataset.source(train).shuffle(seed=self.config.seed).repeat(epochs)

    def eval_source(self) -> grain.MapDataset:
        _, held, _ = self.splits()
        return grain.MapDataset.source(held)

    def model_config(self):
        d = self.config.data
        _, _, num_classes = self.splits()
        return vit_config(self.config.model, image_size=d.image_size, channels=d.channels,
                          num_classes=num_classes)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from models import ViT

        return ViT(self.model_config(), rngs=rngs)

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        logits = model(batch["image"]).astype(jnp.float32)
        labels = batch["label"]
        num_classes = logits.shape[-1]
        smooth = float(self.config.data.get("label_smoothing", 0.0))
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smooth)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        if hasattr(model, "aux_loss"):
            loss = loss + model.aux_loss()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        cfg = self.model_config()
        image = batch["image"][:1]
        _, inter = capture_intermediates(model, image)
        last = inter["layers"][-1]
        out = {"input": jnp.mean(image[0], axis=-1)}
        if "attention_weights" in last:  # [B, H, T, T]; T = prefix + grid
            w = jnp.mean(last["attention_weights"][0], axis=0)
            gh, gw = cfg.grid
            if cfg.pool == "token":
                out["attention/cls_to_patches"] = w[0, 1:].reshape(gh, gw)
                w = w[1:, 1:]
            out["attention/patch_map"] = w
        return out
