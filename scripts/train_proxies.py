"""Train the two offline metric proxies on the phantom TRAIN split and write them as safetensors.

- ``frechet.safetensors``: :class:`selora.proxies.FrechetProxy`, a small CNN trained to predict sex,
  age and abnormality; its 64-d features feed the offline Fréchet distance.
- ``alignment.safetensors``: :class:`selora.proxies.AlignmentProxy`, a tiny contrastive (InfoNCE)
  image–text model; its cosine similarity is the offline alignment score.

Only the train split (80 %, grouped by patient) of the phantom Montgomery set at 64 px is read;
the test split stays held out for the validation tests (tests/test_proxies.py). Augmentation is
limited to small shifts and exposure changes, never blur or noise, so the Fréchet proxy stays
sensitive to exactly the degradations its validation measures. Weights are stored in float16
with their provenance (case ids, data hash, seed, steps, versions) in the safetensors metadata.

    python scripts/train_proxies.py                      # the shipped files (~1 min CPU, 1 thread)
    python scripts/train_proxies.py --steps 20 --out DIR # a smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selora.data import montgomery_root
from selora.data.errors import DataError
from selora.data.montgomery import MontgomeryDataset
from selora.profile import seed_everything, set_threads
from selora.proxies import PROXY_DIR, PROXY_SIZE, AlignmentProxy, FrechetProxy, save_proxy


def augment(images: torch.Tensor, gen: torch.Generator, shift: int = 3) -> torch.Tensor:
    """Random shifts of up to ``shift`` px (edge padding) and exposure jitter; ``(N, 1, S, S)``."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    gain = 1 + 0.05 * torch.randn(n, 1, 1, 1, generator=gen)
    bias = 0.05 * torch.randn(n, 1, 1, 1, generator=gen)
    return ((out + 1) * gain - 1 + bias).clamp(-1, 1)


def targets(ds: MontgomeryDataset) -> torch.Tensor:
    """``(N, 3)``: male (1/0, NaN for sex "O"), abnormal (1/0), age / 100."""
    sex = {"M": 1.0, "F": 0.0, "O": float("nan")}
    return torch.tensor([[sex[c.sex], float(c.abnormal), c.age / 100] for c in ds.cases])


def frechet_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE on sex (known sexes only) and abnormality, MSE on age / 100."""
    known = ~torch.isnan(y[:, 0])
    sex = F.binary_cross_entropy_with_logits(out[known, 0], y[known, 0])
    return sex + F.binary_cross_entropy_with_logits(out[:, 1], y[:, 1]) + 10 * F.mse_loss(out[:, 2], y[:, 2])


def info_nce(model: AlignmentProxy, images: torch.Tensor, tokens: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Symmetric contrastive loss over the batch (CLIP's objective); ``tokens`` from ``model.tokenize``."""
    logits = model.logit_scale.exp() * model.embed_images(images) @ model.embed_tokens(*tokens).T
    labels = torch.arange(images.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train(
    model: torch.nn.Module, loss_fn, images: torch.Tensor, steps: int, lr: float, gen: torch.Generator, name: str
) -> list[float]:
    """Full-batch AdamW with cosine decay; ``loss_fn(model, augmented images)``; returns the loss log."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log = []
    for step in range(steps):
        loss = loss_fn(model, augment(images, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  {name} step {step + 1:4d}/{steps}: loss {log[-1]:.4f}", flush=True)
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=PROXY_DIR, help="output folder (default: the shipped assets)")
    ap.add_argument("--steps", type=int, default=400, help="full-batch steps per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", type=Path, help="folder holding MontgomerySet/ (default: the phantom set)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps {args.steps}: expected >= 1", file=sys.stderr)
        return 2
    set_threads(1)
    gen = seed_everything(args.seed)
    try:
        root = args.data_root or montgomery_root("offline")
        ds = MontgomeryDataset(root, split="train", size=PROXY_SIZE, seed=0)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).float()
    prompts, y = [c.prompt for c in ds.cases], targets(ds)
    provenance = {
        "split": "train",
        "cases": [c.case_id for c in ds.cases],
        "data_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
        "size": PROXY_SIZE,
        "seed": args.seed,
        "steps": args.steps,
        "torch": torch.__version__,
        "script": "scripts/train_proxies.py",
    }
    print(f"training proxies on {len(ds)} train-split images ({PROXY_SIZE} px), {args.steps} steps each")
    start = time.perf_counter()
    frechet = FrechetProxy()
    train(frechet, lambda m, x: frechet_loss(m(x), y), images, args.steps, 3e-3, gen, "frechet")
    alignment = AlignmentProxy()
    tokens = alignment.tokenize(prompts)
    train(alignment, lambda m, x: info_nce(m, x, tokens), images, args.steps, 3e-3, gen, "alignment")
    for name, model in (("frechet", frechet), ("alignment", alignment)):
        path = save_proxy(model, args.out / f"{name}.safetensors", provenance)
        print(f"wrote {path.name}: {path.stat().st_size / 1e6:.2f} MB")
    print(f"runtime: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
