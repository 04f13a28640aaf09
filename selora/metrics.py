"""Image-generation metrics: Fréchet distance, FID and CLIP score, and their validated offline proxies.

Three layers, one code path:

- :func:`frechet_distance` — the Fréchet distance between two Gaussians (Heusel et al. 2017),
  ``d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, in float64 torch.
- Paper profile (numbers comparable to the literature; the weights are downloaded once):
  :func:`inception_fid` (torchmetrics ``FrechetInceptionDistance``, Inception-v3 pool features) and
  :func:`clip_score` (CLIP ViT-L/14 through transformers; the definition of torchmetrics ``CLIPScore``).
- Offline profile (no weights can be downloaded): two small models trained by
  ``scripts/train_proxies.py`` on the phantom TRAIN split and shipped in ``selora/assets/proxies/``:
  :class:`FrechetProxy` (a feature extractor for a Fréchet distance) and :class:`AlignmentProxy`
  (a contrastive image–text model for an alignment score). Their numbers are always labelled
  "proxy" (:data:`LABELS`) and are not comparable with the paper's FID / CLIP score.

Images everywhere are model outputs: ``(N, 1, H, W)`` (or ``(N, 3, H, W)``) floats in [-1, 1].
"""
from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from selora.io import atomic_save_safetensors
from selora.paths import ASSETS_DIR
from selora.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, load_clip_tokenizer

PROXY_DIR = ASSETS_DIR / "proxies"
INCEPTION_SIZE = 299  # Inception-v3 input side; images are resized to it explicitly (bilinear)
CLIP_MODEL_ID = "openai/clip-vit-large-patch14"  # SD v1.5's text tower; torchmetrics' default
PROXY_SIZE = 64  # the offline resolution the proxies are trained at

#: Result keys -> what a table or figure must call them. Offline numbers say "proxy".
LABELS = {
    "fid": "FID",
    "clip_score": "CLIP score",
    "fid_proxy": "Fréchet distance (offline proxy)",
    "alignment_proxy": "alignment score (offline proxy)",
}


# ---------------------------------------------------------------- Fréchet distance (Heusel et al. 2017)


