"""The Montgomery County chest X-ray set (NLM): download, readings -> prompts, split, Dataset, CLI.

Data root layout (what ``NLM-MontgomeryCXRSet.zip`` extracts to)::

    <root>/MontgomerySet/CXR_png/MCUCXR_####_{0|1}.png          (suffix 1 = tuberculosis)
    <root>/MontgomerySet/ClinicalReadings/MCUCXR_####_{0|1}.txt
    <root>/MontgomerySet/ManualMask/{leftMask,rightMask}/*.png

Prompt format (sex + age + findings, lower case; PROMPT_FORMAT): ``"female, 27 years: normal"``.
Sex ``O`` becomes ``other``; a ``(same pt as MCUCXR_…)`` note is dropped from the prompt (it
only links scans of one patient for the split); ``NO REPORT`` becomes ``abnormal, no report``.

    python -m selora.data.montgomery --root DIR [--from-zip ZIP [--sha256 HEX]]
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from selora.data.archive import Opener, download, open_url, safe_extract, verify_sha256
from selora.data.cache import ImageStack
from selora.data.errors import DataError
from selora.data.images import read_gray
from selora.data.split import grouped_split

URLS = (
    "https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip",
    "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
    "Montgomery-County-CXR-Set/MontgomerySet/NLM-MontgomeryCXRSet.zip",
)
ZIP_NAME = "NLM-MontgomeryCXRSet.zip"
# NLM publishes no checksum; this is the value recorded by torch_em for the archive it downloads.
SHA256 = "54601e952315d8f67383e9202a6e145997ade429f54f7e0af44b4e158714f424"
TOP = "MontgomerySet"
PROMPT_FORMAT = "{sex}, {age} years: {findings}"
SEXES = {"F": "female", "M": "male", "O": "other"}
SPLITS = {"train": 0.8, "test": 0.2}
NAME_RE = re.compile(r"^MCUCXR_\d{4}_[01]$")
SEX_RE = re.compile(r"patient['’]?s\s+sex\s*:\s*(f|m|o|female|male|other)\b", re.I)
AGE_RE = re.compile(r"patient['’]?s\s+age\s*:\s*(\d+)\s*([YMD]?)", re.I)
SAME_RE = re.compile(r"\(?\s*same\s+p(?:a)?t(?:ient)?\.?\s+as\s+(MCUCXR_\d{4}_[01])\s*\)?", re.I)
STRAY = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Case:
    """One scan: file paths, the parsed reading and its prompt."""

    case_id: str
    image: Path
    readings: Path
    sex: str  # "F", "M" or "O" as written in the readings
    age: int  # years
    findings: str  # free text as written (whitespace collapsed)
    same_as: str | None  # "MCUCXR_…" when the readings say "same pt as …"

    @property
    def abnormal(self) -> bool:
        """File-name suffix 1 = tuberculosis findings."""
        return self.case_id.endswith("_1")

    @property
    def prompt(self) -> str:
        """The text condition, :data:`PROMPT_FORMAT`."""
        return make_prompt(self.sex, self.age, self.findings, self.abnormal)


def make_prompt(sex: str, age: int, findings: str, abnormal: bool) -> str:
    """``"female, 27 years: normal"``: sex word, age in years, findings without linkage notes."""
    text = SAME_RE.sub("", findings)
    text = re.sub(r"\s+", " ", text).strip(" ;,.").lower()
    if text in ("", "no report"):
        text = "abnormal, no report" if abnormal else "normal"
    return PROMPT_FORMAT.format(sex=SEXES[sex.upper()], age=age, findings=text)


def parse_readings(path: Path) -> tuple[str, int, str, str | None]:
    """Parse a ``ClinicalReadings`` file into (sex, age in years, findings, same-patient id or None).

    Tolerates trailing spaces, blank and extra lines (joined into the findings), sex ``O``.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); expected ASCII/UTF-8 readings"
        ) from None
    sex = SEX_RE.search(text)
    age = AGE_RE.search(text)
    if sex is None:
        raise DataError(f'{path}: no "Patient\'s Sex: F|M|O" line')
    if age is None:
        raise DataError(f'{path}: no "Patient\'s Age: 027Y" line')
    years = int(age.group(1)) // (12 if age.group(2).upper() == "M" else 1)
    if age.group(2).upper() == "D":
        years = 0
    rest = [ln.strip() for ln in text.splitlines() if ln.strip() and not (SEX_RE.search(ln) or AGE_RE.search(ln))]
    findings = re.sub(r"\s+", " ", " ".join(rest)).strip()
    if not findings:
        raise DataError(f"{path}: empty findings; expected a third line such as 'normal'")
    same = SAME_RE.search(findings)
    return sex.group(1)[0].upper(), years, findings, same.group(1).upper() if same else None


