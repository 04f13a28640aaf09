"""Procedural chest radiographs in the exact on-disk layout of the Montgomery set.

CI and the offline profile have no data host, so they run the real loader on this stand-in::

    python -m selora.data.phantom --out DIR [--size 256x312] [--seed 0] [--zip]

writes ``DIR/MontgomerySet/{CXR_png,ClinicalReadings,ManualMask/{left,right}Mask}`` (and with
``--zip`` also ``DIR/NLM-MontgomeryCXRSet.zip`` packed like the NLM archive). Images are 16-bit
PNGs holding 12-bit values, portrait like the real 4020x4892 scans, and carry the prompt's
information: lungs, heart, mediastinum, spine, ribs and clavicles; sex (habitus, breast
shadows) and age (bone density); and each finding drawn where the reading puts it. Radiological
convention: the patient's right is on the image's left. Everything follows from ``seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from selora.io import atomic_dir, atomic_path

DEFAULT_SIZE = (256, 312)  # width, height (portrait, like 4020 x 4892)
SIDES = ("right", "left")
# Findings vocabulary, modelled on tuberculosis readings: kind -> phrases ({side} = right/left/bilateral).
PHRASES = {
    "cavity": ("{side} upper lobe cavity", "cavitary lesion in the {side} upper lobe", "{side} upper lobe cavitation"),
    "infiltrate": ("{side} upper lobe infiltrate", "patchy infiltrate {side} upper zone", "{side} apical infiltrate"),
    "effusion": ("{side} pleural effusion", "{side} pleural effusion blunting the costophrenic angle"),
    "scarring": ("{side} apical scarring", "fibrotic scarring {side} upper lobe", "{side} upper lobe fibrosis"),
    "granuloma": ("calcified granuloma {side} mid lung", "{side} mid lung calcified granuloma"),
    "thickening": ("{side} pleural thickening", "{side} lateral pleural thickening"),
    "adenopathy": ("{side} hilar adenopathy", "enlarged {side} hilar node"),
}
BILATERAL = {
    "infiltrate": ("bilateral upper lobe infiltrates", "bilateral apical infiltrates"),
    "scarring": ("bilateral apical scarring", "bilateral upper lobe fibrosis"),
}
SUFFIXES = ("", "", "", "; consistent with TB", "; PTB", "; old TB")
Phrases = dict[str, tuple[str, ...]]


@dataclass
class Patient:
    """What one phantom scan shows: demographics, anatomy jitter and findings."""

    sex: str  # "M", "F" or "O" (rendered with the habitus drawn from ``build``)
    age: int
    build: str  # "M" or "F" habitus
    anatomy: dict[str, float]
    findings: list[tuple[str, str]] = field(default_factory=list)  # (kind, side)

    def reading(self, rng: np.random.Generator, phrases: Phrases = PHRASES, bilateral: Phrases = BILATERAL) -> str:
        """The findings line written in the readings file, in the vocabulary ``phrases``/``bilateral``."""
        if not self.findings:
            return "normal"
        parts = []
        for kind, side in self.findings:
            options = bilateral[kind] if side == "bilateral" else phrases[kind]
            parts.append(str(rng.choice(options)).format(side=side))
        return ", ".join(parts) + rng.choice(SUFFIXES)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, edge: float = 0.15) -> np.ndarray:
    """Soft ellipse mask in [0, 1] on normalised coordinates (x, y), ramp width ``edge``."""
    f = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    return np.clip((1.0 - f) / edge, 0.0, 1.0)


def _band(dist: np.ndarray, half: float, soft: float) -> np.ndarray:
    """Soft band mask: 1 where |dist| < half, ramping to 0 over ``soft``."""
    return np.clip((half + soft - np.abs(dist)) / soft, 0.0, 1.0)


def _lateral_edge(y: np.ndarray, sgn: float, an: dict[str, float]) -> np.ndarray:
    """x of a lung's outer border at height y: narrow apex widening to the base."""
    t = np.clip((y - an["apex"]) / (an["base"] - an["apex"]), 0.0, 1.0)
    return 0.5 + sgn * (0.055 + an["lung_w"] * (0.25 + 0.75 * t**0.45))


