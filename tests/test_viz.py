"""selora.viz: the method colour map and the small plotting helpers."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from selora import viz  # noqa: E402


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
    assert [l.get_label() for l in lines] == ["lora", "selora"]
    assert list(lines[0].get_xdata()) == [1, 2, 3]
    assert mcolors.to_hex(lines[1].get_color()) == viz.METHOD_COLORS["selora"].lower()
    assert ax.get_yscale() == "log"
    plt.close(fig)


def test_rank_trajectories_marks_planted_ranks_and_checks_lengths():
    fig, ax = plt.subplots()
    viz.rank_trajectories(ax, [0, 40, 80], {"a": [1, 2, 2], "b": [1, 1, 1]}, planted={"a": 2, "b": 1})
    labels = [l.get_label() for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert labels == ["a (planted 2)", "b (planted 1)"]
    assert len(ax.get_lines()) == 4  # two trajectories + two dashed planted levels
    with pytest.raises(ValueError, match=r"ranks\['a'\] has 2 values, expected 3"):
        viz.rank_trajectories(ax, [0, 40, 80], {"a": [1, 2]})
    plt.close(fig)
