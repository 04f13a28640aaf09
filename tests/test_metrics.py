"""selora.frechet against scipy and closed forms; the paper-profile FID/CLIP paths with stand-in weights."""

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers.tiny_models import make_tiny_clip
from torch import nn

from selora import metrics
from selora.frechet import frechet_distance, frechet_distance_features, gaussian_stats, same_distribution_distances
from selora.profile import PROFILES
from selora.tokenizer import load_clip_tokenizer


def scipy_frechet(mu1, s1, mu2, s2):
    """The reference formula (pytorch-fid): |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_spd(d, rng, rank=None):
    m = rng.normal(size=(d, rank or d + 3))
    return m @ m.T / m.shape[1]


@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_matches_scipy_sqrtm_on_random_gaussians(d):
    rng = np.random.default_rng(d)
    for _ in range(5):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        got = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
        assert got == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)


def test_matches_scipy_on_singular_covariances_from_few_samples():
    """N < D samples give rank-deficient covariances, as with FID on a 28-image test split."""
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(10, 24)), rng.normal(0.3, 1.5, size=(12, 24))
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    assert np.linalg.matrix_rank(s1) < 24
    got = frechet_distance_features(torch.tensor(f1), torch.tensor(f2))
    assert got == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-5)


def test_closed_forms():
    d = 7
    mu = torch.arange(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    # identical Gaussians: 0
    s = torch.tensor(random_spd(d, np.random.default_rng(1)))
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # isotropic: |dmu|^2 + d (a - b)^2
    shift = torch.full((d,), 0.5, dtype=torch.float64)
    assert frechet_distance(mu, 4 * eye, mu + shift, 9 * eye) == pytest.approx(d * 0.25 + d * (2 - 3) ** 2)
    # diagonal: sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    want = float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu, torch.diag(a), mu, torch.diag(b)) == pytest.approx(want, rel=1e-10)

    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    def one(v: float) -> torch.Tensor:
        return torch.tensor([[v]], dtype=torch.float64)

    assert frechet_distance(torch.tensor([1.0]), one(4.0), torch.tensor([-2.0]), one(1.0)) == pytest.approx(9 + 1)


def test_symmetric_and_rotation_invariant():
    rng = np.random.default_rng(3)
    f1, f2 = torch.tensor(rng.normal(size=(50, 6))), torch.tensor(rng.normal(1, 2, size=(40, 6)))
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(6, 6))))
    d12 = frechet_distance_features(f1, f2)
    assert frechet_distance_features(f2, f1) == pytest.approx(d12, rel=1e-9)
    assert frechet_distance_features(f1 @ q, f2 @ q) == pytest.approx(d12, rel=1e-9)
    assert frechet_distance_features(f1 + 3, f2 + 3) == pytest.approx(d12, rel=1e-9)


def test_gaussian_stats_match_numpy():
    f = np.random.default_rng(4).normal(size=(30, 5))
    mu, sigma = gaussian_stats(torch.tensor(f))
    np.testing.assert_allclose(mu.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f, rowvar=False), rtol=1e-10)


def test_bad_inputs_are_clear_errors():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="sigma2: expected shape \\(3, 3\\)"):
        frechet_distance(torch.zeros(3), eye, torch.zeros(3), torch.eye(4))
    with pytest.raises(ValueError, match="features1: expected features of shape \\(N >= 2, D\\)"):
        frechet_distance_features(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="features2: expected 3 feature columns"):
        frechet_distance_features(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="mu1: contains NaN"):
        frechet_distance(torch.tensor([float("nan")] * 3), eye, torch.zeros(3), eye)
    with pytest.raises(ValueError, match="images: expected a tensor \\(N, 1 or 3, H, W\\)"):
        metrics.to_unit_rgb(torch.zeros(2, 2, 8, 8))


def test_to_unit_rgb_grayscale_to_three_channels_and_resize():
    x = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    y = metrics.to_unit_rgb(x, 32)
    assert y.shape == (2, 3, 32, 32) and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert torch.allclose(metrics.to_unit_rgb(x)[:, 0:1], (x + 1) / 2)


class StandInFeatures(nn.Module):
    """A fixed random network standing in for Inception-v3 (the real weights need a download)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        assert x.shape[1:] == (3, metrics.INCEPTION_SIZE, metrics.INCEPTION_SIZE) and x.dtype == torch.float32
        return self.net(x)


