"""The offline metrics: two small models trained by ``scripts/train_proxies.py`` on the phantom TRAIN
split and shipped in ``selora/assets/proxies/``, their file I/O, and the scores computed with them.

- :class:`FrechetProxy`: a feature extractor for a Fréchet distance (:func:`fid_proxy`);
- :class:`AlignmentProxy`: a contrastive image–text model for an alignment score (:func:`alignment_proxy`).

Their numbers are always labelled "proxy" (:data:`selora.metrics.LABELS`) and are not comparable
with the paper's FID / CLIP score. Images everywhere are model outputs: ``(N, 1, H, W)`` (or
``(N, 3, H, W)``) floats in [-1, 1], checked by :func:`check_images` (shared with :mod:`selora.metrics`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from selora.frechet import frechet_distance_features
from selora.io import atomic_save_safetensors
from selora.paths import ASSETS_DIR
from selora.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, load_clip_tokenizer

__all__ = [
    "PROXIES",
    "PROXY_DIR",
    "PROXY_SIZE",
    "AlignmentProxy",
    "ConvEncoder",
    "FrechetProxy",
    "alignment_proxy",
    "check_images",
    "fid_proxy",
    "hashed_ngrams",
    "load_proxy",
    "proxy_features",
    "save_proxy",
]

PROXY_DIR = ASSETS_DIR / "proxies"
PROXY_SIZE = 64  # the offline resolution the proxies are trained at


def check_images(name: str, images: Tensor) -> Tensor:
    """``images`` ``(N, 1|3, H, W)`` (finite; in [-1, 1] by convention) detached, as float32.

    Anything else is a ValueError naming ``name`` (the argument of the caller).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor (N, 1 or 3, H, W) in [-1, 1], got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return images.detach().float()


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
        x = check_images("images", images).to(next(self.parameters()).device)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if tuple(x.shape[-2:]) != (PROXY_SIZE, PROXY_SIZE):
            x = F.interpolate(
                x,
                size=(PROXY_SIZE, PROXY_SIZE),
                mode="bilinear",
                antialias=x.shape[-1] > PROXY_SIZE,
                align_corners=False,
            )
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
    bi = [(a * (VOCAB_SIZE + 1) + b) * 2654435761 % buckets for a, b in pairwise(ids)]
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
    state = {
        k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
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
    return torch.cat([model.features(chunk) for chunk in check_images("images", images).split(batch_size)])


def fid_proxy(real: Tensor, fake: Tensor, model: nn.Module | None = None) -> float:
    """Offline Fréchet distance: :func:`frechet_distance` on :class:`FrechetProxy` features (a proxy)."""
    model = model or load_proxy("frechet")
    return frechet_distance_features(proxy_features(real, model), proxy_features(fake, model))


@torch.no_grad()
def alignment_proxy(images: Tensor, prompts: Sequence[str], model: nn.Module | None = None) -> float:
    """Offline alignment score: mean 100 cos(image, prompt) of :class:`AlignmentProxy` (a proxy)."""
    model = model or load_proxy("alignment")
    return float(model.score(check_images("images", images), prompts).mean())