def _features(name: str, x: Tensor | Sequence) -> Tensor:
    f = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: expected features of shape (N >= 2, D), got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return f


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``features`` ``(N, D)``."""
    f = _features("features", features)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(S: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (tiny negative eigenvalues clipped to 0)."""
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``mu*``: ``(D,)``; ``sigma*``: ``(D, D)`` symmetric PSD (singular is fine, e.g. N < D samples).
    ``tr((S1 S2)^1/2)`` is computed as ``sum sqrt(eig(S1^1/2 S2 S1^1/2))``, a symmetric PSD matrix,
    so no complex ``sqrtm`` and no ``+ eps I`` fudge is needed. Computed in float64.
    """
    args = {"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2}
    t = {k: torch.as_tensor(v).detach().to("cpu", torch.float64) for k, v in args.items()}
    d = t["mu1"].shape[0] if t["mu1"].dim() == 1 else -1
    for k, v in t.items():
        want = (d,) if k.startswith("mu") else (d, d)
        if d < 1 or tuple(v.shape) != want:
            raise ValueError(f"{k}: expected shape {want} (D from mu1), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{k}: contains NaN or inf")
    s1, s2 = ((t[k] + t[k].T) / 2 for k in ("sigma1", "sigma2"))
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = t["mu1"] - t["mu2"]
    return max(float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean), 0.0)  # >= 0; clip round-off


def frechet_distance_features(features1: Tensor, features2: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``(N1, D)`` and ``(N2, D)``."""
    f1, f2 = _features("features1", features1), _features("features2", features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features2: expected {f1.shape[1]} feature columns like features1, got {f2.shape[1]}")
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


# ---------------------------------------------------------------- image preparation


def _images(name: str, images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor (N, 1 or 3, H, W) in [-1, 1], got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return images.detach().float()


def to_unit_rgb(images: Tensor, size: int | None = None) -> Tensor:
    """``(N, 1|3, H, W)`` in [-1, 1] -> ``(N, 3, size, size)`` in [0, 1].

    Grayscale is repeated into 3 channels; with ``size`` the square image is resized (bilinear,
    antialiased when shrinking). Values outside [-1, 1] are clipped.
    """
    x = (_images("images", images).clamp(-1, 1) + 1) / 2
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=x.shape[-1] > size, align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous().clamp(0, 1)


# ---------------------------------------------------------------- paper profile


def inception_fid(real: Tensor, fake: Tensor, feature: int | nn.Module = 2048, batch_size: int = 32) -> float:
    """FID between ``real`` and ``fake`` ``(N, 1|3, H, W)`` in [-1, 1] with torchmetrics.

    Grayscale -> 3 channels, values -> [0, 1], resized to 299 x 299 bilinear (:func:`to_unit_rgb`),
    then ``FrechetInceptionDistance(feature, normalize=True)``. ``feature=2048`` is the standard
    Inception-v3 pool layer (needs ``torch-fidelity``; its weights are downloaded once); an
    ``nn.Module`` mapping ``(n, 3, 299, 299)`` in [0, 1] to ``(n, d)`` replaces Inception (tests).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, int):
        from selora.profile import require_online

        require_online("the Inception-v3 weights for FID")
    fid = FrechetInceptionDistance(feature=feature, normalize=True, input_img_size=(3, INCEPTION_SIZE, INCEPTION_SIZE))
    for flag, images in ((True, real), (False, fake)):
        for chunk in _images("real" if flag else "fake", images).split(batch_size):
            fid.update(to_unit_rgb(chunk, INCEPTION_SIZE), real=flag)
    return float(fid.compute())


def truncate_prompts(prompts: Sequence[str], tokenizer, max_length: int = CONTEXT_LENGTH) -> list[str]:
    """Prompts cut to what the text encoder saw in training: ``max_length`` tokens incl. start/end.

    Prompts that fit are returned unchanged; longer ones are re-decoded from their first
    ``max_length - 2`` text tokens (the training tokenizer call uses ``truncation=True``).
    """
    out = []
    for text in prompts:
        ids = tokenizer(text, truncation=False)["input_ids"]
        if len(ids) <= max_length:
            out.append(text)
        else:
            out.append(tokenizer.decode(ids[1 : max_length - 1], skip_special_tokens=True).strip())
    return out


def _load_clip() -> tuple[nn.Module, object]:
    from transformers import CLIPModel, CLIPProcessor

    from selora.profile import require_online

    require_online(f"the CLIP weights ({CLIP_MODEL_ID}) for the CLIP score")
    return CLIPModel.from_pretrained(CLIP_MODEL_ID).eval(), CLIPProcessor.from_pretrained(CLIP_MODEL_ID)


def _embedding(out: Tensor | object) -> Tensor:
    """transformers 5 returns a model output from ``get_*_features``; the embedding is its pooler output."""
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_score(
    images: Tensor,
    prompts: Sequence[str],
    model_and_processor: Callable[[], tuple[nn.Module, object]] | None = None,
    batch_size: int = 16,
) -> float:
    """CLIP score of images ``(N, 1|3, H, W)`` in [-1, 1] against their ``prompts``: ``max(mean_i 100 cos_i, 0)``.

    The definition of torchmetrics ``CLIPScore`` (whose own code breaks on transformers 5, where
    ``get_image_features`` returns a model output): grayscale -> 3 channels, 8-bit RGB into the
    ``CLIPProcessor`` (shortest side -> 224, centre crop, CLIP normalisation), prompts truncated
    like the training prompts (:func:`truncate_prompts`). ``model_and_processor`` defaults to
    downloading :data:`CLIP_MODEL_ID`; tests pass a small random CLIP built from a config.
    """
    images = _images("images", images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}")
    model, processor = (model_and_processor or _load_clip)()
    texts = truncate_prompts(list(prompts), processor.tokenizer, processor.tokenizer.model_max_length)
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        rgb = (to_unit_rgb(images[start : start + batch_size]) * 255).round().to(torch.uint8)
        pix = processor(images=list(rgb), return_tensors="pt")["pixel_values"].to(device)
        tok = processor(text=texts[start : start + batch_size], return_tensors="pt", padding=True)
        img = _embedding(model.get_image_features(pixel_values=pix))
        txt = _embedding(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                 attention_mask=tok["attention_mask"].to(device)))
        scores.append(100 * F.cosine_similarity(img.float(), txt.float(), dim=-1))
    return max(float(torch.cat(scores).mean()), 0.0)


# ---------------------------------------------------------------- offline proxies


class ConvEncoder(nn.Module):
    """Small CNN: ``(N, 1, 64, 64)`` in [-1, 1] -> ``(N, dim)``; other sizes/3 channels are adapted.

    Four stride-2 3x3 convolutions (64 -> 4 px) keep the layout (left/right matters in a CXR),
    then a linear map of the flattened 4x4 grid.
    """

    def __init__(self, dim: int = 64, width: int = 16) -> None:
        super().__init__()
        c = width
        layers: list[nn.Module] = []
        for cin, cout in ((1, c), (c, 2 * c), (2 * c, 4 * c), (4 * c, 4 * c)):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * c * 16, dim))

    def forward(self, images: Tensor) -> Tensor:
        x = _images("images", images).to(next(self.parameters()).device)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if tuple(x.shape[-2:]) != (PROXY_SIZE, PROXY_SIZE):
            x = F.interpolate(x, size=(PROXY_SIZE, PROXY_SIZE), mode="bilinear",
                              antialias=x.shape[-1] > PROXY_SIZE, align_corners=False)
        return self.net(x.clamp(-1, 1))


class FrechetProxy(nn.Module):
    """Feature extractor for the offline Fréchet distance; trained to predict sex, age and abnormality.

    ``features(images)``: ``(N, 1, H, W)`` -> ``(N, dim)``; ``forward`` adds the training head
    ``(N, 3)``: logit(male), logit(abnormal), age / 100.
    """

    def __init__(self, dim: int = 64, width: int = 16) -> None:
        super().__init__()
        self.config = {"dim": dim, "width": width}
        self.encoder = ConvEncoder(dim, width)
        self.head = nn.Linear(dim, 3)

    def features(self, images: Tensor) -> Tensor:
        """``(N, 1, H, W)`` in [-1, 1] -> ``(N, dim)`` features for the Fréchet distance."""
        return self.encoder(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(F.gelu(self.features(images)))


@lru_cache(maxsize=1)
def _offline_tokenizer():
    """SD v1.5's CLIP tokenizer rebuilt offline (:func:`selora.tokenizer.load_clip_tokenizer`), loaded once."""
    return load_clip_tokenizer("offline")


def hashed_ngrams(ids: Sequence[int], buckets: int) -> list[int]:
    """Bucket indices of the token unigrams and bigrams of one prompt (a deterministic hash).

    A bigram (a, b) is the unique integer a (V + 1) + b, spread by Knuth's multiplicative hash.
    """
    uni = [i % buckets for i in ids]
    bi = [(a * (VOCAB_SIZE + 1) + b) * 2654435761 % buckets for a, b in zip(ids, ids[1:])]
    return uni + bi


class AlignmentProxy(nn.Module):
    """Contrastive image–text model (CLIP-like, tiny): ``score(images, prompts)`` = 100 cos per pair.

    Images ``(N, 1, H, W)`` -> :class:`ConvEncoder` -> unit ``(N, dim)``. Prompts -> the CLIP BPE
    tokenizer (truncated to 77 tokens like training) -> hashed unigrams + bigrams -> mean of an
    ``EmbeddingBag`` -> MLP -> unit ``(N, dim)``. Bigrams keep "right upper" apart from "left upper".
    """

    def __init__(self, dim: int = 64, width: int = 16, buckets: int = 4096) -> None:
        super().__init__()
        self.config = {"dim": dim, "width": width, "buckets": buckets}
        self.image = ConvEncoder(dim, width)
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.text = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_images(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``(N, dim)`` of images ``(N, 1, H, W)`` in [-1, 1]."""
        return F.normalize(self.image(images), dim=-1)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (flat n-gram bucket ids, bag offsets ``(N,)``) for :meth:`embed_tokens`."""
        ids = _offline_tokenizer()(list(prompts), truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]
        bags = [hashed_ngrams(t, self.bag.num_embeddings) for t in ids]
        flat = torch.tensor([i for b in bags for i in b], dtype=torch.long)
        offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
        return flat, offsets

    def embed_tokens(self, flat: Tensor, offsets: Tensor) -> Tensor:
        """Unit text embeddings ``(N, dim)`` of tokenized prompts (:meth:`tokenize`)."""
        device = self.bag.weight.device
        return F.normalize(self.text(self.bag(flat.to(device), offsets.to(device))), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings ``(N, dim)`` of ``prompts``."""
        return self.embed_tokens(*self.tokenize(prompts))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-pair 100 cos(image_i, prompt_i), shape ``(N,)``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}")
        return 100 * (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)


PROXIES: dict[str, type[nn.Module]] = {"frechet": FrechetProxy, "alignment": AlignmentProxy}


def save_proxy(model: nn.Module, path: Path, provenance: dict) -> Path:
    """Write ``model`` (a :data:`PROXIES` class) as safetensors with its config + ``provenance`` (atomic)."""
    kind = next(k for k, cls in PROXIES.items() if isinstance(model, cls))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": json.dumps(model.config), "provenance": json.dumps(provenance, sort_keys=True)}
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    return atomic_save_safetensors(state, path, meta)


@lru_cache(maxsize=8)
def _load_proxy_cached(kind: str, path: str, mtime: float) -> nn.Module:
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k).float() for k in fh.keys()}
    if meta.get("kind") != kind:
        raise ValueError(f"{path}: expected a {kind!r} proxy, the file says kind={meta.get('kind')!r}")
    model = PROXIES[kind](**json.loads(meta["config"]))
    model.load_state_dict(state, strict=True)
    model.provenance = json.loads(meta.get("provenance", "{}"))
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(state):
        digest.update(name.encode() + state[name].numpy().tobytes())
    model.fingerprint = digest.hexdigest()[:16]  # content hash (the file's header order may vary)
    return model.eval().requires_grad_(False)


def load_proxy(kind: str, path: Path | str | None = None) -> nn.Module:
    """The shipped (or given) proxy ``kind`` (``"frechet"`` or ``"alignment"``), eval mode, frozen.

    Default file: ``selora/assets/proxies/{kind}.safetensors`` (``scripts/train_proxies.py``).
    ``.provenance`` holds how it was trained (data hash, case ids, seed, steps); ``.fingerprint`` is
    a content hash (tensors + metadata) for result provenance.
    """
    if kind not in PROXIES:
        raise ValueError(f"kind: expected one of {', '.join(PROXIES)}, got {kind!r}")
    path = Path(path) if path is not None else PROXY_DIR / f"{kind}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no proxy weights (train them with `python scripts/train_proxies.py`)")
    return _load_proxy_cached(kind, str(path.resolve()), path.stat().st_mtime)


@torch.no_grad()
def proxy_features(images: Tensor, model: nn.Module | None = None, batch_size: int = 64) -> Tensor:
    """Fréchet-proxy features ``(N, dim)`` of images ``(N, 1, H, W)`` in [-1, 1]."""
    model = model or load_proxy("frechet")
    return torch.cat([model.features(chunk) for chunk in _images("images", images).split(batch_size)])


def fid_proxy(real: Tensor, fake: Tensor, model: nn.Module | None = None) -> float:
    """Offline Fréchet distance: :func:`frechet_distance` on :class:`FrechetProxy` features (a proxy)."""
    model = model or load_proxy("frechet")
    return frechet_distance_features(proxy_features(real, model), proxy_features(fake, model))


@torch.no_grad()
def alignment_proxy(images: Tensor, prompts: Sequence[str], model: nn.Module | None = None) -> float:
    """Offline alignment score: mean 100 cos(image, prompt) of :class:`AlignmentProxy` (a proxy)."""
    model = model or load_proxy("alignment")
    return float(model.score(_images("images", images), prompts).mean())


def evaluate(
    generated: Tensor, prompts: Sequence[str], reference: Tensor, profile: str | None = None
) -> dict[str, float]:
    """Both metrics of ``profile`` for ``generated`` ``(N, 1, H, W)`` vs ``reference`` real images.

    Returns ``{"fid": ..., "clip_score": ...}`` (paper) or ``{"fid_proxy": ..., "alignment_proxy": ...}``
    (offline); :data:`LABELS` says how to name each key in a table.
    """
    fns = _metric_fns(profile)
    return {name: fn(_images("generated", generated), list(prompts), reference) for name, fn in fns.items()}


def _metric_fns(profile: str | None) -> dict[str, Callable[[Tensor, list[str], Tensor], float]]:
    """``name -> fn(generated, prompts, reference)`` for ``profile`` (default: the active one)."""
    from selora.profile import profile as active_profile

    name = profile or active_profile()
    if name == "paper":
        return {"fid": lambda gen, prompts, real: inception_fid(real, gen),
                "clip_score": lambda gen, prompts, real: clip_score(gen, prompts)}
    if name == "offline":
        return {"fid_proxy": lambda gen, prompts, real: fid_proxy(real, gen),
                "alignment_proxy": lambda gen, prompts, real: alignment_proxy(gen, prompts)}
    raise ValueError(f"profile={name!r}: expected 'offline' or 'paper'")


def images_from_pil(images: Sequence) -> Tensor:
    """PIL images (RGB or L, same size) -> ``(N, 1, H, W)`` in [-1, 1] (RGB averaged to gray)."""
    arrays = [np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images]
    if not arrays or len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images: expected a non-empty list of equally sized PIL images, got {len(arrays)} images")
    return torch.from_numpy(np.stack(arrays))[:, None] * 2 - 1


def trainer_metrics(profile: str | None = None) -> dict[str, Callable[[list, list[str], Tensor], float]]:
    """The profile's two metrics as ``name -> fn(PIL images, prompts, real (n, 1, H, W)) -> float``,
    the form of ``selora.train.EVAL_METRICS``; names are :data:`LABELS` keys."""
    return {name: (lambda ims, prompts, real, fn=fn: fn(images_from_pil(ims), list(prompts), real))
            for name, fn in _metric_fns(profile).items()}
