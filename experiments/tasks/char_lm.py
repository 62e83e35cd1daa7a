"""Character-level language modelling with `models.Decoder`.

Text: `config.corpus` (a path to any UTF-8 text file) or, by default, a small corpus
generated from a seeded toy grammar (sentences about animals, colours and counting,
with agreement and arithmetic facts such as "three plus four is seven."), so the model
has real structure to learn offline. The vocabulary is the corpus's characters. The last
`data.eval_fraction` of the text is held out.

Example `i` is the window of `seq_len + 1` characters starting at an offset that is a
counter-based hash of `(seed, i)` (`experiments.data.counter_uniform`; a batch at once).
Loss: next-character cross-entropy. Metrics: accuracy and bits per character.
TensorBoard images: per-layer attention maps (mean over heads) of the first eval sequence.
Summary: a greedy sample from a prompt.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.config import ConfigError
from experiments.data import BatchedSource, counter_uniform
from experiments.tasks.base import Batch, Metrics, Task, register
from experiments.tasks.model_config import decoder_config
from models.intermediates import capture_intermediates

_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen"
).split()
_ANIMALS = ("cat", "dog", "fox", "owl", "bee", "hen", "cow", "frog", "bird", "mouse")
_COLOURS = ("red", "blue", "green", "black", "white", "brown", "small", "big", "old")
_VERBS = (
    ("sees", "see"),
    ("likes", "like"),
    ("chases", "chase"),
    ("finds", "find"),
    ("follows", "follow"),
)
_PLACES = ("in the barn", "by the river", "on the hill", "under the tree", "near the house")


def generated_corpus(num_sentences: int = 6000, seed: int = 0) -> str:
    """A deterministic toy-grammar corpus (~200k characters for 6000 sentences)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_sentences):
        kind = rng.integers(3)
        if kind == 0:
            a, b = rng.integers(0, 10, size=2)
            out.append(f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}.")
        else:
            plural = bool(rng.integers(2))
            n = int(rng.integers(2, 10)) if plural else 1
            animal = _ANIMALS[rng.integers(len(_ANIMALS))]
            subj = f"{_NUMBERS[n]} {animal}s" if plural else f"the {animal}"
            colour = _COLOURS[rng.integers(len(_COLOURS))]
            verb = _VERBS[rng.integers(len(_VERBS))][1 if plural else 0]
            obj = f"the {colour} {_ANIMALS[rng.integers(len(_ANIMALS))]}"
            place = _PLACES[rng.integers(len(_PLACES))]
            out.append(f"{subj} {verb} {obj} {place}." if kind == 1 else f"{subj} {verb} {obj}.")
    return "\n".join(out) + "\n"


