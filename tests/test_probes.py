"""selora.book.probes: the paired-seed image differences of chapter 6 and the noise-prediction errors
under the true vs an altered prompt."""

from __future__ import annotations

import pytest
import torch

from selora.book import probes
from selora.models import load_pipeline


def test_rms_difference_and_side_fraction():
    a = torch.zeros(2, 1, 4, 6)
    b = a.clone()
    b[0, :, :, 4:] = 1.0  # image right (the patient's left) of the first pair
    b[1, :, :, :] = 0.5
    rms = probes.rms_difference(a, b)
    assert rms.tolist() == pytest.approx([(8 / 24) ** 0.5, 0.5])
    energy_right = 8 * 1.0 + 12 * 0.25  # squared differences on the image's right half (columns 3-5)
    assert probes.side_fraction(a, b, "left") == pytest.approx(energy_right / (8 + 24 * 0.25))
    assert probes.side_fraction(a, b, "left") + probes.side_fraction(a, b, "right") == pytest.approx(1.0)
    assert probes.side_fraction(a[1:], b[1:], "right") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="side='middle'"):
        probes.side_fraction(a, b, "middle")
    with pytest.raises(ValueError, match="identical"):
        probes.side_fraction(a, a, "left")
    with pytest.raises(ValueError, match="one shape"):
        probes.rms_difference(a, b[:1])


def test_laterality_index_reads_where_each_side_word_puts_its_change():
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(3, 1, 8, 8, generator=g)
    on_image_right, on_image_left = normal.clone(), normal.clone()
    on_image_right[..., 5:] += 1.0  # the patient's LEFT (radiological convention)
    on_image_left[..., :3] += 1.0  # the patient's right
    assert probes.laterality_index(on_image_right, on_image_left, normal) == pytest.approx([1.0] * 3)
    assert probes.laterality_index(on_image_left, on_image_right, normal) == pytest.approx([-1.0] * 3)
    assert probes.laterality_index(on_image_right, on_image_right, normal) == pytest.approx([0.0] * 3)
    mixed = on_image_right.clone()
    mixed[1] = on_image_left[1]  # seed 1 puts the "left" finding on the wrong side
    assert probes.laterality_index(mixed, on_image_left, normal) == pytest.approx([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="one shape"):
        probes.laterality_index(on_image_right[:2], on_image_left, normal)


def test_prompt_effect_pairs_images_by_seed():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4, 1, 8, 8, generator=g)
    finding = normal.clone()
    finding[..., :2, 4:] += 1.0  # the same change for every seed
    control = normal + 0.01
    effect = probes.prompt_effect(normal, finding, control)
    assert effect.finding == pytest.approx((8 / 64) ** 0.5)
    assert effect.control == pytest.approx(0.01)
    assert effect.seed == pytest.approx(float(probes.rms_difference(normal[1:], normal[:-1]).mean()))
    assert effect.over_control == pytest.approx(effect.finding / 0.01)
    assert effect.over_seed == pytest.approx(effect.finding / effect.seed)
    # pairing matters: shuffling the seeds of the findings images makes the difference seed-sized
    shuffled = probes.prompt_effect(normal, finding[[1, 2, 3, 0]], control)
    assert shuffled.finding > 3 * effect.finding
    with pytest.raises(ValueError, match="at least 2 seeds"):
        probes.prompt_effect(normal[:1], finding[:1], control[:1])


def test_noise_prediction_errors_are_paired_by_seed_and_read_the_prompt():
    pipe = load_pipeline("mini-sd", device="cpu")
    images = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 1, 64, 64)
    prompts = ["male, 45 years: normal"] * 3
    a = probes.noise_prediction_errors(pipe, images, prompts, draws=2, seed=3)
    assert a.shape == (3, 2) and torch.isfinite(a).all() and (a > 0).all()
    assert torch.equal(a, probes.noise_prediction_errors(pipe, images, prompts, draws=2, seed=3))
    assert not torch.equal(a, probes.noise_prediction_errors(pipe, images, prompts, draws=2, seed=4))
    other = probes.noise_prediction_errors(pipe, images, ["a red circle on the left"] * 3, draws=2, seed=3)
    assert not torch.allclose(a, other), "the text conditioning must reach the noise prediction"
    # a batch split does not change the numbers (each image keeps its own draws)
    torch.testing.assert_close(a, probes.noise_prediction_errors(pipe, images, prompts, draws=2, seed=3, batch=2))
    with pytest.raises(ValueError, match="expected 3"):
        probes.noise_prediction_errors(pipe, images, prompts[:2])
