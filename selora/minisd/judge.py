"""A classifier of every prompt attribute, trained on rendered examples, that judges generated samples.

"The pretrained model follows its prompts" is measured, not eyeballed: the judge is trained on
fresh renders of both domains (ground truth by construction), checked on held-out renders, and
then reads each sample generated from a prompt; per attribute, the fraction of samples whose
judged class is the class the prompt states.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selora.minisd.domains import ATTRIBUTES, DOMAINS, stated


class Judge(nn.Module):
    """Four stride-2 convolutions (128 -> 8 px), then one linear head per attribute; images (B, 3, S, S) in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = (3, width, width, 2 * width, 2 * width)
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(128 * width, 256))
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, (B, classes)."""
        h = F.silu(self.features(images * 2 - 1))
        return {k: head(h) for k, head in self.heads.items()}


def _targets(attrs: list[dict[str, str]], domain: str) -> dict[str, torch.Tensor]:
    """Class indices per attribute, -100 (ignored) for attributes another domain owns."""
    out = {"domain": torch.full((len(attrs),), tuple(DOMAINS).index(domain))}
    for k, classes in ATTRIBUTES.items():
        if k != "domain":
            out[k] = torch.tensor([classes.index(a[k]) if k in a else -100 for a in attrs])
    return out


def loss_and_hits(
    judge: Judge, batches: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy over attributes and domains, and (hits, counts) per attribute."""
    loss, hits = torch.zeros(()), {}
    for images, targets in batches:
        logits = judge(images)
        for k, y in targets.items():
            keep = y >= 0
            if keep.any():
                loss = loss + F.cross_entropy(logits[k][keep], y[keep])
                h, n = hits.get(k, (0, 0))
                hits[k] = (h + int((logits[k][keep].argmax(1) == y[keep]).sum()), n + int(keep.sum()))
    return loss, hits


def as_batch(imgs: np.ndarray, attrs: list[dict[str, str]], domain: str) -> tuple[torch.Tensor, dict]:
    """uint8 images (n, 3, S, S) and their attributes -> (float images in [0, 1], targets)."""
    return torch.from_numpy(imgs).float() / 255, _targets(attrs, domain)


@torch.no_grad()
def judge_samples(judge: Judge, images: np.ndarray, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Per attribute: accuracy of the judged class against the class each prompt states, and the count.

    ``images``: (n, S, S, 3) float in [0, 1] as a pipeline returns them (``output_type="np"``).
    """

    logits = judge(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float())
    out: dict[str, dict[str, float]] = {}
    for k, classes in ATTRIBUTES.items():
        pairs = [(i, classes.index(stated(p)[k])) for i, p in enumerate(prompts) if k in stated(p)]
        if pairs:
            idx, want = map(torch.tensor, zip(*pairs))
            out[k] = {"accuracy": float((logits[k][idx].argmax(1) == want).float().mean()), "n": len(pairs)}
    return out