def test_inception_fid_path_with_a_stand_in_feature_network():
    """torchmetrics' FID with our preprocessing equals our Fréchet distance on the same features."""
    g = torch.Generator().manual_seed(0)
    real = torch.rand(12, 1, 24, 24, generator=g) * 2 - 1
    fake = (torch.rand(10, 1, 24, 24, generator=g) * 2 - 1) * 0.5
    net = StandInFeatures()
    got = metrics.inception_fid(real, fake, feature=net, batch_size=5)
    with torch.no_grad():
        ours = frechet_distance_features(net(metrics.to_unit_rgb(real, 299)), net(metrics.to_unit_rgb(fake, 299)))
    assert got == pytest.approx(ours, rel=1e-4)
    assert metrics.inception_fid(real, real, feature=net) == pytest.approx(0.0, abs=1e-3)


def test_standard_inception_refuses_to_download_offline(monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "offline")
    with pytest.raises(RuntimeError, match="needs the network"):
        metrics.inception_fid(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match="needs the network"):
        metrics.clip_score(torch.zeros(1, 1, 8, 8), ["a"])


@pytest.fixture(scope="module")
def tiny_clip():
    """:func:`make_tiny_clip` with SD v1.5's tokenizer."""
    return make_tiny_clip(load_clip_tokenizer("offline"))


def test_clip_score_path_with_a_tiny_random_clip(tiny_clip):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    prompts = [
        "female, 27 years: normal",
        "male, 60 years: right upper lobe cavity",
        "female, 45 years: left pleural effusion",
        "male, 33 years: normal",
    ]
    score = metrics.clip_score(images, prompts, tiny_clip, batch_size=3)
    # the definition: 100 * cosine of the projected embeddings, averaged, clipped at 0
    model, processor = tiny_clip()
    with torch.no_grad():
        pix = processor(images=list((metrics.to_unit_rgb(images) * 255).round().to(torch.uint8)), return_tensors="pt")
        tok = processor(text=prompts, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=pix["pixel_values"])
        txt = model.get_text_features(**tok)
    # transformers 5 returns a model output (the embedding is its pooler output), 4.x the tensor itself
    img, txt = (getattr(out, "pooler_output", out) for out in (img, txt))
    want = max(float((100 * torch.nn.functional.cosine_similarity(img, txt)).mean()), 0.0)
    assert score == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert 0.0 < score <= 100.0, "a score clipped at 0 would make every check here hold trivially"
    shuffled = metrics.clip_score(images, prompts[1:] + prompts[:1], tiny_clip)
    assert shuffled != pytest.approx(score, abs=1e-6), "the score must depend on which prompt goes with which image"


def test_clip_score_truncates_long_prompts_like_training(tiny_clip):
    tok = tiny_clip()[1].tokenizer
    long = "female, 27 years: " + " ".join(["right upper lobe cavity"] * 40)
    (cut,) = metrics.truncate_prompts([long], tok)
    ids = tok(cut)["input_ids"]
    assert len(tok(long)["input_ids"]) > 77 and len(ids) <= 77
    assert ids == tok(long, truncation=True, max_length=77)["input_ids"], "truncation must match training's"
    assert metrics.truncate_prompts(["male, 33 years: normal"], tok) == ["male, 33 years: normal"]
    image = torch.zeros(1, 1, 32, 32)
    want = metrics.clip_score(image, [cut], tiny_clip)
    assert metrics.clip_score(image, [long], tiny_clip) == pytest.approx(want, abs=1e-5)
    # the text the model sees (two scores clipped at 0 would be equal whatever it was)
    model, processor = tiny_clip()
    seen = []

    def spy(*args, **kwargs):
        seen.extend(kwargs.get("text") or [])
        return processor(*args, **kwargs)

    spy.tokenizer = processor.tokenizer
    metrics.clip_score(image, [long], lambda: (model, spy))
    assert seen == [cut]


def test_clip_score_bad_input(tiny_clip):
    with pytest.raises(ValueError, match="prompts: expected 2 prompts"):
        metrics.clip_score(torch.zeros(2, 1, 8, 8), ["one"], tiny_clip)