def _lung(x: np.ndarray, y: np.ndarray, side: str, an: dict[str, float]) -> np.ndarray:
    """Soft mask of one lung field; ``side`` is the patient's side (right lung = image left)."""
    sgn = -1.0 if side == "right" else 1.0
    apex, base = an["apex"], an["base"] + (0.02 if side == "left" else 0.0)
    medial = 0.5 + sgn * 0.055
    lateral = _lateral_edge(y, sgn, an)
    inside_x = (x - medial) * sgn / np.maximum((lateral - medial) * sgn, 1e-3)
    dome = base - 0.05 * np.clip(1 - (2 * inside_x - 1) ** 2, 0, 1)  # diaphragm dome, sharp lateral angle
    mx = np.clip(np.minimum(inside_x, 1 - inside_x) / 0.06, 0, 1)
    my = np.clip((y - apex) / 0.02, 0, 1) * np.clip((dome - y) / 0.012, 0, 1)
    return mx * my


def _zone(side: str, an: dict[str, float], v: float) -> tuple[float, float]:
    """Image point (x, y) at height fraction ``v`` (0 apex .. 1 base) in the middle of a lung."""
    sgn = -1.0 if side == "right" else 1.0
    y = an["apex"] + v * (an["base"] - an["apex"])
    return 0.5 + sgn * (0.07 + 0.55 * an["lung_w"]), y


