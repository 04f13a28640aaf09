"""selora.report: run records -> curves and rank matrices, layer names, parameter counts on the
shipped mini SD with real adapters, and the paired-seed image differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selora import report
from selora.config import load_config
from selora.inject import inject
from selora.layers import lora_layers, num_trainable
from selora.models import load_pipeline
from selora.train import add_adapters


def test_loss_curves_drop_skipped_steps_and_keep_eval():
    records = {
        "train": [{"step": 1, "loss": 1.0}, {"step": 1, "loss": None, "skipped": "non-finite loss"},
                  {"step": 2, "loss": 0.5}],
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
    history = [{"step": 0, "ranks": {"b": 1, "a": 1}}, {"step": 10, "ranks": {"a": 2, "b": 1}, "expanded": ["a"]},
               {"step": 20, "ranks": {"a": 3, "b": 2}}]
    steps, names, matrix = report.rank_matrix(history)
    assert steps.tolist() == [0, 10, 20] and names == ["b", "a"]
    assert matrix.tolist() == [[1, 1, 2], [1, 2, 3]]
    with pytest.raises(ValueError, match="step 10 lists different layers"):
        report.rank_matrix([history[0], {"step": 10, "ranks": {"a": 2}}])
    with pytest.raises(ValueError, match="empty"):
        report.rank_matrix([])


@pytest.fixture(scope="module")
def mini_model():
    """The shipped mini SD with the offline config's SeLoRA adapters (every linear layer of both models)."""
    cfg = load_config("montgomery-offline")
    pipe = load_pipeline("offline", device="cpu")
    return add_adapters(pipe, cfg)


def test_layer_names_and_kinds_cover_the_real_model(mini_model):
    names = list(lora_layers(mini_model))
    kinds = {n: report.module_kind(n) for n in names}
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]
    expected = {"attn1 q", "attn1 k", "attn1 v", "attn1 out", "attn2 q", "attn2 k", "attn2 v", "attn2 out", "ff",
                "proj in/out", "time", "text q", "text k", "text v", "text out", "text mlp"}
    assert set(kinds.values()) == expected
    shorts = [report.short_name(n) for n in names]
    assert len(set(shorts)) == len(shorts), "short names must stay unique"
    assert report.short_name("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "U up1.0 attn2.to_k"
    assert report.short_name("text_encoder.encoder.layers.2.self_attn.q_proj") == "T 2 q_proj"
    assert report.short_name("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == "U mid.0 attn1.to_out"


def test_rank_by_kind_means_and_sorts():
    ranks = {"unet.a.attn2.to_k": 5, "unet.b.attn2.to_k": 3, "unet.a.ff.net.2": 1,
             "text_encoder.encoder.layers.0.self_attn.q_proj": 4}
    assert report.rank_by_kind(ranks) == {"attn2 k": 4.0, "text q": 4.0, "ff": 1.0}


def test_trainable_counts_agree_with_the_models_parameters(mini_model):
    counts = report.trainable_counts(mini_model, lora_rank=4)
    assert counts["total"]["selora"] == num_trainable(mini_model)  # rank 1 everywhere at the start
    assert counts["total"]["lora"] == 4 * counts["total"]["selora"]
    for key in ("selora", "lora"):
        assert counts["unet"][key] + counts["text_encoder"][key] == counts["total"][key]
        assert counts["unet"][key] > 0 and counts["text_encoder"][key] > 0
    # grow one layer by two ranks: SeLoRA's count follows, LoRA's does not move
    name, layer = next(iter(lora_layers(mini_model).items()))
    layer.expand(2, generator=torch.Generator().manual_seed(0))
    grown = report.trainable_counts(mini_model, lora_rank=4)
    assert grown["total"]["selora"] == num_trainable(mini_model)
    assert grown["total"]["selora"] - counts["total"]["selora"] == 2 * (layer.in_features + layer.out_features)
    assert grown["total"]["lora"] == counts["total"]["lora"]
    # and LoRA's count is what a real rank-4 LoRA injection trains
    pipe = load_pipeline("offline", device="cpu")
    inject(pipe.unet, "paper-unet", kind="lora", rank=4)
    assert num_trainable(pipe.unet) == counts["unet"]["lora"]
    with pytest.raises(ValueError, match="no LoRA/SeLoRA layers"):
        report.trainable_counts(torch.nn.Linear(2, 2))


def test_rms_difference_and_side_fraction():
    a = torch.zeros(2, 1, 4, 6)
    b = a.clone()
    b[0, :, :, 4:] = 1.0  # image right (the patient's left) of the first pair
    b[1, :, :, :] = 0.5
    rms = report.rms_difference(a, b)
    assert rms.tolist() == pytest.approx([(8 / 24) ** 0.5, 0.5])
    energy_right = 8 * 1.0 + 12 * 0.25  # squared differences on the image's right half (columns 3-5)
    assert report.side_fraction(a, b, "left") == pytest.approx(energy_right / (8 + 24 * 0.25))
    assert report.side_fraction(a, b, "left") + report.side_fraction(a, b, "right") == pytest.approx(1.0)
    assert report.side_fraction(a[1:], b[1:], "right") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="side='middle'"):
        report.side_fraction(a, b, "middle")
    with pytest.raises(ValueError, match="identical"):
        report.side_fraction(a, a, "left")
    with pytest.raises(ValueError, match="one shape"):
        report.rms_difference(a, b[:1])


def test_laterality_index_reads_where_each_side_word_puts_its_change():
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(3, 1, 8, 8, generator=g)
    on_image_right, on_image_left = normal.clone(), normal.clone()
    on_image_right[..., 5:] += 1.0   # the patient's LEFT (radiological convention)
    on_image_left[..., :3] += 1.0    # the patient's right
    assert report.laterality_index(on_image_right, on_image_left, normal) == pytest.approx([1.0] * 3)
    assert report.laterality_index(on_image_left, on_image_right, normal) == pytest.approx([-1.0] * 3)
    assert report.laterality_index(on_image_right, on_image_right, normal) == pytest.approx([0.0] * 3)
    mixed = on_image_right.clone()
    mixed[1] = on_image_left[1]      # seed 1 puts the "left" finding on the wrong side
    assert report.laterality_index(mixed, on_image_left, normal) == pytest.approx([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="one shape"):
        report.laterality_index(on_image_right[:2], on_image_left, normal)


def test_welch_t_matches_its_formula_and_rejects_degenerate_input():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    se = (np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4) ** 0.5
    assert report.welch_t(a, b) == pytest.approx((2.0 - 7.0) / se)
    assert report.welch_t(b, a) == pytest.approx(-report.welch_t(a, b))
    with pytest.raises(ValueError, match="at least 2 values"):
        report.welch_t([1.0], b)
    with pytest.raises(ValueError, match="constant"):
        report.welch_t([1.0, 1.0], [2.0, 2.0])


def test_mean_and_se():
    mean, se = report.mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(float(np.std([1, 2, 3, 6], ddof=1)) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        report.mean_and_se([1.0])


def test_prompt_effect_pairs_images_by_seed():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4, 1, 8, 8, generator=g)
    finding = normal.clone()
    finding[..., :2, 4:] += 1.0  # the same change for every seed
    control = normal + 0.01
    effect = report.prompt_effect(normal, finding, control)
    assert effect.finding == pytest.approx((8 / 64) ** 0.5)
    assert effect.control == pytest.approx(0.01)
    assert effect.seed == pytest.approx(float(report.rms_difference(normal[1:], normal[:-1]).mean()))
    assert effect.over_control == pytest.approx(effect.finding / 0.01)
    assert effect.over_seed == pytest.approx(effect.finding / effect.seed)
    # pairing matters: shuffling the seeds of the findings images makes the difference seed-sized
    shuffled = report.prompt_effect(normal, finding[[1, 2, 3, 0]], control)
    assert shuffled.finding > 3 * effect.finding
    with pytest.raises(ValueError, match="at least 2 seeds"):
        report.prompt_effect(normal[:1], finding[:1], control[:1])


def test_paired_gap_mean_and_standard_error():
    worse = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 5.0]])
    better = torch.zeros(3, 2)
    mean, se = report.paired_gap(worse, better)  # per-image means 2, 2, 5
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(float(np.std([2, 2, 5], ddof=1) / np.sqrt(3)))
    with pytest.raises(ValueError, match=">= 2 images"):
        report.paired_gap(worse[:1], better[:1])


