"""Montgomery pipeline: readings -> prompts, split, images, cache, download/extract, CLI, bad input."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from selora.data import DataError, montgomery_root
from selora.data.images import load_image, read_gray, resize_center_crop
from selora.data.montgomery import (
    Case,
    MontgomeryDataset,
    download_montgomery,
    main,
    make_prompt,
    parse_readings,
    patient_groups,
    scan,
    split_indices,
)
from selora.data.phantom import make_phantom_set
from selora.data.split import grouped_split

PROMPT_RE = re.compile(r"^(male|female|other), \d+ years: \S.*$")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small phantom set (30 cases, 18 normal) plus its zip; returns the data root."""
    root = tmp_path_factory.mktemp("mont")
    make_phantom_set(root, n_cases=30, n_normal=18, seed=5, size=(64, 78), zip_archive=True)
    return root


@pytest.fixture
def root(phantom, tmp_path):
    """A private, writable copy of the phantom data root."""
    shutil.copytree(phantom / "MontgomerySet", tmp_path / "data" / "MontgomerySet")
    return tmp_path / "data"


def _readings(tmp_path, text: bytes | str, name="r.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ---- readings and prompts -------------------------------------------------------------------


def test_parse_readings_and_prompt_format(tmp_path):
    path = _readings(tmp_path, "Patient's Sex: F \nPatient's Age: 027Y\nnormal \n")
    sex, age, findings, same = parse_readings(path)
    assert (sex, age, findings, same) == ("F", 27, "normal", None)
    assert make_prompt(sex, age, findings, abnormal=False) == "female, 27 years: normal"


def test_parse_readings_real_quirks(tmp_path):
    path = _readings(
        tmp_path, "Patient's Sex: O\r\nPatient's Age: 064Y \r\n\r\nNO REPORT (same pt as MCUCXR_0162_1)\r\n"
    )
    sex, age, findings, same = parse_readings(path)
    assert (sex, age, same) == ("O", 64, "MCUCXR_0162_1")
    assert make_prompt(sex, age, findings, abnormal=True) == "other, 64 years: abnormal, no report"
    path = _readings(
        tmp_path,
        "Patient's Sex: M\nPatient's Age: 040Y\nright upper lobe cavity\n"
        "stable CXR since 6M; off Rx since 6M (same pt as MCUCXR_0113_1)\n",
    )
    sex, age, findings, same = parse_readings(path)
    assert same == "MCUCXR_0113_1"
    assert (
        make_prompt(sex, age, findings, True)
        == "male, 40 years: right upper lobe cavity stable cxr since 6m; off rx since 6m"
    )
    path = _readings(tmp_path, "Patient’s Sex: Female\nPatient’s Age: 18M\nnormal.\n")
    assert (
        parse_readings(path)[:2] == ("F", 1)
        and make_prompt(*parse_readings(path)[:3], False) == "female, 1 years: normal"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Patient's Age: 027Y\nnormal\n", "Sex"),
        ("Patient's Sex: F\nnormal\n", "Age"),
        ("Patient's Sex: F\nPatient's Age: 027Y\n   \n", "empty findings"),
    ],
)
def test_readings_missing_fields(tmp_path, text, expected):
    path = _readings(tmp_path, text)
    with pytest.raises(DataError, match=expected) as err:
        parse_readings(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_readings_not_utf8_decoded_tolerantly_with_a_warning(tmp_path):
    path = _readings(tmp_path, b"Patient\x92s Sex: F\nPatient's Age: 027Y\nnormal \xe9t\xe9\n")
    with pytest.warns(UserWarning, match=r"r\.txt: not UTF-8 \(byte 0x92 at offset 7\).*Windows-1252") as rec:
        assert parse_readings(path) == ("F", 27, "normal \u00e9t\u00e9", None)
    assert len(rec) == 1 and str(path) in str(rec[0].message)


@pytest.mark.parametrize(
    "raw",
    [
        "\ufeffPatient's Sex: M\r\nPatient's Age: 040Y\r\nnormal\r\n".encode(),  # UTF-8 with a BOM
        "Patient's Sex: M\r\nPatient's Age: 040Y\r\nnormal\r\n".encode("utf-16"),  # Notepad's "Unicode"
    ],
    ids=["utf-8-bom", "utf-16"],
)
def test_readings_with_a_byte_order_mark(tmp_path, raw, recwarn):
    assert parse_readings(_readings(tmp_path, raw)) == ("M", 40, "normal", None)
    assert not recwarn.list


def test_every_phantom_prompt_has_the_format(root):
    cases = scan(root)
    assert len(cases) == 30 and all(PROMPT_RE.match(c.prompt) for c in cases)
    assert sum(c.prompt.startswith("other,") for c in cases) == 1


# ---- split ------------------------------------------------------------------------------------


def _fake_cases(n_normal=80, n_abnormal=58, repeats=((0, 1), (2, 3), (80, 81), (82, 83), (83, 84))):
    """Cases without files: ids 0..n-1, (a, b) in ``repeats`` = b is the same patient as a."""
    names = [f"MCUCXR_{i:04d}_{int(i >= n_normal)}" for i in range(n_normal + n_abnormal)]
    same = {b: names[a] for a, b in repeats}
    return [Case(n, Path(n), Path(n), "F", 30, "x", same.get(i)) for i, n in enumerate(names)]


def test_split_80_20_stratified_grouped_deterministic():
    cases = _fake_cases()
    groups = patient_groups(cases)
    assert len(set(groups)) == 138 - 5 and groups[82] == groups[84], "same-pt links are transitive"
    splits = {seed: split_indices(cases, seed) for seed in range(10)}
    for s in splits.values():
        train, test = set(s["train"]), set(s["test"])
        assert not train & test and len(train | test) == 138
        assert abs(len(test) - 0.2 * 138) <= 2, len(test)
        assert abs(sum(cases[i].abnormal for i in test) - 0.2 * 58) <= 2, "not stratified"
        for i in range(138):  # one patient never straddles the split
            assert all((j in test) == (i in test) for j in range(138) if groups[j] == groups[i])
    assert split_indices(cases, 3) == splits[3]
    assert len({tuple(s["test"]) for s in splits.values()}) > 5, "seed does not change the split"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=80), st.integers(0, 99))
