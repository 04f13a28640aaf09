"""The Montgomery County chest X-ray set (NLM): download, readings -> prompts, split, Dataset, CLI.

Data root layout (what ``NLM-MontgomeryCXRSet.zip`` extracts to)::

    <root>/MontgomerySet/CXR_png/MCUCXR_####_{0|1}.png          (suffix 1 = tuberculosis)
    <root>/MontgomerySet/ClinicalReadings/MCUCXR_####_{0|1}.txt
    <root>/MontgomerySet/ManualMask/{leftMask,rightMask}/*.png

Prompt format (sex + age + findings, lower case; PROMPT_FORMAT): ``"female, 27 years: normal"``.
Sex ``O`` becomes ``other``; a ``(same pt as MCUCXR_…)`` note is dropped from the prompt (it
only links scans of one patient for the split); ``NO REPORT`` becomes ``abnormal, no report``.

Getting the archive (:func:`download_montgomery`; ``montgomery_root()`` calls it for the paper
profile with ``root = selora.paths.cache_dir("data", "montgomery")``), first match wins:

1. ``root/MontgomerySet`` already exists: nothing to do;
2. ``root/NLM-MontgomeryCXRSet.zip`` exists (e.g. downloaded in a browser and put there): it is
   checked and extracted, and kept;
3. otherwise the URLs are tried in order; a source that answers with something other than a zip
   of this layout, or with a different checksum, is skipped for the next one.

Every archive is checked in this order: zip magic bytes, size, entries (safe, and the Montgomery
layout), then the sha256 against :data:`SHA256`. NLM publishes no checksum; if it re-packs the
archive the checksum changes and the download stops, showing expected vs got. To accept a new
archive deliberately, pass its checksum: ``SELORA_MONTGOMERY_SHA256=<hex>`` in the environment,
``--accept-sha256 <hex>`` here, or ``download_montgomery(..., sha256=<hex>)``.

    python -m selora.data.montgomery [--root DIR] [--download | --from-zip ZIP] [--accept-sha256 HEX]

checks a data root (default: the paper profile's), decoding every image: each truncated or
non-PNG file is named on its own line and the exit status is 2; 0 with a summary when all is well.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from selora.data.archive import Opener, check_zip, download, open_url, safe_extract, verify_sha256
from selora.data.cache import ImageStack
from selora.data.errors import ChecksumMismatch, DataError, DownloadFailed
from selora.data.images import check_images, read_gray
from selora.data.readings import decode_readings
from selora.data.split import carve, grouped_split

URLS = (
    "https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip",
    "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/"
    "Montgomery-County-CXR-Set/MontgomerySet/NLM-MontgomeryCXRSet.zip",
)
ZIP_NAME = "NLM-MontgomeryCXRSet.zip"
# NLM publishes no checksum; this is the value recorded by torch_em for the archive it downloads.
SHA256 = "54601e952315d8f67383e9202a6e145997ade429f54f7e0af44b4e158714f424"
SIZE = 616_853_875  # bytes, the archive of SHA256
SHA256_ENV = "SELORA_MONTGOMERY_SHA256"  # the deliberate way to accept a re-packed archive
TOP = "MontgomerySet"
PROMPT_FORMAT = "{sex}, {age} years: {findings}"
SEXES = {"F": "female", "M": "male", "O": "other"}
SPLITS = {"train": 0.8, "test": 0.2}
NAME_RE = re.compile(r"^MCUCXR_\d{4}_[01]$")
SEX_RE = re.compile(r"patient['’]?s\s+sex\s*:\s*(f|m|o|female|male|other)\b", re.I)
AGE_RE = re.compile(r"patient['’]?s\s+age\s*:\s*(\d+)\s*([YMD]?)", re.I)
SAME_RE = re.compile(r"\(?\s*same\s+p(?:a)?t(?:ient)?\.?\s+as\s+(MCUCXR_\d{4}_[01])\s*\)?", re.I)
STRAY = {".ds_store", "thumbs.db", "desktop.ini"}
LAYOUT = {  # entries a Montgomery archive must have, at least one of each
    f"{TOP}/CXR_png/MCUCXR_####_0|1.png": re.compile(rf"^{TOP}/CXR_png/MCUCXR_\d{{4}}_[01]\.png$"),
    f"{TOP}/ClinicalReadings/MCUCXR_####_0|1.txt": re.compile(rf"^{TOP}/ClinicalReadings/MCUCXR_\d{{4}}_[01]\.txt$"),
}
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


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

    Tolerates trailing spaces, blank and extra lines (joined into the findings), sex ``O``, a
    byte-order mark (UTF-8 or UTF-16) and text that is not UTF-8 (see :func:`selora.data.readings.decode_readings`).
    """
    text = decode_readings(path, path.read_bytes())
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