def data_dir(root: Path) -> Path:
    """``root/MontgomerySet`` after checking the layout; a wrong ``root`` says which one is right."""
    root = Path(root)
    top = root / TOP
    if (top / "CXR_png").is_dir():
        if not (top / "ClinicalReadings").is_dir():
            raise DataError(f"{top}: no ClinicalReadings/ folder beside CXR_png/")
        return top
    expected = "the folder holding MontgomerySet/ (where the zip was extracted)"
    if root.name == TOP or (root / "CXR_png").is_dir():
        raise DataError(f"{root} is the MontgomerySet folder itself; point --root at {root.parent}, {expected}")
    if root.name in ("CXR_png", "ClinicalReadings", "ManualMask"):
        raise DataError(f"{root} is inside the data set; point --root at {root.parent.parent}, {expected}")
    nested = sorted(p.parent for p in root.glob(f"*/{TOP}") if p.is_dir())
    if nested:
        raise DataError(f"{root} is above the data root; point --root at {nested[0]}, {expected}")
    raise DataError(f"{root}: no {TOP}/CXR_png/ found; expected {expected}")


def scan(root: Path) -> list[Case]:
    """All cases under ``root``, sorted by id; stray files (.DS_Store, Thumbs.db) are ignored."""
    top = data_dir(root)
    cases = []
    for image in sorted((top / "CXR_png").iterdir()):
        if image.name.lower() in STRAY or image.name.startswith(".") or image.suffix.lower() != ".png":
            continue
        if not NAME_RE.match(image.stem):
            warnings.warn(f"{image}: name is not MCUCXR_####_0|1.png; ignored", stacklevel=2)
            continue
        readings = top / "ClinicalReadings" / f"{image.stem}.txt"
        if not readings.is_file():
            raise DataError(f"{image}: no readings file; expected {readings}")
        cases.append(Case(image.stem, image, readings, *parse_readings(readings)))
    if not cases:
        raise DataError(f"{top / 'CXR_png'}: no MCUCXR_####_0|1.png images")
    return cases


def patient_groups(cases: Sequence[Case]) -> list[str]:
    """Per case, a patient key: cases linked by "same pt as" (transitively) share one key."""
    parent = {c.case_id: c.case_id for c in cases}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for c in cases:
        if c.same_as:
            parent[find(c.case_id)] = find(c.same_as)
    return [find(c.case_id) for c in cases]


def split_indices(cases: Sequence[Case], seed: int = 0) -> dict[str, list[int]]:
    """80/20 train/test, stratified normal/abnormal, grouped by patient, deterministic in ``seed``."""
    return grouped_split(patient_groups(cases), SPLITS, seed, strata=[c.abnormal for c in cases])


class MontgomeryDataset(Dataset):
    """Map-style Montgomery data set.

    ``ds[i]`` = ``{"image": (1, size, size) float in [-1, 1], "prompt": str, "case_id": str,
    "abnormal": bool}``. Images are resized (shortest side -> size) and centre-cropped once and
    kept in a safetensors cache under ``cache_dir`` (default ``selora.paths.cache_dir("data",
    "preprocessed")``); ``cache=False`` decodes the PNG on every access instead.
    """

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        size: int = 224,
        seed: int = 0,
        cache: bool = True,
        cache_dir: Path | str | None = None,
    ) -> None:
        if split not in (*SPLITS, "all"):
            raise DataError(f"split={split!r}: expected one of {', '.join((*SPLITS, 'all'))}")
        all_cases = scan(Path(root))
        self.keep = list(range(len(all_cases))) if split == "all" else split_indices(all_cases, seed)[split]
        self.cases = [all_cases[i] for i in self.keep]
        # One stack for all cases, so train and test share a single cache file.
        self.pixels = ImageStack([c.image for c in all_cases], size, "montgomery", cache, cache_dir)
        self.from_cache, self.cache_path = self.pixels.from_cache, self.pixels.path

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        image = self.pixels[self.keep[i]]
        return {"image": image, "prompt": case.prompt, "case_id": case.case_id, "abnormal": case.abnormal}