def _draw_finding(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    side: str,
    an: dict[str, float],
    lungs: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> None:
    """Add one finding to the density image ``img`` in place (sides are the patient's)."""
    for s in SIDES if side == "bilateral" else (side,):
        _draw_on_side(img, x, y, kind, s, an, lungs[s], rng)


def _draw_on_side(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    s: str,
    an: dict[str, float],
    lung: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Add one finding on the patient's side ``s`` (its lung mask ``lung``) to ``img`` in place."""
    sgn = -1.0 if s == "right" else 1.0
    if kind in ("cavity", "infiltrate"):
        cx, cy = _zone(s, an, 0.22)
        for _ in range(7):  # patchy consolidation around the upper zone
            bx, by = cx + rng.normal(0, 0.04), cy + rng.normal(0.02, 0.035)
            img += 0.2 * lung * _ellipse(x, y, bx, by, rng.uniform(0.06, 0.09), rng.uniform(0.05, 0.08), 0.8)
        if kind == "cavity":  # bright wall, air-filled centre
            r = rng.uniform(0.055, 0.07)
            img += 0.35 * _ellipse(x, y, cx, cy, r * 1.35, r * 1.1, 0.5)
            img -= 0.55 * _ellipse(x, y, cx, cy, r, r * 0.8, 0.3)
    elif kind == "effusion":  # fluid level with a meniscus rising laterally: blunted angle
        level = an["base"] - 0.1 - 0.14 * np.clip(((x - 0.5) * sgn - 0.06) / an["lung_w"], 0, 1) ** 2
        img += 0.45 * lung * np.clip((y - level) / 0.025, 0, 1)
    elif kind == "scarring":  # streaks from the apex towards the hilum
        cx, cy = _zone(s, an, 0.12)
        for k in range(4):
            ang = np.deg2rad(60 + 15 * k + rng.normal(0, 4))
            dx, dy = -sgn * np.cos(ang), np.sin(ang)
            dist = (x - cx) * dy - (y - cy) * dx
            along = (x - cx) * dx + (y - cy) * dy
            img += 0.3 * lung * _band(dist, 0.009, 0.006) * (np.abs(along - 0.06) < 0.13)
    elif kind == "granuloma":
        cx, cy = _zone(s, an, 0.5)
        img += 0.6 * _ellipse(x, y, cx + rng.normal(0, 0.02), cy, 0.028, 0.022, 0.5)
    elif kind == "thickening":
        inside = (y > an["apex"] + 0.05) * (y < an["base"])
        img += 0.35 * _band(x - _lateral_edge(y, sgn, an) + sgn * 0.03, 0.025, 0.01) * inside
    elif kind == "adenopathy":
        img += 0.35 * _ellipse(x, y, 0.5 + sgn * 0.09, an["hilum"], 0.05, 0.06, 0.5)


def render(
    patient: Patient, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one radiograph; return (image in [0, 1], shape (H, W); lung masks by patient side)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (x + 0.5) / w, (y + 0.5) / h
    an = patient.anatomy
    female = patient.build == "F"
    bone = an["bone"]
    img = np.full((h, w), 0.04, np.float32)
    shoulder = 0.46 if not female else 0.40
    img += 0.5 * _ellipse(x, y, 0.5, 0.62, an["body_w"], 0.62, 0.05)  # trunk
    img += 0.25 * _ellipse(x, y, 0.5, 0.2, shoulder, 0.12, 0.6) * (y < 0.3)  # shoulders
    img += 0.2 * _band(x - 0.5, 0.07, 0.02) * (y < 0.12)  # neck
    lungs = {s: _lung(x, y, s, an) for s in SIDES}
    img -= 0.36 * np.maximum(lungs["right"], lungs["left"])
    if female:  # breast shadows over the lower lateral lung fields
        for s in (-1, 1):
            img += 0.14 * _ellipse(x, y, 0.5 + s * 0.28, an["base"], 0.18, 0.14, 0.9)
    img = np.maximum(img, 0.5 * _band(x - 0.5, 0.06, 0.015) * (y < an["hilum"] + 0.04))  # mediastinum
    heart = _ellipse(x, y, 0.5 + an["heart_dx"], an["base"] - 0.09, an["heart_w"], 0.14, 0.15)
    img = np.maximum(img, 0.52 * heart)  # heart bulges to the patient's left (image right)
    img += 0.12 * np.clip((y - an["base"]) / 0.03, 0, 1) * _ellipse(x, y, 0.5, 0.9, an["body_w"], 0.3, 0.1)
    img -= 0.2 * _ellipse(x, y, 0.62, an["base"] + 0.06, 0.05, 0.03, 0.5)  # gastric bubble under left dome
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * (y - an["rib_phase"]) / 0.045)
    img += bone * (0.12 + 0.06 * vertebrae) * _band(x - 0.5, 0.035, 0.01)  # spine
    dx = np.abs(x - 0.5)
    for k in range(10):  # posterior ribs: arcs falling laterally from the spine
        y0 = an["apex"] - 0.03 + k * an["rib_gap"] + an["rib_phase"]
        arc = y - (y0 + 0.85 * (dx - 0.05) ** 2 * (dx > 0.05))
        img += bone * 0.13 * _band(arc, 0.008, 0.006) * (dx > 0.04) * (dx < an["body_w"] - 0.02)
    for s in (-1, 1):  # clavicles
        line = y - (0.11 + 0.12 * (dx - 0.05) - 0.25 * (dx - 0.05) ** 2)
        img += bone * 0.22 * _band(line, 0.011, 0.006) * (dx > 0.04) * (dx < 0.38) * ((x - 0.5) * s > 0)
    for kind, side in patient.findings:
        _draw_finding(img, x, y, kind, side, an, lungs, rng)
    img = img * an["exposure"] + rng.normal(0, 0.012, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0), {s: m * (1 - heart) > 0.5 for s, m in lungs.items()}


def random_patient(rng: np.random.Generator, abnormal: bool) -> Patient:
    """A random patient: sex, age 15..85, habitus and anatomy jitter, TB findings if abnormal."""
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(15, 86))
    female = sex == "F"
    anatomy = {
        "body_w": (0.40 if female else 0.45) + rng.normal(0, 0.012),
        "lung_w": (0.27 if female else 0.30) + rng.normal(0, 0.01),
        "apex": 0.15 + rng.normal(0, 0.008),
        "base": 0.72 + rng.normal(0, 0.012),
        "hilum": 0.40 + rng.normal(0, 0.01),
        "heart_w": 0.19 + 0.0008 * (age - 45) + rng.normal(0, 0.008),
        "heart_dx": 0.06 + rng.normal(0, 0.008),
        "rib_gap": 0.058 + rng.normal(0, 0.002),
        "rib_phase": rng.uniform(-0.01, 0.01),
        "bone": float(np.clip(1.15 - 0.009 * age + rng.normal(0, 0.04), 0.25, 1.1)),  # density falls with age
        "exposure": 1.0 + rng.normal(0, 0.03),
    }
    return Patient(sex, age, sex, anatomy, random_findings(rng) if abnormal else [])


def random_findings(
    rng: np.random.Generator, phrases: Phrases = PHRASES, bilateral: Phrases = BILATERAL
) -> list[tuple[str, str]]:
    """One or two distinct finding kinds of ``phrases``, each on a side (bilateral in 1 of 4 where it can be)."""
    findings = []
    for kind in rng.choice(list(phrases), size=int(rng.integers(1, 3)), replace=False):
        both = kind in bilateral and rng.random() < 0.25
        findings.append((str(kind), "bilateral" if both else str(rng.choice(SIDES))))
    return findings


def _write_png(path: Path, arr: np.ndarray) -> None:
    """Write an 8-bit (bool/uint8) or 16-bit (uint16) grayscale PNG."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    Image.fromarray(arr).save(path, format="PNG")


def check_counts(n_cases: int, n_normal: int) -> None:
    """Refuse case counts the quirks of :func:`plan_cases` cannot be written into (ValueError, one line)."""
    if not 8 <= n_cases <= 9999 or not 4 <= n_normal <= n_cases - 4:
        raise ValueError(
            f"n_cases={n_cases}, n_normal={n_normal}: need 8 <= n_cases <= 9999 and "
            "4 <= n_normal <= n_cases - 4 (the quirks need four scans of each kind)"
        )


def plan_cases(
    rng: np.random.Generator,
    n_cases: int,
    n_normal: int,
    new_patient: Callable[[np.random.Generator, bool], Patient],
    phrases: Phrases = PHRASES,
    bilateral: Phrases = BILATERAL,
) -> list[tuple[str, Patient, str]]:
    """(file stem, patient, findings line) of every case, sorted by id, with the real set's quirks.

    ``new_patient(rng, abnormal)`` draws one patient; the findings lines use ``phrases``/``bilateral``.
    Quirks: three repeat patients ("same pt as …", one of them ``NO REPORT``; a repeat is the same
    patient a year older) and one sex ``O``.
    """
    ids = np.sort(rng.choice(np.arange(1, max(400, n_cases + 1)), size=n_cases, replace=False))
    labels = np.zeros(n_cases, bool)
    labels[rng.choice(n_cases, size=n_cases - n_normal, replace=False)] = True
    names = [f"MCUCXR_{i:04d}_{int(a)}" for i, a in zip(ids, labels)]
    patients = [new_patient(rng, bool(a)) for a in labels]
    readings = [p.reading(rng, phrases, bilateral) for p in patients]
    abn, nor = np.flatnonzero(labels), np.flatnonzero(~labels)
    repeats = [
        (abn[0], abn[-1], "stable CXR since 6M; off Rx since 6M"),
        (abn[1], abn[-2], "NO REPORT"),
        (nor[0], nor[-1], "normal"),
    ]
    for first, again, text in repeats:  # a later scan of an earlier patient
        patients[again] = dataclasses.replace(patients[first], age=patients[first].age + 1)
        readings[again] = f"{text} (same pt as {names[first]})"
    patients[nor[1]].sex = "O"
    return list(zip(names, patients, readings))


def write_set(
    out: Path | str,
    cases: Sequence[tuple[str, Patient, str]],
    draw: Callable[[str, Patient], tuple[np.ndarray, dict[str, np.ndarray]]],
    readme: tuple[str, str],
    zip_archive: bool = False,
) -> Path:
    """Write ``out/MontgomerySet`` (atomically) in the real set's layout and return it.

    ``draw(stem, patient)`` gives (12-bit image, uint16 (H, W); lung masks by patient side, bool
    (H, W)); ``readme`` is (file name, text) of a note saying what the set is. Quirks of the real
    files: trailing spaces after the sex, zero-padded ages, a Thumbs.db and a .DS_Store.
    """
    out = Path(out)
    top = out / "MontgomerySet"
    if top.exists():
        raise FileExistsError(f"{top} exists; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(top) as stage:
        for sub in ("CXR_png", "ClinicalReadings", "ManualMask/leftMask", "ManualMask/rightMask"):
            (stage / sub).mkdir(parents=True)
        for name, patient, text in cases:
            pixels, masks = draw(name, patient)
            _write_png(stage / "CXR_png" / f"{name}.png", pixels)
            _write_png(stage / "ManualMask/leftMask" / f"{name}.png", masks["left"])
            _write_png(stage / "ManualMask/rightMask" / f"{name}.png", masks["right"])
            (stage / "ClinicalReadings" / f"{name}.txt").write_text(
                f"Patient's Sex: {patient.sex} \nPatient's Age: {patient.age:03d}Y\n{text} \n", encoding="utf-8"
            )
        (stage / "CXR_png" / "Thumbs.db").write_bytes(b"\0" * 16)
        (stage / "ManualMask" / ".DS_Store").write_bytes(b"\0" * 16)
        (stage / readme[0]).write_text(readme[1], encoding="utf-8")
    if zip_archive:
        write_zip(top, out / "NLM-MontgomeryCXRSet.zip")
    return top


def make_phantom_set(
    out: Path | str,
    n_cases: int = 138,
    n_normal: int = 80,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    zip_archive: bool = False,
) -> Path:
    """Write ``out/MontgomerySet`` (atomically) and return it; optionally also the NLM-style zip.

    The layout and quirks are those of :func:`plan_cases` and :func:`write_set`. ``size`` is
    (width, height).
    """
    check_counts(n_cases, n_normal)
    cases = plan_cases(np.random.default_rng(seed), n_cases, n_normal, random_patient)

    def draw(name: str, patient: Patient) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pixels, masks = render(patient, size, np.random.default_rng([seed, int(name[7:11])]))
        return np.round(pixels * 4095).astype(np.uint16), masks

    note = f"Procedural phantom written by selora.data.phantom (seed={seed}); not patient data.\n"
    return write_set(out, cases, draw, ("README-PHANTOM.txt", note), zip_archive)


def write_zip(top: Path, archive: Path) -> Path:
    """Pack folder ``top`` (as its own name at the archive root) into ``archive`` atomically.

    Entries carry a fixed timestamp, so the same folder always gives the same bytes.
    """
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(top.rglob("*")):
            name = path.relative_to(top.parent).as_posix() + ("/" if path.is_dir() else "")
            info = zipfile.ZipInfo(name, date_time=(2014, 1, 1, 0, 0, 0))
            info.external_attr = (0o40755 if path.is_dir() else 0o100644) << 16
            zf.writestr(info, b"" if path.is_dir() else path.read_bytes(), zipfile.ZIP_DEFLATED)
    return archive


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` (e.g. 256x312), at least 32 each."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 256x312") from None
    if min(w, h) < 32:
        raise argparse.ArgumentTypeError(f"--size {text!r}: width and height must be at least 32")
    return w, h


def set_arguments(ap: argparse.ArgumentParser, size: tuple[int, int]) -> None:
    """The options of a command that writes a Montgomery-layout set (default image ``size`` = (w, h))."""
    ap.add_argument("--out", required=True, type=Path, help="folder to create MontgomerySet/ in")
    ap.add_argument("--size", type=parse_size, default=size, help=f"WIDTHxHEIGHT, default {size[0]}x{size[1]}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=138)
    ap.add_argument("--normal", type=int, default=80)
    ap.add_argument("--zip", action="store_true", help="also write NLM-MontgomeryCXRSet.zip")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a phantom set; print where; exit 2 with one line on bad input."""
    ap = argparse.ArgumentParser(prog="python -m selora.data.phantom", description=__doc__.split("\n")[0])
    set_arguments(ap, DEFAULT_SIZE)
    args = ap.parse_args(argv)
    try:
        top = make_phantom_set(args.out, args.cases, args.normal, args.seed, args.size, args.zip)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.cases} phantom cases ({args.normal} normal) to {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