def test_evaluate_labels_offline_numbers_as_proxy():
    assert all("proxy" in metrics.LABELS[k] for k in ("fid_proxy", "alignment_proxy"))
    assert not any("proxy" in metrics.LABELS[k] for k in ("fid", "clip_score"))
    with pytest.raises(ValueError, match="profile='gpu'"):
        metrics.evaluate(torch.zeros(2, 1, 8, 8), ["a", "b"], torch.zeros(2, 1, 8, 8), profile="gpu")


def test_clip_is_loaded_once_per_process(monkeypatch):
    """The CLIP score's model is loaded once (it was reloaded on every call: ~1 min per evaluation)."""
    import transformers

    from selora import metrics

    loads = []

    class Loaded(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            loads.append(name)

    monkeypatch.setenv("SELORA_PROFILE", "paper")
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", classmethod(lambda cls, name: Loaded(name)))
    monkeypatch.setattr(transformers.CLIPProcessor, "from_pretrained", classmethod(lambda cls, name: object()))
    metrics._load_clip.cache_clear()
    try:
        first, second = metrics._load_clip(), metrics._load_clip()
    finally:
        metrics._load_clip.cache_clear()
    assert first is second and loads == [metrics.CLIP_MODEL_ID]


def test_same_distribution_distances_are_the_small_sample_bias():
    """Two disjoint subsets of one Gaussian: each value is scipy's Fréchet distance of those subsets; the
    mean is at least the mean term's 2 D / n (identity covariance) and shrinks as n grows."""
    d = 8
    features = torch.from_numpy(np.random.default_rng(0).standard_normal((2000, d)))
    small = same_distribution_distances(features, 20, 40, torch.Generator().manual_seed(1))
    large = same_distribution_distances(features, 500, 40, torch.Generator().manual_seed(1))
    assert small.shape == (40,) and (small >= 0).all()
    assert small.mean() > 0.9 * 2 * d / 20 and large.mean() < small.mean() / 10
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(1))  # the first draw's subsets
    a, b = features[order[:20]].numpy(), features[order[20:40]].numpy()
    ref = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert float(small[0]) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="n=1001"):
        same_distribution_distances(features, 1001, 1, torch.Generator())


def test_frechet_and_alignment_metric_are_the_profiles_two_metrics(monkeypatch):
    """The image-level Fréchet function of a profile is what evaluate() reports as its first metric."""
    gen = torch.Generator().manual_seed(0)
    real, fake = (torch.rand(12, 1, 32, 32, generator=gen) * 2 - 1 for _ in range(2))
    offline = metrics.evaluate(fake, [""] * 12, real, "offline")
    assert metrics.frechet_metric("offline")(real, fake) == offline["fid_proxy"]
    assert metrics.alignment_metric("offline")(fake, [""] * 12) == offline["alignment_proxy"]
    seen = {}
    monkeypatch.setattr(metrics, "inception_fid", lambda r, g: seen.setdefault("args", (r, g)) and 7.0)
    assert metrics.frechet_metric("paper")(real, fake) == 7.0 and seen["args"][0] is real


def test_metrics_are_chosen_by_name_not_by_position(monkeypatch):
    """A profile names its Fréchet and alignment metrics; the order of METRICS plays no part."""
    assert set(metrics.PROFILE_METRICS) == set(PROFILES) and set(metrics.LABELS) == set(metrics.METRICS)
    images = torch.zeros(2, 1, 8, 8)
    fakes = {"align-first": lambda g, p, r: 1.0, "frechet-second": lambda g, p, r: 2.0}
    monkeypatch.setattr(metrics, "METRICS", fakes)
    chosen = metrics.ProfileMetrics(frechet="frechet-second", alignment="align-first")
    monkeypatch.setitem(metrics.PROFILE_METRICS, "offline", chosen)
    assert metrics.frechet_metric("offline")(images, images) == 2.0
    assert metrics.alignment_metric("offline")(images, ["a", "b"]) == 1.0
    assert metrics.evaluate(images, ["a", "b"], images, "offline") == {"frechet-second": 2.0, "align-first": 1.0}
