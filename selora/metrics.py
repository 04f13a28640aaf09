"""Image-generation metrics of a profile: FID and CLIP score (paper), the validated offline proxies.

- Paper profile (numbers comparable to the literature; the weights are downloaded once):
  :func:`inception_fid` (torchmetrics ``FrechetInceptionDistance``, Inception-v3 pool features; the
  Fréchet distance of :mod:`selora.frechet`) and :func:`clip_score` (CLIP ViT-L/14 through
  transformers; the definition of torchmetrics ``CLIPScore``).
- Offline profile (no weights can be downloaded): :func:`selora.proxies.fid_proxy` and
  :func:`selora.proxies.alignment_proxy`, small models shipped with the package. Their numbers are
  always labelled "proxy" (:data:`LABELS`) and are not comparable with the paper's FID / CLIP score.

:data:`METRICS` holds every metric by name and :data:`PROFILE_METRICS` names each profile's two (its
Fréchet distance and its image-text alignment); :func:`evaluate` and :func:`trainer_metrics` compute them.
Images everywhere are model outputs: ``(N, 1, H, W)`` (or ``(N, 3, H, W)``) floats in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selora.distributed import default_device
from selora.profile import profile as active_profile
from selora.profile import require_online
from selora.proxies import alignment_proxy, check_images, fid_proxy
from selora.tokenizer import CONTEXT_LENGTH

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CLIP_MODEL_ID",
    "INCEPTION_SIZE",
    "LABELS",
    "METRICS",
    "PROFILE_METRICS",
    "ProfileMetrics",
    "clip_score",
    "alignment_metric",
    "evaluate",
    "frechet_metric",
    "images_from_pil",
    "inception_fid",
    "profile_metrics",
    "to_unit_rgb",
    "trainer_metrics",
    "truncate_prompts",
]

INCEPTION_SIZE = 299  # Inception-v3 input side; images are resized to it explicitly (bilinear)
CLIP_MODEL_ID = "openai/clip-vit-large-patch14"  # SD v1.5's text tower; torchmetrics' default

#: Result keys -> what a table or figure must call them. Offline numbers say "proxy".
LABELS = {
    "fid": "FID",
    "clip_score": "CLIP score",
    "fid_proxy": "Fréchet distance (offline proxy)",
    "alignment_proxy": "alignment score (offline proxy)",
}


# ---------------------------------------------------------------- image preparation


def to_unit_rgb(images: Tensor, size: int | None = None) -> Tensor:
    """``(N, 1|3, H, W)`` in [-1, 1] -> ``(N, 3, size, size)`` in [0, 1].

    Grayscale is repeated into 3 channels; with ``size`` the square image is resized (bilinear,
    antialiased when shrinking). Values outside [-1, 1] are clipped.
    """
    x = (check_images("images", images).clamp(-1, 1) + 1) / 2
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
        require_online("the Inception-v3 weights for FID")
    fid = FrechetInceptionDistance(feature=feature, normalize=True, input_img_size=(3, INCEPTION_SIZE, INCEPTION_SIZE))
    fid = fid.to(default_device())  # Inception on the GPU when there is one
    for flag, images in ((True, real), (False, fake)):
        for chunk in check_images("real" if flag else "fake", images).split(batch_size):
            fid.update(to_unit_rgb(chunk, INCEPTION_SIZE).to(fid.device), real=flag)
    return float(fid.compute())


def truncate_prompts(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int = CONTEXT_LENGTH
) -> list[str]:
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


@lru_cache(maxsize=1)
def _load_clip() -> tuple[nn.Module, object]:
    """CLIP ViT-L/14 and its processor, loaded once per process, on the GPU when there is one."""
    from transformers import CLIPModel, CLIPProcessor

    require_online(f"the CLIP weights ({CLIP_MODEL_ID}) for the CLIP score")
    model = CLIPModel.from_pretrained(CLIP_MODEL_ID).eval().to(default_device())
    return model, CLIPProcessor.from_pretrained(CLIP_MODEL_ID)


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
    images = check_images("images", images)
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
        txt = _embedding(
            model.get_text_features(
                input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
            )
        )
        scores.append(100 * F.cosine_similarity(img.float(), txt.float(), dim=-1))
    return max(float(torch.cat(scores).mean()), 0.0)


#: Every metric by result key: ``fn(generated, prompts, reference) -> float`` on images ``(N, 1, H, W)``.
METRICS: dict[str, Callable[[Tensor, list[str], Tensor], float]] = {
    "fid": lambda gen, prompts, real: inception_fid(real, gen),
    "clip_score": lambda gen, prompts, real: clip_score(gen, prompts),
    "fid_proxy": lambda gen, prompts, real: fid_proxy(real, gen),
    "alignment_proxy": lambda gen, prompts, real: alignment_proxy(gen, prompts),
}


@dataclass(frozen=True)
class ProfileMetrics:
    """A profile's two metrics by :data:`METRICS` key: its Fréchet distance and its image-text alignment."""

    frechet: str
    alignment: str


