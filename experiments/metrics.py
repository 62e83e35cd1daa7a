"""Where a run's scalars go: a history, TensorBoard, the console (progress bar or lines).

:class:`MetricLogger` is the training loop's one sink for metrics. It keeps

* the scalar history `{tag: [(step, value), ...]}` that the task's summary and figures read
  and that a checkpoint carries (thinned to `HISTORY_POINTS_KEPT` points per curve), so a
  resumed run's summary covers the whole run;
* the window of train metrics since the last log (device arrays until the log, so steps do
  not wait on the host); a checkpoint carries the partial window, which keeps a resumed
  run's logged means bitwise equal to an uninterrupted run's;
* TensorBoard events (scalars, histograms, images) and the console: a progress bar with the
  train loss and the task's headline eval metrics in its postfix, or without a bar (batch
  jobs, logs to a file) one line per log; one line per eval either way.

Only process 0 writes events and console output; every process keeps the history (tasks'
end-of-run hooks run on every process).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from experiments.checkpoint import replicated_to_host
from experiments.optim import path_str
from experiments.tb import SummaryWriter, upscale

# Points per curve that a checkpoint keeps of the scalar history (a run logging every step
# for 1M steps would otherwise write tens of MB of JSON at every checkpoint).
HISTORY_POINTS_KEPT = 2000

History = dict[str, list[tuple[int, float]]]


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``k=v, ...`` with 4 significant digits (the runner's log lines)."""
    return ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())


def thin_curve(points: list, max_points: int) -> list:
    """At most `max_points` of `points`, evenly spaced, the first and the last kept."""
    if len(points) <= max_points:
        return list(points)
    keep = np.unique(np.linspace(0, len(points) - 1, max_points).round().astype(int))
    return [points[i] for i in keep]


def window_means(window: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each train metric over a log window; the learning rate at its last step."""
    means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
    if "learning_rate" in window[-1]:
        means["learning_rate"] = window[-1]["learning_rate"]
    return means


def final_metrics(
    last_train: Mapping[str, float], last_eval: Mapping[str, float]
) -> dict[str, float]:
    """The summary's `final`: `train_loss`, `train_<metric>` (the last log window's means)
    and `eval_<metric>` (the last eval)."""
    final: dict[str, float] = {"train_loss": last_train.get("loss", float("nan"))}
    final.update({f"train_{k}": v for k, v in last_train.items() if k != "loss"})
    final.update({f"eval_{k}": v for k, v in last_eval.items()})
    return final


HISTOGRAM_BINS = 30


def param_histograms(params: Any) -> dict[str, dict[str, jax.Array]]:
    """Per-parameter histograms, jittable: `{path: {"counts" [bins], "edges" [bins + 1],
    "stats": [min, max, sum, sum of squares]}}` over `HISTOGRAM_BINS` equal-width bins."""
    out = {}
    for path, x in jax.tree.leaves_with_path(params):
        if x.size < 2:
            continue
        x = x.astype(jnp.float32).reshape(-1)
        lo, hi = x.min(), x.max()
        width = jnp.maximum(hi - lo, 1e-12) / HISTOGRAM_BINS
        idx = jnp.clip(((x - lo) / width).astype(jnp.int32), 0, HISTOGRAM_BINS - 1)
        counts = jnp.zeros((HISTOGRAM_BINS,), jnp.float32).at[idx].add(1.0)
        out[path_str(path)] = {
            "counts": counts,
            "edges": lo + width * jnp.arange(HISTOGRAM_BINS + 1, dtype=jnp.float32),
            "stats": jnp.stack([lo, hi, x.sum(), jnp.sum(x * x)]),
        }
    return out


class StepTimer:
    """Wall time per training step over a log window, excluding side work (eval, histograms,
    checkpoint writes) timed with :meth:`side`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Starts a new window."""
        self.steps = 0
        self._start = time.perf_counter()
        self._side = 0.0

    def step_done(self) -> None:
        self.steps += 1

    @contextmanager
    def side(self) -> Iterator[None]:
        """Time spent in this block is not a step's."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._side += time.perf_counter() - t

    def perf(self, tokens_per_step: int) -> dict[str, float]:
        """`step_time_s` and `tokens_per_s` over the window so far."""
        elapsed = time.perf_counter() - self._start - self._side
        steps = max(self.steps, 1)
        return {"step_time_s": elapsed / steps, "tokens_per_s": tokens_per_step * steps / elapsed}


