"""Validation of the shipped offline metric proxies on the held-out phantom TEST split.

The proxies (scripts/train_proxies.py) saw only the train split. Here they must behave like the
metrics they stand in for: the Fréchet proxy grows monotonically with blur and with noise, the
alignment proxy ranks matched image–prompt pairs above shuffled ones, and both tell images that
are not chest X-rays (the mini SD's pretraining domain; samples of the base model itself) from
real held-out images. Numbers are printed (run with -s) and labelled "proxy".
"""

import importlib.util
import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selora import metrics, proxies
from selora.data import montgomery_root
from selora.data.montgomery import MontgomeryDataset, scan, split_indices
from selora.frechet import frechet_distance_features

REPO = Path(__file__).resolve().parents[1]
BLUR_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.5, 4.0)  # pixels at 64 px
NOISE_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.4)  # in [-1, 1] units


def split_tensors(split: str) -> tuple[torch.Tensor, list[str]]:
    ds = MontgomeryDataset(montgomery_root("offline"), split=split, size=proxies.PROXY_SIZE, seed=0)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]).float(), [c.prompt for c in ds.cases]


@pytest.fixture(scope="module")
def data():
    train, _ = split_tensors("train")
    test, prompts = split_tensors("test")
    return {"train": train, "test": test, "prompts": prompts}


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return x
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def add_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def pretraining_domain_images(n: int) -> torch.Tensor:
    """Stand-in for "base-model-like" images: the mini SD's pretraining pictures (shapes), in gray."""
    spec = importlib.util.spec_from_file_location("build_mini_sd", REPO / "scripts" / "build_mini_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    imgs = np.stack([mod.render(mod.draw_attributes(rng), rng).mean(0, keepdims=True) for _ in range(n)])
    return torch.from_numpy(imgs) * 2 - 1


def base_model_samples(prompts: list[str]) -> torch.Tensor:
    """Samples of the shipped offline base model (mini SD, no fine-tuning) for the test prompts, gray."""
    from selora.models import load_pipeline

    pipe = load_pipeline("mini-sd", device="cpu")
    g = torch.Generator().manual_seed(0)
    out = pipe(prompts, num_inference_steps=10, generator=g, output_type="pt", height=64, width=64).images
    return out.mean(1, keepdim=True) * 2 - 1


def test_shipped_proxies_were_trained_on_the_train_split_only():
    cases = scan(montgomery_root("offline"))
    split = split_indices(cases, seed=0)
    test_ids = {cases[i].case_id for i in split["test"]}
    for kind in proxies.PROXIES:
        path = proxies.PROXY_DIR / f"{kind}.safetensors"
        assert path.stat().st_size <= 2_000_000, f"{path.name} must stay small (<= 2 MB)"
        prov = proxies.load_proxy(kind).provenance
        assert prov["split"] == "train" and prov["cases"], kind
        assert not set(prov["cases"]) & test_ids, f"{kind} proxy saw held-out test images"
        assert set(prov["cases"]) == {cases[i].case_id for i in split["train"]}


@pytest.mark.parametrize(
    "name,degrade,levels", [("blur", gaussian_blur, BLUR_SIGMAS), ("noise", add_noise, NOISE_SIGMAS)]
)
def test_frechet_proxy_grows_monotonically_with_degradation(data, name, degrade, levels):
    """Clean test images vs the same images degraded more and more; the train-vs-test distance is
    the sampling floor of two different sets of real images."""
    ref = proxies.proxy_features(data["test"])
    fd = [frechet_distance_features(ref, proxies.proxy_features(degrade(data["test"], s))) for s in levels]
    floor = proxies.fid_proxy(data["train"], data["test"])
    print(
        f"\nFréchet distance (offline proxy), test vs test + {name} {levels}: "
        + ", ".join(f"{v:.2f}" for v in fd)
        + f"; real train vs real test: {floor:.2f}"
    )
    assert all(b > a for a, b in pairwise(fd)), f"proxy FD must grow with {name} strength: {fd}"
    assert fd[-1] > 2 * floor, f"strong {name} ({fd[-1]:.1f}) must stand well above real-vs-real ({floor:.1f})"


@pytest.fixture(scope="module")
def unlike(data):
    n = len(data["prompts"])
    return {
        "pretraining domain": pretraining_domain_images(n),
        "base model samples": base_model_samples(data["prompts"]),
    }


def test_frechet_proxy_separates_non_cxr_images_from_held_out_real(data, unlike):
    real = proxies.fid_proxy(data["train"], data["test"])
    for what, images in unlike.items():
        other = proxies.fid_proxy(data["train"], images)
        print(f"\nFréchet distance (offline proxy) to the train split: held-out real {real:.1f}, {what} {other:.1f}")
        assert other > 3 * real, f"{what} must be far from real CXRs ({other:.1f}) vs held-out real ({real:.1f})"


@torch.no_grad()
def test_alignment_proxy_ranks_matched_pairs_above_shuffled(data):
    model = proxies.load_proxy("alignment")
    sim = 100 * model.embed_images(data["test"]) @ model.embed_texts(data["prompts"]).T  # (N images, N prompts)
    n = sim.shape[0]
    matched = sim.diag()
    shuffled = (sim.sum(1) - matched) / (n - 1)
    margin = float((matched - shuffled).mean())
    wins = float((matched > shuffled).float().mean())
    top = float((sim.argsort(1, descending=True)[:, : n // 4] == torch.arange(n)[:, None]).any(1).float().mean())
    print(
        f"\nalignment (offline proxy), test split: matched {float(matched.mean()):.1f}, shuffled "
        f"{float(shuffled.mean()):.1f}, margin {margin:.1f}; matched > its shuffled mean for {wins:.0%}; "
        f"true prompt in top quarter for {top:.0%}"
    )
    assert margin > 5.0, f"matched pairs must score clearly above shuffled ones (margin {margin:.1f})"
    assert wins >= 0.75, f"matched pair above the shuffled mean for only {wins:.0%} of test images"


@torch.no_grad()
def test_alignment_proxy_reads_findings_not_just_demographics(data):
    """Abnormal test images: their prompt beats the same prompt with the findings replaced by "normal"."""
    model = proxies.load_proxy("alignment")
    idx = [i for i, p in enumerate(data["prompts"]) if not p.endswith(": normal")]
    prompts = [data["prompts"][i] for i in idx]
    normal = [p.split(":")[0] + ": normal" for p in prompts]
    true, swapped = model.score(data["test"][idx], prompts), model.score(data["test"][idx], normal)
    wins = float((true > swapped).float().mean())
    print(
        f"\nalignment (offline proxy), {len(idx)} abnormal test images: own findings {float(true.mean()):.1f}, "
        f"findings -> 'normal' {float(swapped.mean()):.1f}; own wins for {wins:.0%}"
    )
    assert len(idx) >= 5 and wins >= 0.75, f"the proxy must prefer the true findings ({wins:.0%})"


def test_alignment_proxy_separates_non_cxr_images_from_held_out_real(data, unlike):
    real = proxies.alignment_proxy(data["test"], data["prompts"])
    for what, images in unlike.items():
        other = proxies.alignment_proxy(images, data["prompts"])
        print(f"\nalignment (offline proxy) with the test prompts: held-out real {real:.1f}, {what} {other:.1f}")
        assert other < real - 10, f"{what} ({other:.1f}) must align worse than real images ({real:.1f})"


def test_evaluate_offline_uses_the_proxies(data):
    out = metrics.evaluate(data["test"], data["prompts"], data["train"], profile="offline")
    assert set(out) == {"fid_proxy", "alignment_proxy"}
    assert out["fid_proxy"] == pytest.approx(proxies.fid_proxy(data["train"], data["test"]))
    assert out["alignment_proxy"] == pytest.approx(proxies.alignment_proxy(data["test"], data["prompts"]))


def test_train_script_smoke_run_writes_loadable_proxies(tmp_path):
    script = importlib.util.spec_from_file_location("train_proxies", REPO / "scripts" / "train_proxies.py")
    mod = importlib.util.module_from_spec(script)
    script.loader.exec_module(mod)
    assert mod.main(["--steps", "2", "--out", str(tmp_path)]) == 0
    for kind in proxies.PROXIES:
        model = proxies.load_proxy(kind, tmp_path / f"{kind}.safetensors")
        assert model.provenance["steps"] == 2 and model.provenance["split"] == "train"
        shipped = proxies.load_proxy(kind)
        assert json.dumps(model.config) == json.dumps(shipped.config)
    assert mod.main(["--steps", "0", "--out", str(tmp_path)]) == 2
    assert mod.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


def test_load_proxy_errors(tmp_path):
    with pytest.raises(ValueError, match="kind: expected one of frechet, alignment"):
        proxies.load_proxy("inception")
    with pytest.raises(FileNotFoundError, match="train them with"):
        proxies.load_proxy("frechet", tmp_path / "missing.safetensors")
    proxies.save_proxy(proxies.FrechetProxy(), tmp_path / "f.safetensors", {"split": "train"})
    with pytest.raises(ValueError, match="expected a 'alignment' proxy, the file says kind='frechet'"):
        proxies.load_proxy("alignment", tmp_path / "f.safetensors")


def test_trainer_metrics_take_pil_images(data):
    from PIL import Image

    pil = [Image.fromarray(((img[0].numpy() + 1) * 127.5).round().astype(np.uint8), mode="L") for img in data["test"]]
    fns = metrics.trainer_metrics("offline")
    assert set(fns) == {"fid_proxy", "alignment_proxy"}
    back = metrics.images_from_pil(pil)
    assert back.shape == data["test"].shape and (back - data["test"]).abs().max() < 1 / 255 + 1e-6
    assert fns["fid_proxy"](pil, data["prompts"], data["train"]) == pytest.approx(
        proxies.fid_proxy(data["train"], back)
    )
    assert fns["alignment_proxy"](pil, data["prompts"], data["train"]) == pytest.approx(
        proxies.alignment_proxy(back, data["prompts"])
    )


def test_fingerprint_identifies_the_weights(tmp_path):
    model = proxies.FrechetProxy()
    a = proxies.load_proxy("frechet", proxies.save_proxy(model, tmp_path / "a.safetensors", {"seed": 0}))
    b = proxies.load_proxy("frechet", proxies.save_proxy(model, tmp_path / "b.safetensors", {"seed": 0}))
    with torch.no_grad():
        model.head.bias += 1
    c = proxies.load_proxy("frechet", proxies.save_proxy(model, tmp_path / "c.safetensors", {"seed": 0}))
    assert a.fingerprint == b.fingerprint != c.fingerprint