#: Which metrics each profile scores with.
PROFILE_METRICS = {
    "paper": ProfileMetrics(frechet="fid", alignment="clip_score"),
    "offline": ProfileMetrics(frechet="fid_proxy", alignment="alignment_proxy"),
}


def profile_metrics(profile: str | None = None) -> ProfileMetrics:
    """The metric names of ``profile`` (default: the active one); ValueError for an unknown profile."""
    name = profile or active_profile()
    if name not in PROFILE_METRICS:
        raise ValueError(f"profile={name!r}: expected {' or '.join(map(repr, sorted(PROFILE_METRICS)))}")
    return PROFILE_METRICS[name]


def _metric_fns(profile: str | None) -> dict[str, Callable[[Tensor, list[str], Tensor], float]]:
    """``name -> fn(generated, prompts, reference)`` for ``profile``: its Fréchet distance, then its alignment."""
    chosen = profile_metrics(profile)
    return {name: METRICS[name] for name in (chosen.frechet, chosen.alignment)}


def evaluate(
    generated: Tensor, prompts: Sequence[str], reference: Tensor, profile: str | None = None
) -> dict[str, float]:
    """Both metrics of ``profile`` for ``generated`` ``(N, 1, H, W)`` vs ``reference`` real images.

    Returns ``{"fid": ..., "clip_score": ...}`` (paper) or ``{"fid_proxy": ..., "alignment_proxy": ...}``
    (offline); :data:`LABELS` says how to name each key in a table.
    """
    fns = _metric_fns(profile)
    return {name: fn(check_images("generated", generated), list(prompts), reference) for name, fn in fns.items()}


def frechet_metric(profile: str | None = None) -> Callable[[Tensor, Tensor], float]:
    """The profile's Fréchet distance ``fn(real, generated)`` on images ``(N, 1, H, W)``: FID (paper)
    or the Fréchet proxy (offline), :attr:`ProfileMetrics.frechet`."""
    fid = METRICS[profile_metrics(profile).frechet]
    return lambda real, generated: fid(check_images("generated", generated), [], real)


def alignment_metric(profile: str | None = None) -> Callable[[Tensor, Sequence[str]], float]:
    """The profile's image-text alignment ``fn(images, prompts)``: CLIP score (paper) or the alignment
    proxy (offline), :attr:`ProfileMetrics.alignment`."""
    align = METRICS[profile_metrics(profile).alignment]
    return lambda images, prompts: align(check_images("images", images), list(prompts), images)


def images_from_pil(images: Sequence) -> Tensor:
    """PIL images (RGB or L, same size) -> ``(N, 1, H, W)`` in [-1, 1] (RGB averaged to gray)."""
    arrays = [np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images]
    if not arrays or len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images: expected a non-empty list of equally sized PIL images, got {len(arrays)} images")
    return torch.from_numpy(np.stack(arrays))[:, None] * 2 - 1


def trainer_metrics(profile: str | None = None) -> dict[str, Callable[[list, list[str], Tensor], float]]:
    """The profile's two metrics as ``name -> fn(PIL images, prompts, real (n, 1, H, W)) -> float``,
    the form of :data:`selora.held_out.MetricFn` (the trainer's per-epoch metrics); names are :data:`LABELS` keys."""
    return {
        name: (lambda ims, prompts, real, fn=fn: fn(images_from_pil(ims), list(prompts), real))
        for name, fn in _metric_fns(profile).items()
    }
