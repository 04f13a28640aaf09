"""``python -m selora.data.montgomery --root DIR`` decodes every image and names each bad file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selora.data.images import png_problem
from selora.data.montgomery import main
from selora.data.phantom import make_phantom_set

BAD = "bad file: "


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mont-check")
    make_phantom_set(root, n_cases=12, n_normal=6, seed=3, size=(32, 40))
    return root


@pytest.fixture
def root(phantom, tmp_path) -> Path:
    shutil.copytree(phantom / "MontgomerySet", tmp_path / "MontgomerySet")
    return tmp_path


def _pngs(root: Path) -> list[Path]:
    return sorted((root / "MontgomerySet/CXR_png").glob("MCUCXR_*.png"))


def _spoil(pngs: list[Path]) -> dict[Path, str]:
    """Damage five images five ways; return path -> what the message must say."""
    data = pngs[0].read_bytes()
    pngs[0].write_bytes(data[: len(data) // 2])  # cut in the middle of the pixel data
    pngs[1].write_bytes(pngs[1].read_bytes()[:-12])  # pixels complete, IEND missing
    Image.fromarray(np.full((40, 32), 128, np.uint8)).save(pngs[2], format="JPEG")
    pngs[3].write_text("<html><body>404 Not Found</body></html>")
    spoilt = bytearray(pngs[4].read_bytes())
    spoilt[spoilt.index(b"IDAT") + 8] ^= 0xFF  # inside the first IDAT: its CRC no longer matches
    pngs[4].write_bytes(bytes(spoilt))
    return {pngs[0]: "truncated", pngs[1]: "IEND", pngs[2]: "JPEG", pngs[3]: "HTML", pngs[4]: "CRC"}


def test_all_good_exits_0_with_a_decode_summary(root, capsys):
    assert main(["--root", str(root)]) == 0
    captured = capsys.readouterr()
    assert "all 12 images decode" in captured.out and "cases: 12" in captured.out
    assert BAD not in captured.err


def test_each_bad_file_is_named_on_one_line_and_exit_2(root, capsys):
    expected = _spoil(_pngs(root))
    assert main(["--root", str(root)]) == 2
    captured = capsys.readouterr()
    bad = [line for line in captured.err.splitlines() if line.startswith(BAD)]
    assert len(bad) == len(expected), captured.err
    for path, why in expected.items():
        (line,) = [line for line in bad if str(path) in line]
        assert why in line, line
    assert "cases:" not in captured.out, "no summary for a set that cannot be used"
    assert "error: 5 of 12 images" in captured.err


def test_png_problem_reports_nothing_for_good_files(root):
    assert all(png_problem(p) is None for p in _pngs(root))


def test_damaged_chunk_length_is_not_read(root):
    png = _pngs(root)[0]
    data = bytearray(png.read_bytes())
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = b"\xff\xff\xff\xf0"  # a 4 GB chunk: must be refused, not allocated
    png.write_bytes(bytes(data))
    assert png_problem(png).startswith("truncated inside the IDAT chunk")


def test_real_process_exit_status(root):
    pngs = _pngs(root)
    pngs[2].write_bytes(pngs[2].read_bytes()[:200])
    out = subprocess.run(
        [sys.executable, "-m", "selora.data.montgomery", "--root", str(root)], capture_output=True, text=True
    )
    assert out.returncode == 2
    (line,) = [line for line in out.stderr.splitlines() if line.startswith(BAD)]
    assert line.startswith(f"{BAD}{pngs[2]}: ") and "truncated" in line