def test_grouped_split_invariants(groups, seed):
    """Any groups: splits partition the items, groups stay whole, sizes miss targets by < one group."""
    strata = [g % 3 == 0 for g in groups]  # a patient's scans share a class
    fractions = {"train": 0.8, "validation": 0.16, "test": 0.04}
    out = grouped_split(groups, fractions, seed, strata)
    assert sorted(i for v in out.values() for i in v) == list(range(len(groups)))
    where = {i: k for k, v in out.items() for i in v}
    assert all(where[i] == where[j] for i in range(len(groups)) for j in range(len(groups)) if groups[i] == groups[j])
    biggest = max(groups.count(g) for g in set(groups))
    for cls in (False, True):
        n = strata.count(cls)
        for k, f in fractions.items():
            got = sum(strata[i] == cls for i in out[k])
            assert abs(got - f * n) < biggest + 1, (k, cls, got, f * n)


# ---- images -----------------------------------------------------------------------------------


def test_8bit_and_12bit_png_give_the_same_image(tmp_path):
    rng = np.random.default_rng(0)
    v12 = (np.linspace(0, 4095, 80 * 60).reshape(80, 60) * rng.uniform(0.8, 1.0, (80, 60))).astype(np.uint16)
    v12[0, 0] = 4095
    Image.fromarray(v12).save(tmp_path / "a.png")
    Image.fromarray(np.round(v12 / 4095 * 255).astype(np.uint8)).save(tmp_path / "b.png")
    a, bits_a = read_gray(tmp_path / "a.png")
    b, bits_b = read_gray(tmp_path / "b.png")
    assert (bits_a, bits_b) == (12, 8)
    assert np.abs(a - b).max() <= 0.5 / 255 + 1e-6, "not the same image up to 8-bit quantisation"
    ta, tb = load_image(tmp_path / "a.png", 32), load_image(tmp_path / "b.png", 32)
    assert ta.shape == (1, 32, 32) and ta.min() >= -1 and ta.max() <= 1
    assert (ta - tb).abs().max() <= 1.0 / 255 + 1e-5


