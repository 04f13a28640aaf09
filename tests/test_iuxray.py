"""IU X-ray loader on generated fixtures in both layouts: frontal only, findings, split by report."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from selora.data import DataError
from selora.data.iuxray import IUXrayDataset, scan_iuxray, split_studies

N_REPORTS = 50
FRONTAL, LATERAL = 200, 40  # pixel values that tell the views apart


def _findings(uid: int) -> str:
    return "" if uid % 10 == 0 else f"The heart size is normal. Report {uid}  has\n  no focal consolidation."


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 36), value, np.uint8)).save(path)


def _projections(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uid", "filename", "projection"])
        writer.writerows(rows)


def make_openi(root, lateral_first=False, with_projections=False):
    """``ecgen-radiology/<uid>.xml`` + ``NLMCXR_png``; report uid has a frontal and a lateral image."""
    rows = []
    for uid in range(1, N_REPORTS + 1):
        front, lat = f"CXR{uid}_1_IM-{uid:04d}-4001", f"CXR{uid}_1_IM-{uid:04d}-3001"
        order = [lat, front] if lateral_first else [front, lat]
        images = "".join(f'<parentImage id="{i}"><figureId>F{k}</figureId></parentImage>' for k, i in enumerate(order))
        xml = (
            f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{uid}"/><MedlineCitation><Article>'
            f'<Abstract><AbstractText Label="COMPARISON">None.</AbstractText>'
            f'<AbstractText Label="FINDINGS">{_findings(uid)}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">Normal chest.</AbstractText></Abstract></Article>'
            f"</MedlineCitation>{images}</eCitation>"
        )
        (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
        (root / "ecgen-radiology" / f"{uid}.xml").write_text(xml, encoding="utf-8")
        _png(root / "NLMCXR_png" / f"{front}.png", FRONTAL)
        _png(root / "NLMCXR_png" / f"{lat}.png", LATERAL)
        rows += [
            (uid, f"{uid}_IM-{uid:04d}-4001.dcm.png", "Frontal"),
            (uid, f"{uid}_IM-{uid:04d}-3001.dcm.png", "Lateral"),
        ]
    if with_projections:
        _projections(root / "indiana_projections.csv", rows)
    return root


def make_csv(root):
    """``indiana_reports.csv`` + ``indiana_projections.csv`` + ``images/images_normalized``."""
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "indiana_reports.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        for uid in range(1, N_REPORTS + 1):
            writer.writerow([uid, "normal", "normal", "Xray Chest PA and Lateral", "", "", _findings(uid), "Normal."])
            for k, (view, value) in enumerate((("Lateral", LATERAL), ("Frontal", FRONTAL))):
                name = f"{uid}_IM-{uid:04d}-{3001 + k}.dcm.png"
                _png(root / "images" / "images_normalized" / name, value)
                rows.append((uid, name, view))
    _projections(root / "indiana_projections.csv", rows)
    return root


@pytest.mark.parametrize("layout", ["openi", "openi_projections", "csv"])
def test_frontal_only_findings_as_prompt(tmp_path, layout):
    if layout == "csv":
        make_csv(tmp_path)
    else:
        make_openi(tmp_path, lateral_first=layout == "openi_projections", with_projections=layout != "openi")
    studies = scan_iuxray(tmp_path)
    assert len(studies) == N_REPORTS - N_REPORTS // 10, "reports without findings are skipped"
    for s in studies:
        assert np.asarray(Image.open(s.image)).max() == FRONTAL, f"{s.image.name} is not the frontal view"
        assert s.prompt == f"The heart size is normal. Report {s.uid} has no focal consolidation."


def test_split_80_16_4_by_report(tmp_path):
    make_csv(tmp_path)
    studies = scan_iuxray(tmp_path)
    duplicate = studies[0].__class__(studies[0].uid, studies[1].image, "second frontal of report 1")
    studies = studies + [duplicate]  # one report with two frontal images
    split = split_studies(studies, seed=0)
    sizes = {k: len(v) for k, v in split.items()}
    assert sum(sizes.values()) == len(studies) == 46
    assert abs(sizes["train"] - 0.8 * 46) <= 1 and abs(sizes["validation"] - 0.16 * 46) <= 1
    assert abs(sizes["test"] - 0.04 * 46) <= 1
    uids = {k: {studies[i].uid for i in v} for k, v in split.items()}
    assert not (uids["train"] & uids["validation"] or uids["train"] & uids["test"] or uids["validation"] & uids["test"])
    assert split_studies(studies, seed=0) == split and split_studies(studies, seed=1) != split


def test_dataset_items(tmp_path):
    make_openi(tmp_path / "data")
    ds = IUXrayDataset(tmp_path / "data", "validation", size=32, cache_dir=tmp_path / "cache")
    item = ds[0]
    assert len(ds) == 7 and item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    expected = FRONTAL / 255 * 2 - 1
    assert torch.allclose(item["image"], torch.tensor(expected), atol=2e-3) and "Report" in item["prompt"]
    assert IUXrayDataset(tmp_path / "data", "validation", size=32, cache_dir=tmp_path / "cache").from_cache


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no IU X-ray layout found"):
        scan_iuxray(tmp_path)
    make_openi(tmp_path / "o")
    (tmp_path / "o" / "ecgen-radiology" / "7.xml").write_text("<eCitation><unclosed>", encoding="utf-8")
    with pytest.raises(DataError, match=r"7\.xml: not well-formed XML"):
        scan_iuxray(tmp_path / "o")
    make_csv(tmp_path / "c")
    text = (tmp_path / "c" / "indiana_projections.csv").read_text().replace("projection", "view", 1)
    (tmp_path / "c" / "indiana_projections.csv").write_text(text)
    with pytest.raises(DataError, match="indiana_projections.csv: missing column.*projection"):
        scan_iuxray(tmp_path / "c")


def test_missing_images_warned_and_skipped(tmp_path):
    make_openi(tmp_path)
    (tmp_path / "NLMCXR_png" / "CXR1_1_IM-0001-4001.png").unlink()
    with pytest.warns(UserWarning, match="1 referenced image"):
        studies = scan_iuxray(tmp_path)
    assert len(studies) == N_REPORTS - N_REPORTS // 10 - 1