class MetricLogger:
    """Metric history, TensorBoard events and console output of one run.

    Args:
      workdir: where TensorBoard event files go.
      enabled: whether this process writes events and console output (process 0).
      progress_bar: a tqdm bar on the console; else a line per train log.
      total_steps: the bar's length (`config.train_steps`).
      description: the bar's label (the task's name).
      headline: eval metric names shown in the bar's postfix beside the train loss (the
        task's `headline_metrics`); names an eval does not produce are skipped.
      tokens_per_step: for the `perf/tokens_per_s` throughput.
      stream: console stream (default: `sys.stderr` at the time of writing).
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        progress_bar: bool = True,
        total_steps: int = 0,
        description: str = "",
        headline: Sequence[str] = (),
        tokens_per_step: int = 1,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.history: History = defaultdict(list)
        self.last_train: dict[str, float] = {}
        self._window: list[dict[str, float]] = []  # host metrics of steps since the last log
        self._pending: list[dict] = []  # device metrics, not yet moved into the window
        self._writer = SummaryWriter(workdir, enabled=enabled)
        self._use_bar = enabled and progress_bar
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._total_steps = total_steps
        self._description = description
        self._headline = tuple(headline)
        self._stream = stream
        self._tokens_per_step = tokens_per_step
        self._timer = StepTimer()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint carries: the partial train window, the last train means and the
        history thinned to `HISTORY_POINTS_KEPT` points per curve (JSON-able)."""
        self._drain_pending()
        return {
            "window": list(self._window),  # copies: an async save serializes them later
            "last_train": dict(self.last_train),
            "history": {k: [list(p) for p in thin_curve(v, HISTORY_POINTS_KEPT)]
                        for k, v in self.history.items()},
        }

    def restore(self, meta: Mapping[str, Any], step: int) -> None:
        """Continues from a checkpoint at `step` (its `checkpoint_meta`): the curves so far (so
        a resumed run's summary and figures cover the whole run) and the partial window.
        TensorBoard drops the interrupted run's events after `step`."""
        self._window = [dict(m) for m in meta.get("window", [])]
        for tag, points in meta.get("history", {}).items():
            self.history[tag] = [(int(s), float(v)) for s, v in points if int(s) <= step]
        self.last_train = dict(meta.get("last_train", {}))
        self._writer.restart(step + 1)

    # ------------------------------------------------------------------ metrics
    def scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        """Scalars to TensorBoard and the history, as `prefix + name`."""
        self._writer.scalars(values, step, prefix=prefix)
        for k, v in values.items():
            self.history[prefix + k].append((step, float(v)))

    def train_step(self, metrics: Mapping[str, jax.Array]) -> None:
        """Collects one step's (device, replicated) train metrics for the next log."""
        self._pending.append(metrics)
        self._timer.step_done()

    @contextmanager
    def side_work(self) -> Iterator[None]:
        """Eval, histograms, checkpoint writes: time spent here is not a step's."""
        with self._timer.side():
            yield

    def log_train(self, step: int) -> dict[str, float]:
        """Logs the means of the train metrics since the last log and the step time and
        throughput (`perf/`); starts a new window. Returns the means."""
        self._drain_pending()  # waits for the steps to finish: before reading the clock
        perf = self._timer.perf(self._tokens_per_step)
        self.last_train = window_means(self._window)
        self._window = []
        self.scalars(self.last_train, step, "train/")
        self.scalars(perf, step, "perf/")
        if self._bar is not None:
            self._set_postfix(loss=self.last_train["loss"])
        else:  # no progress bar (batch jobs, logs to a file): a line
            self._print(f"[jattn] step {step}: {format_metrics(self.last_train)}, "
                        f"step_time_s={perf['step_time_s']:.4g}")
        self._timer.reset()
        return self.last_train

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Eval metrics: TensorBoard, history, one console line, the bar's headline."""
        self.scalars(metrics, step, "eval/")
        self._print(f"[jattn] step {step} eval: {format_metrics(metrics)}")
        if self._bar is not None:
            self._set_postfix(**{k: metrics[k] for k in self._headline if k in metrics})

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """`{tag: [H, W] or [H, W, 3]}` (e.g. attention maps) as `images/<tag>`, upscaled."""
        for tag, img in images.items():
            self._writer.image(f"images/{tag}", upscale(np.asarray(img, np.float32)), step)

    def histograms(self, histograms: Mapping[str, Mapping[str, np.ndarray]], step: int) -> None:
        """`{name: {"counts", "edges", "stats": [min, max, sum, sum of squares]}}` (as
        :func:`param_histograms` computes them) as `params/<name>`."""
        for name, h in histograms.items():
            vmin, vmax, tot, tot_sq = (float(v) for v in h["stats"])
            self._writer.histogram(f"params/{name}", h["counts"], h["edges"], step,
                                   vmin=vmin, vmax=vmax, total=tot, total_sq=tot_sq)

    # ------------------------------------------------------------------ console
    def begin_steps(self, start_step: int) -> None:
        """Call before the first training step: shows the bar (if enabled) at `start_step`
        and starts timing steps."""
        if self._use_bar and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self._total_steps, initial=start_step, unit="step",
                             desc=self._description, dynamic_ncols=True, file=self._out())
        self._timer.reset()

    def advance(self) -> None:
        """Moves the bar on by one step (call at the end of each step)."""
        if self._bar is not None:
            self._bar.update(1)

    def end_steps(self) -> None:
        """Closes the bar (call after the last step); lines printed later stand alone."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        """Closes the bar and the event file (idempotent)."""
        self.end_steps()
        self._writer.close()

    # ------------------------------------------------------------------ internals
    def _drain_pending(self) -> None:
        if self._pending:
            host = jax.tree.map(replicated_to_host, self._pending)
            self._window.extend({k: float(v) for k, v in m.items()} for m in host)
            self._pending = []

    def _set_postfix(self, **values: float) -> None:
        """Updates the bar's postfix: the train loss first, then the headline eval metrics."""
        self._postfix.update({k: f"{float(v):.4g}" for k, v in values.items()})
        order = ["loss", *self._headline]
        self._bar.set_postfix({k: self._postfix[k] for k in order if k in self._postfix},
                              refresh=False)

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:  # above the bar, which redraws below it
            self._bar.write(line, file=self._out())
        else:
            print(line, file=self._out(), flush=True)