def test_resize_shortest_side_then_centre_crop():
    portrait = torch.zeros(200, 100)
    portrait[:, 50:] = 1.0  # right half bright
    portrait[:35], portrait[165:] = 0.5, 0.5  # top/bottom bands lie outside the centre crop
    out = resize_center_crop(portrait, 20)
    assert out.shape == (1, 20, 20)
    assert torch.allclose(out[0, :, :9], torch.tensor(-1.0)) and torch.allclose(out[0, :, 11:], torch.tensor(1.0))
    landscape = resize_center_crop(portrait.T.contiguous(), 20)
    assert torch.allclose(landscape[0, :9], torch.tensor(-1.0)) and torch.allclose(landscape[0, 11:], torch.tensor(1.0))


def _png(tmp_path, name, arr, fmt="PNG"):
    path = tmp_path / name
    Image.fromarray(arr).save(path, format=fmt)
    return path


def test_truncated_png(tmp_path):
    path = _png(tmp_path, "t.png", (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_gray(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_non_image_with_png_name(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("<html>not found</html>")
    with pytest.raises(DataError, match="not an image"):
        read_gray(path)


def test_rgb_converted_with_warning(tmp_path):
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    path = _png(tmp_path, "c.png", np.stack([gray] * 3, -1))
    with pytest.warns(UserWarning, match="RGB image"):
        arr, bits = read_gray(path)
    assert bits == 8 and np.allclose(arr * 255, gray, atol=0.5)


def test_jpeg_behind_png_name_decoded_by_content(tmp_path):
    gray = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    path = _png(tmp_path, "j.png", gray, fmt="JPEG")
    with pytest.warns(UserWarning, match="JPEG data"):
        arr, _ = read_gray(path)
    assert np.abs(arr * 255 - gray).mean() < 3


def test_image_without_readings(root):
    victim = sorted((root / "MontgomerySet/ClinicalReadings").glob("*.txt"))[4]
    victim.unlink()
    with pytest.raises(DataError, match="no readings file") as err:
        scan(root)
    assert victim.stem in str(err.value)


def test_stray_files_ignored(root):
    for folder in ("CXR_png", "ClinicalReadings"):
        (root / "MontgomerySet" / folder / ".DS_Store").write_bytes(b"\0\1")
        (root / "MontgomerySet" / folder / "Thumbs.db").write_bytes(b"\0\1")
    assert len(scan(root)) == 30


@pytest.mark.parametrize(
    "where, expected",
    [
        ("MontgomerySet", lambda r: f"point --root at {r}"),
        ("MontgomerySet/CXR_png", lambda r: f"point --root at {r}"),
        ("..", lambda r: f"point --root at {r}"),
    ],
)
def test_root_pointing_at_the_wrong_folder(root, where, expected):
    wrong = root.parent if where == ".." else root / where
    with pytest.raises(DataError, match=re.escape(expected(root))):
        scan(wrong)


# ---- dataset and cache --------------------------------------------------------------------------


def test_dataset_items_and_cache(root, tmp_path):
    cache = tmp_path / "cache"
    train = MontgomeryDataset(root, "train", size=48, cache_dir=cache)
    test = MontgomeryDataset(root, "test", size=48, cache_dir=cache)
    assert len(train) + len(test) == 30 and len(test) == 6
    assert not {c.case_id for c in train.cases} & {c.case_id for c in test.cases}
    item = train[0]
    assert item["image"].shape == (1, 48, 48) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1 and PROMPT_RE.match(item["prompt"])
    assert not train.from_cache and test.from_cache and len(list(cache.glob("*.safetensors"))) == 1
    uncached = MontgomeryDataset(root, "train", size=48, cache=False)
    assert torch.equal(uncached[3]["image"], train[3]["image"])
    before = [train[i]["image"] for i in range(len(train))]
    for png in (root / "MontgomerySet/CXR_png").glob("*.png"):
        png.unlink()  # later epochs read only the cache
    assert all(torch.equal(train[i]["image"], before[i]) for i in range(len(train)))


def test_cache_key_follows_sources_and_transform(root, tmp_path):
    cache = tmp_path / "cache"
    MontgomeryDataset(root, "all", size=32, cache_dir=cache)
    assert MontgomeryDataset(root, "all", size=32, cache_dir=cache).from_cache
    assert not MontgomeryDataset(root, "all", size=40, cache_dir=cache).from_cache
    png = sorted((root / "MontgomerySet/CXR_png").glob("*.png"))[0]
    arr = np.asarray(Image.open(png)).copy()
    arr[:8] = 0
    Image.fromarray(arr).save(png)
    changed = MontgomeryDataset(root, "all", size=32, cache_dir=cache)
    assert not changed.from_cache and len(list(cache.glob("*.safetensors"))) == 3


def test_bad_split_name(root, tmp_path):
    with pytest.raises(DataError, match="expected one of train, test"):
        MontgomeryDataset(root, "validation", cache_dir=tmp_path)


# ---- archive: download, checksum, safe extraction ------------------------------------------------


def _serve(files: dict[str, Path]):
    """A URL opener serving local files by URL; unknown URLs fail like a dead host."""
    calls = []

    def opener(url):
        calls.append(url)
        if url not in files:
            raise URLError("connection refused")
        return open(files[url], "rb")

    return opener, calls


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_extracts_and_is_idempotent(phantom, tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    archive = phantom / "NLM-MontgomeryCXRSet.zip"
    opener, calls = _serve({"https://mirror/x.zip": archive})
    urls = ("https://primary/x.zip", "https://mirror/x.zip")
    top = download_montgomery(tmp_path, sha256=_sha(archive), urls=urls, opener=opener)
    assert calls == list(urls), "primary tried first, mirror used"
    assert top == tmp_path / "MontgomerySet" and len(scan(tmp_path)) == 30
    assert not (tmp_path / "NLM-MontgomeryCXRSet.zip").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["MontgomerySet"], "no temp leftovers"
    download_montgomery(tmp_path, sha256=_sha(archive), urls=urls, opener=opener)
    assert len(calls) == 2, "second call must be a no-op"


def test_download_bad_checksum_deletes_and_explains(phantom, tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    archive = phantom / "NLM-MontgomeryCXRSet.zip"
    opener, _ = _serve({"u": archive})
    with pytest.raises(DataError) as err:
        download_montgomery(tmp_path, urls=("u",), opener=opener)  # default = the real set's checksum
    msg = str(err.value)
    assert "54601e95" in msg and _sha(archive) in msg and "sha256=" in msg and "--accept-sha256" in msg
    assert "SELORA_MONTGOMERY_SHA256=" in msg
    assert not any(tmp_path.iterdir()), "the bad download must be deleted"


def test_download_all_sources_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    opener, _ = _serve({})
    with pytest.raises(DataError, match="could not download .* from any source"):
        download_montgomery(tmp_path, urls=("a", "b"), opener=opener)
    assert not any(tmp_path.iterdir())


def test_download_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "offline")
    with pytest.raises(RuntimeError, match="offline"):
        download_montgomery(tmp_path, opener=_serve({})[0])


def _evil_zip(path, name, symlink=False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MontgomerySet/CXR_png/MCUCXR_0001_0.png", b"x")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = 0o120777 << 16
        zf.writestr(info, b"/etc/passwd" if symlink else b"pwned")
    return path


@pytest.mark.parametrize(
    "name, symlink, why",
    [
        ("MontgomerySet/../../evil.txt", False, "unsafe entry"),
        ("/abs/evil.txt", False, "unsafe entry"),
        ("MontgomerySet/link", True, "symbolic link"),
    ],
)
def test_unsafe_zip_entries_refused(tmp_path, name, symlink, why):
    bad = _evil_zip(tmp_path / "bad.zip", name, symlink)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=why):
        download_montgomery(out, source=bad)
    assert not (out / "MontgomerySet").exists() and not (tmp_path / "evil.txt").exists()


def test_local_zip_source_checked_against_pinned_or_accepted_checksum(phantom, tmp_path):
    archive = phantom / "NLM-MontgomeryCXRSet.zip"
    with pytest.raises(DataError, match="sha256 mismatch"):
        download_montgomery(tmp_path / "a", source=archive, sha256="0" * 64)
    with pytest.raises(DataError, match="sha256 mismatch, expected 54601e95"):
        download_montgomery(tmp_path / "a", source=archive)  # no silent pass without a checksum
    assert archive.is_file(), "a user's local zip is never deleted"
    with pytest.warns(UserWarning, match="not the pinned"):
        assert len(scan(download_montgomery(tmp_path / "b", source=archive, sha256=_sha(archive)).parent)) == 30


# ---- CLI and the profile helper ----------------------------------------------------------------


def test_cli_summary(phantom, capsys):
    assert main(["--root", str(phantom)]) == 0
    out = capsys.readouterr().out
    assert "cases: 30 (18 normal, 12 abnormal)" in out and "test: 6" in out and "12-bit" in out
    assert len(re.findall(r"prompt: ", out)) == 3


def test_cli_from_zip_and_errors(phantom, tmp_path, capsys):
    archive = phantom / "NLM-MontgomeryCXRSet.zip"
    with pytest.warns(UserWarning, match="not the pinned"):
        assert main(["--root", str(tmp_path / "r"), "--from-zip", str(archive), "--accept-sha256", _sha(archive)]) == 0
    assert "cases: 30" in capsys.readouterr().out
    assert main(["--root", str(tmp_path / "s"), "--from-zip", str(archive), "--accept-sha256", "ab" * 32]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and len(err.strip().splitlines()) == 1
    wrong_root = str(tmp_path / "r" / "MontgomerySet")
    bad = subprocess.run(
        [sys.executable, "-m", "selora.data.montgomery", "--root", wrong_root], capture_output=True, text=True
    )  # the real process: exit status and one line
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "point --root at" in bad.stderr


def test_montgomery_root_offline_builds_phantom_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path))
    root = montgomery_root("offline", phantom_size=(48, 58))
    assert root.is_relative_to(tmp_path) and len(scan(root)) == 138
    stamp = (root / "MontgomerySet/CXR_png").stat().st_mtime_ns
    assert montgomery_root("offline", phantom_size=(48, 58)) == root
    assert (root / "MontgomerySet/CXR_png").stat().st_mtime_ns == stamp


def test_a_validation_split_is_carved_from_the_training_scans(phantom):
    """validation > 0 moves about that share of the TRAINING scans (whole patients) to a validation
    split; the test split is the paper's, unchanged."""
    cases = scan(phantom)
    plain, carved = split_indices(cases, seed=3), split_indices(cases, seed=3, validation=0.25)
    assert carved["test"] == plain["test"]
    assert sorted(carved["train"] + carved["validation"]) == plain["train"]
    assert not set(carved["train"]) & set(carved["validation"])
    assert abs(len(carved["validation"]) - 0.25 * len(plain["train"])) <= 2  # whole patients move
    patients = patient_groups(cases)
    for a, b in (("train", "validation"), ("validation", "test")):
        assert not {patients[i] for i in carved[a]} & {patients[i] for i in carved[b]}, f"a patient in {a} and {b}"
    ds = MontgomeryDataset(phantom, "validation", size=16, seed=3, validation=0.25, cache=False)
    assert [c.case_id for c in ds.cases] == [cases[i].case_id for i in carved["validation"]]
    with pytest.raises(DataError, match="split='validation': expected one of train, test, all"):
        MontgomeryDataset(phantom, "validation", size=16, cache=False)
