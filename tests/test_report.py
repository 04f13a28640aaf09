"""selora.report: run records -> curves and rank matrices, layer names and kinds on the shipped
mini SD with real adapters, the Fig. 3 rank grid."""

from __future__ import annotations

import numpy as np
import pytest

from selora import report
from selora.core.layers import lora_layers


def test_loss_curves_drop_skipped_steps_and_keep_eval():
    records = {
        "train": [
            {"step": 1, "loss": 1.0},
            {"step": 1, "loss": None, "skipped": "non-finite loss"},
            {"step": 2, "loss": 0.5},
        ],
        "eval": [{"step": 2, "eval_loss": 0.7}],
        "ranks": [],
    }
    curves = report.loss_curves(records)
    assert curves["train"][0].tolist() == [1, 2] and curves["train"][1].tolist() == [1.0, 0.5]
    assert curves["eval"][0].tolist() == [2] and curves["eval"][1].tolist() == [0.7]
    no_eval = report.loss_curves({"train": records["train"], "eval": []})
    assert len(no_eval["eval"][0]) == 0
    with pytest.raises(ValueError, match="no finite training loss"):
        report.loss_curves({"train": [records["train"][1]], "eval": []})


def test_running_mean_matches_brute_force():
    x = np.random.default_rng(0).normal(size=23)
    for window in (1, 4, 50):
        expected = [x[max(0, i + 1 - window) : i + 1].mean() for i in range(len(x))]
        np.testing.assert_allclose(report.running_mean(x, window), expected)
    with pytest.raises(ValueError, match="window=0"):
        report.running_mean(x, 0)


def test_rank_matrix_orders_layers_and_checks_them():
    history = [
        {"step": 0, "ranks": {"b": 1, "a": 1}},
        {"step": 10, "ranks": {"a": 2, "b": 1}, "expanded": ["a"]},
        {"step": 20, "ranks": {"a": 3, "b": 2}},
    ]
    steps, names, matrix = report.rank_matrix(history)
    assert steps.tolist() == [0, 10, 20] and names == ["b", "a"]
    assert matrix.tolist() == [[1, 1, 2], [1, 2, 3]]
    with pytest.raises(ValueError, match="step 10 lists different layers"):
        report.rank_matrix([history[0], {"step": 10, "ranks": {"a": 2}}])
    with pytest.raises(ValueError, match="empty"):
        report.rank_matrix([])


def test_layer_names_and_kinds_cover_the_real_model(mini_model):
    names = list(lora_layers(mini_model))
    kinds = {n: report.module_kind(n) for n in names}
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]
    expected = {
        "attn1 q",
        "attn1 k",
        "attn1 v",
        "attn1 out",
        "attn2 q",
        "attn2 k",
        "attn2 v",
        "attn2 out",
        "ff",
        "proj in/out",
        "time",
        "text q",
        "text k",
        "text v",
        "text out",
        "text mlp",
    }
    assert set(kinds.values()) == expected
    shorts = [report.short_name(n) for n in names]
    assert len(set(shorts)) == len(shorts), "short names must stay unique"
    assert report.short_name("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "U up1.0 attn2.to_k"
    assert report.short_name("text_encoder.encoder.layers.2.self_attn.q_proj") == "T 2 q_proj"
    mid = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert report.short_name(mid) == "U mid.0 attn1.to_out"


def test_rank_by_kind_means_and_sorts():
    ranks = {
        "unet.a.attn2.to_k": 5,
        "unet.b.attn2.to_k": 3,
        "unet.a.ff.net.2": 1,
        "text_encoder.encoder.layers.0.self_attn.q_proj": 4,
    }
    assert report.rank_by_kind(ranks) == {"attn2 k": 4.0, "text q": 4.0, "ff": 1.0}


def test_rank_grid_groups_by_location_and_kind_and_averages_runs():
    a = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 3,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": 1,
        "text_encoder.text_model.encoder.layers.0.mlp.fc2": 2,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 5,
    }
    b = {**a, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 1}
    rows, cols, grid = report.rank_grid([a, b])
    assert rows == ["T 0", "U down0.0"]
    assert cols == ["text q", "text mlp", "attn2 k"]  # KIND_ORDER, only kinds present
    assert grid[0, 0] == 2.0  # (3 + 1) / 2 over runs
    assert grid[0, 1] == 1.5  # fc1, fc2 averaged (both runs)
    assert np.isnan(grid[1, 0]) and grid[1, 2] == 5.0
    with pytest.raises(ValueError, match="at least one run"):
        report.rank_grid([])
