"""TensorBoard event files without TensorFlow: scalars, histograms, images, text, hparams.

Writes with `tensorboard.summary.writer.event_file_writer.EventFileWriter` (a background
thread; `add_*` never blocks on disk). Files are readable by TensorBoard and by
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator`.
Only process 0 writes: on other processes every method is a no-op.

A writer opened on a run directory that holds the runner's ``config.json`` records that config
once (:meth:`SummaryWriter.config`): a text table (TensorBoard's Text tab) and the scalar keys
as hparams (the HParams tab, to compare runs by their settings).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.proto.summary_pb2 import HistogramProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _png(image: np.ndarray) -> tuple[bytes, int, int, int]:
    """Encodes `[H, W]` (colormapped, min-max normalized) or `[H, W, 3|4]` uint8/float."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 2:
        from matplotlib import colormaps

        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        norm = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=np.float32)
        a = (colormaps["viridis"](np.nan_to_num(norm))[..., :3] * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    h, w, c = a.shape
    return buf.getvalue(), h, w, c


def upscale(image: np.ndarray, min_size: int = 128) -> np.ndarray:
    """Nearest-neighbour upscaling so tiny maps (e.g. 8x8 attention) are visible."""
    a = np.asarray(image)
    factor = max(1, min_size // max(a.shape[0], a.shape[1], 1))
    return np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"mesh": {"data": 1}}`` -> ``{"mesh.data": 1}`` (nested mappings only)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_markdown(config: Mapping[str, Any]) -> str:
    """A two-column markdown table of the flattened config, keys sorted."""
    rows = ["| key | value |", "|---|---|"]
    for k, v in sorted(flatten(config).items()):
        value = (json.dumps(v) if not isinstance(v, str) else v).replace("|", "\\|")
        rows.append(f"| `{k}` | `{value}` |")
    return "\n".join(rows)


def _hparam(v: Any) -> bool | int | float | str:
    # The HParams plugin takes bool, number or string values.
    if isinstance(v, bool | int | float | str):
        return v
    return json.dumps(v)


class SummaryWriter:
    """Event-file writer for one run directory (a no-op unless `enabled`).

    Args:
      logdir: the run directory.
      enabled: False on processes other than 0.
      write_config: record ``logdir/config.json`` (if present) with :meth:`config`.
    """

    def __init__(self, logdir: str, enabled: bool = True, *, write_config: bool = True) -> None:
        self.enabled = enabled
        self._writer = EventFileWriter(logdir) if enabled else None
        config_file = os.path.join(logdir, "config.json")
        if self._writer is not None and write_config and os.path.isfile(config_file):
            with open(config_file) as f:
                self.config(json.load(f))

    def _add(self, step: int, value: summary_pb2.Summary.Value) -> None:
        if self._writer is None:
            return
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value])
        )
        self._writer.add_event(event)

    def restart(self, step: int) -> None:
        """Marks a (re)start at `step`: TensorBoard drops older events with step >= `step`.

        Written when a run resumes from a checkpoint, so that events logged after that
        checkpoint by the interrupted run are replaced by the resumed run's.
        """
        if self._writer is None:
            return
        self._writer.add_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=int(step),
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
        )

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._add(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(f"{prefix}{k}", v, step)

    def histogram(
        self,
        tag: str,
        counts: np.ndarray,
        edges: np.ndarray,
        step: int,
        *,
        vmin: float,
        vmax: float,
        total: float,
        total_sq: float,
    ) -> None:
        """A histogram from precomputed bucket `counts` [n] and bin `edges` [n + 1]."""
        counts = np.asarray(counts, dtype=np.float64)
        edges = np.asarray(edges, dtype=np.float64)
        proto = HistogramProto(
            min=float(vmin),
            max=float(vmax),
            num=float(counts.sum()),
            sum=float(total),
            sum_squares=float(total_sq),
            bucket_limit=[float(x) for x in edges[1:]],
            bucket=[float(c) for c in counts],
        )
        self._add(step, summary_pb2.Summary.Value(tag=tag, histo=proto))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """`[H, W]` float map (colormapped) or `[H, W, 3]` RGB."""
        if self._writer is None:
            return
        data, h, w, c = _png(image)
        img = summary_pb2.Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data)
        self._add(step, summary_pb2.Summary.Value(tag=tag, image=img))

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        """Markdown text (TensorBoard's Text tab)."""
        if self._writer is None:
            return
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata

        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[markdown.encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        metadata = text_metadata.create_summary_metadata(display_name=tag, description="")
        self._add(step, summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata))

    def hparams(self, values: Mapping[str, Any], step: int = 0) -> None:
        """The run's hyperparameters (flat ``{name: value}``) for the HParams tab."""
        if self._writer is None:
            return
        from tensorboard.plugins.hparams import summary_v2 as hp

        summary = hp.hparams_pb({k: _hparam(v) for k, v in values.items()})
        self._writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def config(self, config: Mapping[str, Any], step: int = 0) -> None:
        """Records an experiment config (a nested dict, e.g. ``config.json``): a text table
        under ``config`` and its flattened keys as hparams."""
        self.text("config", config_markdown(config), step)
        self.hparams(flatten(config), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