def test_noise_prediction_errors_are_paired_by_seed_and_read_the_prompt():
    pipe = load_pipeline("offline", device="cpu")
    images = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 1, 64, 64)
    prompts = ["male, 45 years: normal"] * 3
    a = report.noise_prediction_errors(pipe, images, prompts, draws=2, seed=3)
    assert a.shape == (3, 2) and torch.isfinite(a).all() and (a > 0).all()
    assert torch.equal(a, report.noise_prediction_errors(pipe, images, prompts, draws=2, seed=3))
    assert not torch.equal(a, report.noise_prediction_errors(pipe, images, prompts, draws=2, seed=4))
    other = report.noise_prediction_errors(pipe, images, ["a red circle on the left"] * 3, draws=2, seed=3)
    assert not torch.allclose(a, other), "the text conditioning must reach the noise prediction"
    # a batch split does not change the numbers (each image keeps its own draws)
    torch.testing.assert_close(a, report.noise_prediction_errors(pipe, images, prompts, draws=2, seed=3, batch=2))
    with pytest.raises(ValueError, match="expected 3"):
        report.noise_prediction_errors(pipe, images, prompts[:2])


def test_rank_grid_groups_by_location_and_kind_and_averages_runs():
    a = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 3,
         "text_encoder.text_model.encoder.layers.0.mlp.fc1": 1,
         "text_encoder.text_model.encoder.layers.0.mlp.fc2": 2,
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 5}
    b = {**a, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 1}
    rows, cols, grid = report.rank_grid([a, b])
    assert rows == ["T 0", "U down0.0"]
    assert cols == ["text q", "text mlp", "attn2 k"]          # KIND_ORDER, only kinds present
    assert grid[0, 0] == 2.0                                   # (3 + 1) / 2 over runs
    assert grid[0, 1] == 1.5                                   # fc1, fc2 averaged (both runs)
    assert np.isnan(grid[1, 0]) and grid[1, 2] == 5.0
    with pytest.raises(ValueError, match="at least one run"):
        report.rank_grid([])


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, 12).astype(float)               # many ties
        b = a + rng.normal(0, 1.5, 12)
        if a.std() == 0:
            continue
        assert report.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        report.spearman([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="equal length"):
        report.spearman([1, 2], [1, 2, 3])