@register("char_lm")
class CharLM(Task):
    """Next-character prediction on a text corpus with a `models.Decoder`."""

    headline_metrics = ("bits_per_char",)

    def __init__(self, config) -> None:
        super().__init__(config)
        self._text: str | None = None

    # --- data ------------------------------------------------------------------------
    def text(self) -> str:
        if self._text is None:
            path = self.config.get("corpus", "")
            if path:
                with open(os.path.expanduser(path), encoding="utf-8") as f:
                    self._text = f.read()
            else:
                self._text = generated_corpus(int(self.config.data.num_sentences), seed=0)
        return self._text

    def validate(self) -> None:
        c = self.config
        path = c.get("corpus", "")
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"config.corpus={path!r}: no such file")
        if not (isinstance(c.data.seq_len, int) and c.data.seq_len > 1):
            raise ConfigError(f"config.data.seq_len={c.data.seq_len!r}: must be an int > 1")
        frac = c.data.eval_fraction
        if not (isinstance(frac, float) and 0.0 < frac < 0.5):
            raise ConfigError(f"config.data.eval_fraction={frac!r}: must be in (0, 0.5)")
        n = len(self.text())
        if n * frac < 2 * (c.data.seq_len + 1):
            raise ConfigError(
                f"config.corpus: the text ({n} characters) is too short for "
                f"config.data.seq_len={c.data.seq_len}"
            )

    def vocab(self) -> list[str]:
        return sorted(set(self.text()))

    def encode(self, s: str) -> np.ndarray:
        table = {ch: i for i, ch in enumerate(self.vocab())}
        return np.array([table.get(ch, 0) for ch in s], dtype=np.int32)

    def decode(self, ids) -> str:
        v = self.vocab()
        return "".join(v[int(i)] for i in ids)

    def _splits(self) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(self.text())
        cut = int(len(ids) * (1.0 - self.config.data.eval_fraction))
        return ids[:cut], ids[cut:]

    def _windows(self, ids: np.ndarray, n: int, salt: int) -> BatchedSource:
        seed, length = self.config.seed, self.config.data.seq_len + 1
        high = len(ids) - length
        offsets = np.arange(length)

        def examples(indices: np.ndarray) -> dict[str, np.ndarray]:
            u = counter_uniform(seed, salt, np.asarray(indices, np.int64))
            starts = np.minimum((u * (high + 1)).astype(np.int64), high)
            return {"tokens": ids[starts[:, None] + offsets]}

        return BatchedSource(examples, n)

    def train_source(self) -> BatchedSource:
        train, _ = self._splits()
        return self._windows(train, self.config.train_steps * self.config.batch_size, 0)

    def eval_source(self) -> BatchedSource:
        _, held_out = self._splits()
        return self._windows(held_out, 1 << 20, 1)

    def tokens_per_example(self) -> int:
        return int(self.config.data.seq_len)

    # --- model -----------------------------------------------------------------------
    def model_config(self):
        m, seq_len = self.config.model, self.config.data.seq_len
        return decoder_config(m, vocab_size=len(self.vocab()),
                              max_len=max(seq_len, m.get("max_len", 0)))

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from models import Decoder

        return Decoder(self.model_config(), rngs=rngs)

    def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1]).astype(jnp.float32)
        targets = tokens[:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == targets)
        loss = ce + model.aux_loss() if hasattr(model, "aux_loss") else ce
        return loss, {"accuracy": acc, "bits_per_char": ce / jnp.log(2.0)}

    def eval_images(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        n = min(int(self.config.get("image_tokens", 64)), self.config.data.seq_len)
        axis = getattr(getattr(model, "cfg", None), "context_axis", None)
        if axis is not None:  # a context-parallel model splits T evenly: round n down
            from jattn.context_parallel import axis_size

            multiple = model.cfg.context_multiple(axis_size(axis))
            n = max(multiple, n - n % multiple)
        _, inter = capture_intermediates(model, batch["tokens"][:1, :n])
        out = {}
        for i, layer in enumerate(inter["layers"]):
            if "attention_weights" in layer:  # [B, H, T, T]
                out[f"attention/layer{i}"] = jnp.mean(layer["attention_weights"][0], axis=0)
        return out

    # --- end of run ------------------------------------------------------------------
    def summary_fields(self, model, history) -> dict:
        prompt = str(self.config.get("sample_prompt", "")) or self.text()[:16]
        n = int(self.config.get("sample_tokens", 120))
        max_len = len(prompt) + n
        if self.model_config().positions == "learned" and max_len > self.model_config().max_len:
            return {}
        try:
            out = model.generate(
                jnp.asarray(self.encode(prompt))[None], n, temperature=0.0, max_len=max_len
            )
        except Exception as e:  # noqa: BLE001 - a sample is a nicety, never fatal
            return {"sample_error": f"{type(e).__name__}: {e}"[:300]}
        return {"sample": {"prompt": prompt, "greedy": self.decode(np.asarray(out)[0])}}

    def write_figures(self, workdir: str, model, history) -> list[str]:
        from experiments.plots import plot_curves

        path = os.path.join(workdir, "loss.png")
        plot_curves(
            history,
            ("train/bits_per_char", "eval/bits_per_char"),
            path,
            ylabel="bits per character",
        )
        return [path]