def download_montgomery(
    root: Path | str,
    source: Path | str | None = None,
    sha256: str | None = None,
    urls: Sequence[str] = URLS,
    opener: Opener = open_url,
) -> Path:
    """Make ``root/MontgomerySet`` exist and return it; a no-op when it already does.

    Without ``source`` the archive is downloaded (first working URL of ``urls``, fetched with
    ``opener``), checked against ``sha256`` (default :data:`SHA256`) and deleted after a safe,
    atomic extraction. With ``source`` (a local zip) that file is extracted instead, checked only
    if ``sha256`` is given, and never deleted. A mismatch says expected vs got and how to accept
    a re-packed archive deliberately: pass the new checksum as ``sha256=`` (CLI: ``--sha256``).
    """
    root = Path(root)
    if (root / TOP).is_dir():
        return root / TOP
    override = "accept it deliberately with download_montgomery(..., sha256='{got}') or --sha256 {got}"
    if source is not None:
        archive = Path(source)
        if not archive.is_file():
            raise DataError(f"{archive}: no such zip file")
        if sha256:
            verify_sha256(archive, sha256, override, delete=False)
        return safe_extract(archive, root, TOP)
    from selora.profile import require_online

    require_online("downloading the Montgomery set")
    archive = download(urls, root / ZIP_NAME, opener=opener)
    verify_sha256(archive, sha256 or SHA256, override, delete=True)
    out = safe_extract(archive, root, TOP)
    archive.unlink()
    return out


def summarise(root: Path | str, size: int = 224, seed: int = 0) -> dict:
    """Counts, split sizes, example prompts, image size and bit depth of a data root."""
    cases = scan(Path(root))
    split = split_indices(cases, seed)
    pixels, bits = read_gray(cases[0].image)
    return {
        "cases": len(cases),
        "normal": sum(not c.abnormal for c in cases),
        "abnormal": sum(c.abnormal for c in cases),
        "patients": len(set(patient_groups(cases))),
        "split": {k: {"n": len(v), "abnormal": sum(cases[i].abnormal for i in v)} for k, v in split.items()},
        "examples": [cases[i].prompt for i in (0, len(cases) // 2, len(cases) - 1)],
        "image": {"width": pixels.shape[1], "height": pixels.shape[0], "bits": bits, "model_size": size},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: check and summarise a data root; exit 0, or print a one-line error and exit 2."""
    ap = argparse.ArgumentParser(prog="python -m selora.data.montgomery", description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="folder holding MontgomerySet/")
    ap.add_argument("--from-zip", type=Path, help="extract this local NLM-MontgomeryCXRSet.zip into --root first")
    ap.add_argument("--sha256", help="expected sha256 of --from-zip (checked only when given)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.sha256 and not args.from_zip:
        ap.error("--sha256 needs --from-zip")
    try:
        if args.from_zip:
            download_montgomery(args.root, source=args.from_zip, sha256=args.sha256)
        s = summarise(args.root, args.size, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Montgomery data root {args.root}")
    print(f"  cases: {s['cases']} ({s['normal']} normal, {s['abnormal']} abnormal), {s['patients']} patients")
    for name, part in s["split"].items():
        print(f"  {name}: {part['n']} ({part['abnormal']} abnormal)")
    img = s["image"]
    print(f"  first image: {img['width']}x{img['height']}, {img['bits']}-bit -> model input {img['model_size']}px")
    for prompt in s["examples"]:
        print(f"  prompt: {prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
