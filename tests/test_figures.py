"""Figures and TensorBoard records: labelled axes, published values, attention-map PNG with a
colour bar, the config as text and hparams. Read back from the matplotlib artists (the figure
handed to `plots.save`) and from the event files."""

import json

import numpy as np
import pytest
from flax import nnx

from experiments import plots
from experiments.tb import SummaryWriter, config_markdown, flatten
from tests import testing as T


@pytest.fixture
def saved(monkeypatch):
    """Figures passed to plots.save (still written to disk), by file name."""
    figs = {}
    real_save = plots.save

    def save(fig, path):
        figs[path.rsplit("/", 1)[-1]] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save", save)
    return figs


def _colorbars(fig) -> list[str]:
    """Labels of the colour-bar axes of `fig`."""
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_plot_curves_labels_the_y_axis_and_overlays_published_points(tmp_path, saved):
    history = {"train/loss": [(0, 2.0), (10, 1.0), (20, 0.5)], "eval/loss": [(20, 0.6)]}
    path = plots.plot_curves(history, ("train/loss", "eval/loss"), str(tmp_path / "loss.png"),
                             published={"0": 2.1, "10": 0.9, "5000": 0.1, "note": "x"})
    assert (tmp_path / "loss.png").stat().st_size > 1000 and path.endswith("loss.png")
    (ax,) = saved["loss.png"].axes
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    (marks,) = [line for line in ax.get_lines() if line.get_label() == "published"]
    # JSON's string keys read as steps; a step past the run and a note are left out
    assert marks.get_xdata().tolist() == [0.0, 10.0] and marks.get_ydata().tolist() == [2.1, 0.9]


def test_attention_map_png_has_axes_and_a_colour_bar(tmp_path, saved):
    w = np.tril(np.ones((2, 8, 8))) / np.arange(1, 9)[:, None]
    plots.attention_map(w, str(tmp_path / "attn.png"), marked_queries=[3],
                        marked_label="trigger")
    assert (tmp_path / "attn.png").stat().st_size > 1000
    fig = saved["attn.png"]
    maps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in maps] == ["layer 0", "layer 1"]
    for ax in maps:
        assert ax.get_xlabel() == "key position" and "query position" in ax.get_ylabel()
        assert ax.images[0].get_array().shape == (8, 8)
    assert _colorbars(fig) == ["attention weight"] * 2


def test_attention_map_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"weights: expected \[Tq, Tk\]"):
        plots.attention_map(np.zeros(8), str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="titles: expected 2"):
        plots.attention_map(np.zeros((2, 4, 4)), str(tmp_path / "a.png"), titles=["one"])


def test_bigram_backcopy_figures(tmp_path, saved):
    """Every panel has a y label, the paper's 1-layer values are overlaid, and the trained
    model's attention map is its own PNG with axes and a colour bar."""
    from configs.bigram_backcopy import get_config
    from experiments.tasks.bigram_backcopy import BigramBackcopyTask

    config = get_config("tiny")
    task = BigramBackcopyTask(config)
    model = task.build_model(nnx.Rngs(0))
    history = {f"eval/{k}": [(0, 0.1), (200, 0.3), (400, 0.5)]
               for k in ("attn_sink", "value_norm", "residual_norm", "backcopy_risk",
                         "bigram_risk")}
    paths = task.write_figures(str(tmp_path), model, history)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["bigram_backcopy.png", "attention_map.png"]
    panels = saved["bigram_backcopy.png"].axes
    assert all(ax.get_ylabel() for ax in panels) and all(ax.get_xlabel() for ax in panels)
    published = [ax for ax in panels
                 if any(line.get_label().startswith("published") for line in ax.get_lines())]
    assert len(published) == (3 if config.model.num_layers == 1 else 0)
    attn = saved["attention_map.png"]
    assert _colorbars(attn) == ["attention weight"] * int(config.model.num_layers)
    assert all(ax.get_xlabel() == "key position" for ax in attn.axes if ax.images)


def _events(logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_writer_records_the_run_config_as_text_and_hparams(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    config = {"task": "regression", "learning_rate": 0.003, "mesh": {"data": 1},
              "rules": [["embed", None]], "note": "a|b"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    writer = SummaryWriter(str(tmp_path))
    writer.close()
    acc = _events(tmp_path)
    assert acc.SummaryMetadata("config").plugin_data.plugin_name == "text"
    text = tensor_util.make_ndarray(acc.Tensors("config")[0].tensor_proto).item().decode()
    assert text == config_markdown(config)
    assert "| `mesh.data` | `1` |" in text and "`a\\|b`" in text
    tag = "_hparams_/session_start_info"
    data = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata(tag).plugin_data.content)
    hp = {k: v.WhichOneof("kind") for k, v in data.session_start_info.hparams.items()}
    assert set(hp) == set(flatten(config))
    assert hp["learning_rate"] == "number_value" and hp["rules"] == "string_value"


def test_a_run_writes_its_config_to_tensorboard(tmp_path):
    from experiments.trainer import train

    train(T.tiny_config(train_steps=2, eval_every=2, checkpoint_every=2), str(tmp_path))
    acc = _events(tmp_path)
    assert "config" in acc.Tags()["tensors"]