def split_indices(cases: Sequence[Case], seed: int = 0, validation: float = 0.0) -> dict[str, list[int]]:
    """80/20 train/test, stratified normal/abnormal, grouped by patient, deterministic in ``seed``;
    ``validation`` > 0 carves that share of the TRAINING scans into a ``validation`` split (:func:`carve`)."""
    groups, strata = patient_groups(cases), [c.abnormal for c in cases]
    splits = grouped_split(groups, SPLITS, seed, strata=strata)
    return carve(splits, "train", "validation", validation, groups, strata, seed) if validation > 0 else splits


class MontgomeryDataset(Dataset):
    """Map-style Montgomery data set (splits of :func:`split_indices`; ``validation``: its share).

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
        validation: float = 0.0,
    ) -> None:
        names = (*SPLITS, *(("validation",) if validation > 0 else ()), "all")
        if split not in names:
            raise DataError(f"split={split!r}: expected one of {', '.join(names)} (validation needs validation > 0)")
        all_cases = scan(Path(root))
        self.keep = list(range(len(all_cases))) if split == "all" else split_indices(all_cases, seed, validation)[split]
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


def accepted_sha256(sha256: str | None = None) -> tuple[str, str]:
    """The checksum an archive must have and where it comes from.

    ``sha256`` (the argument, CLI ``--accept-sha256``) wins, then ``$SELORA_MONTGOMERY_SHA256``,
    then the pinned :data:`SHA256`; anything but 64 hex digits is refused.
    """
    if sha256:
        value, origin = sha256, "--accept-sha256 / sha256="
    elif os.environ.get(SHA256_ENV):
        value, origin = os.environ[SHA256_ENV], SHA256_ENV
    else:
        return SHA256, "pinned"
    if not HEX64_RE.match(value.strip().lower()):
        raise DataError(f"{origin} {value!r}: expected a sha256 checksum, 64 hex digits")
    return value.strip().lower(), origin


def accept_advice(got: str) -> str:
    """How to accept an archive with checksum ``got`` deliberately (only for a zip of the right layout)."""
    return (
        "if NLM has re-packed the archive and you trust this file, accept its checksum deliberately: "
        f"{SHA256_ENV}={got} in the environment, --accept-sha256 {got} (python -m selora.data.montgomery) "
        f"or download_montgomery(..., sha256='{got}')"
    )


def manual_route(root: Path, urls: Sequence[str] = URLS) -> str:
    """How to get the archive by hand when no download works."""
    where = " or ".join(urls)
    return (
        f"to get the archive by hand, download {ZIP_NAME} in a browser from {where} and put it at {root / ZIP_NAME} "
        f"(it is checked and used on the next run), or run python -m selora.data.montgomery --root {root} "
        "--from-zip PATH/TO/NLM-MontgomeryCXRSet.zip"
    )


def check_archive(path: Path, sha256: str, origin: str = "pinned", label: str | None = None) -> None:
    """Raise :class:`DataError` unless ``path`` is the Montgomery archive with checksum ``sha256``.

    Order: magic bytes and size (:func:`selora.data.archive.check_zip`, which also refuses unsafe
    entries), the layout (:data:`LAYOUT`), then the sha256 (:class:`ChecksumMismatch`, the only
    error after which accepting the file's checksum makes sense). An archive accepted with a
    checksum other than the pinned one is used with a warning.
    """
    label = label or str(path)
    pinned = sha256 == SHA256
    names = [m.filename for m in check_zip(path, label, SIZE if pinned else None)]
    missing = [want for want, pattern in LAYOUT.items() if not any(pattern.match(n) for n in names)]
    if missing:
        raise DataError(f"{label}: a zip archive, but not the Montgomery set (no entry like {', '.join(missing)})")
    try:
        got = verify_sha256(path, sha256, label)
    except ChecksumMismatch as err:
        size = f"{err.size:,} bytes" + (f"; the pinned archive has {SIZE:,}" if pinned else "")
        raise ChecksumMismatch(f"{err} ({size})", err.got, err.size) from None
    if not pinned:
        warnings.warn(
            f"{label}: sha256 {got} accepted ({origin}), not the pinned {SHA256} of the archive NLM served "
            "when this package was written",
            stacklevel=3,
        )


def download_montgomery(
    root: Path | str,
    source: Path | str | None = None,
    sha256: str | None = None,
    urls: Sequence[str] = URLS,
    opener: Opener = open_url,
) -> Path:
    """Make ``root/MontgomerySet`` exist and return it; a no-op when it already does.

    The archive comes from ``source`` (a local zip) if given, else from ``root/``:data:`ZIP_NAME`
    if that exists (a copy put there by hand), else from the first of ``urls`` (fetched with
    ``opener``) that gives a good archive. Each is checked by :func:`check_archive` against
    :func:`accepted_sha256` (``sha256``, else ``$SELORA_MONTGOMERY_SHA256``, else :data:`SHA256`)
    and extracted safely and atomically. A local zip is never deleted; a download is deleted
    after extraction, or at once when it fails a check. Errors are one line: a checksum mismatch
    shows expected vs got and how to accept the file deliberately; a failed download also says
    how to get the archive by hand. Downloading needs a profile other than ``offline``; the
    other routes do not.
    """
    root = Path(root)
    if (root / TOP).is_dir():
        return root / TOP
    expected, origin = accepted_sha256(sha256)
    local = Path(source) if source is not None else root / ZIP_NAME
    if source is not None or local.is_file():
        if not local.is_file():
            raise DataError(f"{local}: no such zip file")
        try:
            check_archive(local, expected, origin)
        except ChecksumMismatch as err:
            raise DataError(f"{err}; {accept_advice(err.got)}") from None
        except DataError as err:
            fix = "pass the NLM archive" if source is not None else f"replace it; {manual_route(root, urls)}"
            raise DataError(f"{err}; {fix}") from None
        return safe_extract(local, root, TOP)
    from selora.profile import require_online

    require_online("downloading the Montgomery set")
    try:
        archive = download(urls, root / ZIP_NAME, opener, check=lambda p, url: check_archive(p, expected, origin, url))
    except DownloadFailed as err:
        mismatched = [e for _, e in err.failures if isinstance(e, ChecksumMismatch)]
        advice = f"; {accept_advice(mismatched[0].got)}" if mismatched else ""
        raise DataError(f"{err} (failed downloads deleted){advice}; {manual_route(root, urls)}") from None
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
    """CLI: get (optionally), check and summarise a data root; exit 0, or print the problems and exit 2."""
    ap = argparse.ArgumentParser(
        prog="python -m selora.data.montgomery",
        description=__doc__.split("\n")[0],
        epilog=f"Without a network, download {ZIP_NAME} in a browser from {URLS[0]} and pass it with --from-zip "
        f"(or put it in the --root folder and use --download). {SHA256_ENV}=HEX has the effect of --accept-sha256.",
    )
    ap.add_argument("--root", type=Path, help="folder holding MontgomerySet/ (default: the paper profile's)")
    get = ap.add_mutually_exclusive_group()
    cached = f"an {ZIP_NAME} already in --root is used first"
    get.add_argument("--download", action="store_true", help=f"get the set if missing ({cached})")
    get.add_argument("--from-zip", type=Path, help=f"extract this local {ZIP_NAME} into --root first")
    ap.add_argument(
        "--accept-sha256",
        "--sha256",
        dest="accept_sha256",
        metavar="HEX",
        help="accept an archive with this sha256 instead of the pinned one (a re-packed archive you trust)",
    )
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar while decoding")
    args = ap.parse_args(argv)
    if args.accept_sha256 and not (args.download or args.from_zip):
        ap.error("--accept-sha256 needs --download or --from-zip")
    if args.root is None:
        from selora.paths import cache_dir

        args.root = cache_dir("data", "montgomery")
    try:
        if args.from_zip or args.download:
            download_montgomery(args.root, source=args.from_zip, sha256=args.accept_sha256)
        cases = scan(args.root)
        bad, bits = check_images([c.image for c in cases], progress=not args.no_progress)
        if not bad:
            s = summarise(args.root, args.size, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bad:
        for path, why in bad:
            print(f"bad file: {path}: {why}", file=sys.stderr)
        print(
            f"error: {len(bad)} of {len(cases)} images cannot be used; replace them from the archive "
            f"(e.g. delete {Path(args.root) / TOP} and run again with --download or --from-zip)",
            file=sys.stderr,
        )
        return 2
    print(f"Montgomery data root {args.root}")
    print(f"  cases: {s['cases']} ({s['normal']} normal, {s['abnormal']} abnormal), {s['patients']} patients")
    for name, part in s["split"].items():
        print(f"  {name}: {part['n']} ({part['abnormal']} abnormal)")
    depths = ", ".join(f"{b}-bit: {n}" for b, n in sorted(bits.items()))
    print(f"  images: all {len(cases)} images decode as complete PNGs ({depths})")
    img = s["image"]
    print(f"  first image: {img['width']}x{img['height']}, {img['bits']}-bit -> model input {img['model_size']}px")
    for prompt in s["examples"]:
        print(f"  prompt: {prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
