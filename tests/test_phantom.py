"""The phantom Montgomery set: layout, quirks, determinism, and images that carry the prompt."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from selora.data.phantom import PHRASES, SIDES, main, make_phantom_set, random_patient, render


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The default phantom set (138 cases, 256x312), written once for this module."""
    return make_phantom_set(tmp_path_factory.mktemp("phantom"))


def _readings(top):
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted((top / "ClinicalReadings").glob("*.txt"))}


def test_layout_counts_and_bit_depth(default_set):
    images = sorted((default_set / "CXR_png").glob("MCUCXR_*.png"))
    assert len(images) == 138
    assert sum(p.stem.endswith("_0") for p in images) == 80
    assert all(re.fullmatch(r"MCUCXR_\d{4}_[01]", p.stem) for p in images)
    for sub in ("ClinicalReadings", "ManualMask/leftMask", "ManualMask/rightMask"):
        assert sorted(p.stem for p in (default_set / sub).iterdir() if p.suffix in (".txt", ".png")) == [
            p.stem for p in images
        ]
    with Image.open(images[0]) as img:
        arr = np.asarray(img)
        assert img.size == (256, 312), "portrait width x height"
        assert img.mode.startswith("I"), img.mode
    assert 255 < arr.max() <= 4095, "12-bit values in a 16-bit PNG"
    with Image.open(default_set / "ManualMask/leftMask" / images[0].name) as mask:
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) == {0, 255}


def test_real_file_quirks(default_set):
    texts = _readings(default_set)
    assert all(t.startswith("Patient's Sex: ") and t.splitlines()[0].endswith(" ") for t in texts.values())
    assert all(re.search(r"^Patient's Age: \d{3}Y$", t, re.M) for t in texts.values())
    assert sum("Patient's Sex: O" in t for t in texts.values()) == 1
    same = [t for t in texts.values() if "(same pt as MCUCXR_" in t]
    assert len(same) == 3 and sum("NO REPORT" in t for t in same) == 1
    for name, text in texts.items():  # a repeat scan shows the same sex as the scan it refers to
        ref = re.search(r"same pt as (MCUCXR_\d{4}_[01])", text)
        if ref:
            assert text.splitlines()[0] == texts[ref.group(1)].splitlines()[0], name
    assert (default_set / "CXR_png" / "Thumbs.db").is_file() and (default_set / "ManualMask" / ".DS_Store").is_file()


def test_deterministic_from_seed(tmp_path):
    a = make_phantom_set(tmp_path / "a", n_cases=8, n_normal=4, seed=3, size=(64, 78))
    b = make_phantom_set(tmp_path / "b", n_cases=8, n_normal=4, seed=3, size=(64, 78))
    c = make_phantom_set(tmp_path / "c", n_cases=8, n_normal=4, seed=4, size=(64, 78))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sorted(p.name for p in (a / "CXR_png").iterdir()) != sorted(p.name for p in (c / "CXR_png").iterdir())


def _at_64(img: np.ndarray) -> np.ndarray:
    """What a 64-px model sees: shortest side to 64, centre crop."""
    from selora.data.images import resize_center_crop

    return (resize_center_crop(torch.from_numpy(img), 64)[0].numpy() + 1) / 2


@pytest.mark.parametrize("kind", sorted(PHRASES))
@pytest.mark.parametrize("side", SIDES)
def test_findings_drawn_where_the_reading_says(kind, side):
    """Patient's right = image left; the change is visible (>= 0.1 of full range) at 64 px."""
    base = random_patient(np.random.default_rng(1), abnormal=False)
    sick = dataclasses.replace(base, findings=[(kind, side)])
    clean, _ = render(base, (256, 312), np.random.default_rng(7))
    ill, _ = render(sick, (256, 312), np.random.default_rng(7))
    diff = np.abs(_at_64(ill) - _at_64(clean))
    assert diff.max() > 0.1, f"{kind} {side} invisible at 64 px"
    ys, xs = np.nonzero(diff > 0.05)
    centre_x = xs.mean() / diff.shape[1]
    assert (centre_x < 0.5) if side == "right" else (centre_x > 0.5), f"{kind} {side} drawn on the wrong side"
    centre_y = ys.mean() / diff.shape[0]
    if kind in ("cavity", "infiltrate", "scarring"):
        assert centre_y < 0.45, f"{kind} should sit in the upper zone"
    if kind == "effusion":
        assert centre_y > 0.55, "effusion should sit at the lung base"


def test_sex_and_age_are_visible(default_set):
    """Women have a narrower trunk; bone brightness (spine over the mediastinum) falls with age."""
    widths, bones, ages, sexes = [], [], [], []
    for name, text in _readings(default_set).items():
        sex = re.search(r"Sex: (\w)", text).group(1)
        if sex == "O":
            continue
        with Image.open(default_set / "CXR_png" / f"{name}.png") as img:
            arr = np.asarray(img, dtype=np.float32) / 4095
        h, w = arr.shape
        widths.append((arr[int(0.45 * h)] > 0.2).sum() / w)
        spine = arr[int(0.2 * h) : int(0.32 * h), int(0.48 * w) : int(0.52 * w)].mean()
        beside = arr[int(0.2 * h) : int(0.32 * h), int(0.445 * w) : int(0.455 * w)].mean()
        bones.append(spine - beside)
        ages.append(int(re.search(r"Age: (\d+)", text).group(1)))
        sexes.append(sex)
    widths, sexes = np.array(widths), np.array(sexes)
    assert widths[sexes == "F"].mean() < widths[sexes == "M"].mean() - 0.03, "habitus does not show sex"
    assert np.corrcoef(ages, bones)[0, 1] < -0.7, "bone density does not fall with age"


def test_cli_writes_set_and_refuses_existing(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--cases", "10", "--normal", "6", "--size", "64x80", "--zip"]) == 0
    assert len(list((tmp_path / "MontgomerySet" / "CXR_png").glob("*.png"))) == 10
    assert (tmp_path / "NLM-MontgomeryCXRSet.zip").is_file()
    assert main(["--out", str(tmp_path), "--cases", "10", "--normal", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err


def test_cli_bad_counts_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--cases", "10", "--normal", "8"]) == 2
    assert "n_normal" in capsys.readouterr().err and not (tmp_path / "MontgomerySet").exists()


def test_cli_bad_size_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "selora.data.phantom", "--out", str(tmp_path), "--size", "big"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "WIDTHxHEIGHT" in proc.stderr
    assert not (tmp_path / "MontgomerySet").exists()
