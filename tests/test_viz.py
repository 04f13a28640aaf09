"""selora.book.viz: the method colour map and the small plotting helpers."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import pytest

from selora.book import viz


def test_method_colours_are_valid_and_distinct():
    assert {"selora", "lora", "adalora", "dylora", "full"} <= set(viz.METHOD_COLORS)
    rgb = [mcolors.to_rgb(c) for c in viz.METHOD_COLORS.values()]
    assert len(set(rgb)) == len(rgb)
    assert viz.method_color("SeLoRA") == viz.METHOD_COLORS["selora"]
    assert viz.method_color("Ada-LoRA") == viz.METHOD_COLORS["adalora"]
    with pytest.raises(KeyError, match="'qlora'"):
        viz.method_color("qlora")


def test_offline_label():
    assert viz.offline_label("FID", "offline") == "FID (offline proxy)"
    assert viz.offline_label("FID", "paper") == "FID"


def test_step_plot_draws_one_line_per_series_with_given_colours():
    fig, ax = plt.subplots()
    viz.step_plot(ax, {"lora": [3, 2, 1], "selora": [1, 1]}, logy=True, colors=viz.METHOD_COLORS)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["lora", "selora"]
    assert list(lines[0].get_xdata()) == [1, 2, 3]
    assert mcolors.to_hex(lines[1].get_color()) == viz.METHOD_COLORS["selora"].lower()
    assert ax.get_yscale() == "log"
    plt.close(fig)


def test_rank_trajectories_marks_planted_ranks_and_checks_lengths():
    fig, ax = plt.subplots()
    viz.rank_trajectories(ax, [0, 40, 80], {"a": [1, 2, 2], "b": [1, 1, 1]}, planted={"a": 2, "b": 1})
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["a (planted 2)", "b (planted 1)"]
    assert len(ax.get_lines()) == 4  # two trajectories + two dashed planted levels
    with pytest.raises(ValueError, match=r"ranks\['a'\] has 2 values, expected 3"):
        viz.rank_trajectories(ax, [0, 40, 80], {"a": [1, 2]})
    plt.close(fig)


def test_rank_heatmap_rows_are_layers_and_columns_span_steps():
    import numpy as np

    fig, ax = plt.subplots()
    matrix = np.array([[1, 2, 3], [1, 1, 2]])
    mesh = viz.rank_heatmap(ax, [0, 10, 20], ["a", "b"], matrix)
    assert mesh.get_array().reshape(2, 3).tolist() == matrix.tolist()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert ax.get_xlim() == (0.0, 30.0)  # the last column holds for one more interval
    assert mesh.norm.vmin == 1 and mesh.norm.vmax == 3
    with pytest.raises(ValueError, match=r"expected shape \(2, 2\)"):
        viz.rank_heatmap(ax, [0, 10], ["a", "b"], matrix)
    plt.close(fig)


def test_image_rows_labels_rows_and_captions_columns():
    import torch

    img = torch.linspace(-1, 1, 16).reshape(1, 4, 4)
    fig = viz.image_rows({"real": [img, -img], "model": [img.expand(3, 4, 4), img]}, ["p one", "p two"], "title")
    axes = fig.axes
    assert len(axes) == 4
    assert axes[0].get_ylabel() == "real" and axes[2].get_ylabel() == "model"
    assert [axes[2].get_xlabel(), axes[3].get_xlabel()] == ["p one", "p two"]
    shown = axes[1].get_images()[0].get_array()
    assert abs(float(shown[0, 0]) - 1.0) < 1e-6 and abs(float(shown[-1, -1])) < 1e-6  # [-1, 1] -> [0, 1], negated
    with pytest.raises(ValueError, match=r"rows\['real'\] has 1 images, expected 2"):
        viz.image_rows({"real": [img]}, ["p one", "p two"], "title")
    plt.close("all")


def test_rank_heatmap_thins_labels_for_many_layers():
    import numpy as np

    fig, ax = plt.subplots()
    names = [f"layer{i}" for i in range(300)]
    viz.rank_heatmap(ax, [0, 40], names, np.ones((300, 2), dtype=int))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["layer0", "layer2"] and len(labels) == 150
    plt.close(fig)


def test_rank_map_annotates_cells_and_leaves_missing_blank():
    import numpy as np

    fig, ax = plt.subplots()
    grid = np.array([[1.0, np.nan], [2.5, 4.0]])
    image = viz.rank_map(ax, ["T 0", "U mid"], ["text q", "attn2 k"], grid)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["1.0", "2.5", "4.0"]  # NaN cell not annotated
    assert image.get_array().mask[0, 1] and not image.get_array().mask[1, 1]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["T 0", "U mid"]
    with pytest.raises(ValueError, match="locations, kinds"):
        viz.rank_map(ax, ["a"], ["b"], grid)
    plt.close(fig)


def test_method_bars_one_coloured_bar_per_method_with_reference_lines():
    fig, ax = plt.subplots()
    viz.method_bars(ax, {"selora": (2.0, 0.5), "lora": (3.0, None)}, {"base model": 9.0, "real scans": 1.0})
    bars = ax.patches
    assert [b.get_height() for b in bars] == [2.0, 3.0]
    assert [mcolors.to_hex(b.get_facecolor()) for b in bars] == [
        viz.METHOD_COLORS["selora"].lower(),
        viz.METHOD_COLORS["lora"].lower(),
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["selora", "lora"]
    refs = [line for line in ax.get_lines() if line.get_label() in ("base model", "real scans")]
    assert sorted(line.get_ydata()[0] for line in refs) == [1.0, 9.0]
    with pytest.raises(KeyError, match="'qlora'"):
        viz.method_bars(ax, {"qlora": (1.0, 0.1)})
    with pytest.raises(ValueError, match="at least one method"):
        viz.method_bars(ax, {})
    plt.close(fig)


def test_gray_array_takes_model_images_and_gray_scans():
    import numpy as np
    import torch

    img = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]], [[1.0, 0.0], [1.0, -3.0]]])  # (2, 2, 2): channels averaged
    out = viz.gray_array(img)
    assert out.dtype == np.float32 and out.tolist() == [[0.5, 0.5], [1.0, 0.5]]
    assert viz.gray_array(img[:1]).tolist() == [[0.0, 0.5], [1.0, 1.0]]  # (x + 1) / 2, clipped to [0, 1]
    scan = np.array([[0.25, 1.5], [-0.5, 1.0]])  # (H, W) in [0, 1]: kept, clipped
    assert viz.gray_array(scan).dtype == np.float64 and viz.gray_array(scan).tolist() == [[0.25, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 2, 2\)"):
        viz.gray_array(np.zeros((2, 2, 2, 2)))
