"""The evaluation after an epoch: held-out loss, a sample grid and extra metrics (main process).

Extra metrics (FID, CLIP score, the offline proxies) are ``name -> fn(images, prompts, real) -> float``
with the grid's PIL images, their prompts and the real images ``(n, 1, H, W)`` in [-1, 1]; they are
computed when the grid shows held-out prompts (real images known) and has at least 2 images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from selora.config import TrainConfig
from selora.diffusion import add_noise, loss_target, per_sample_errors
from selora.profile import profile
from selora.rundir import SAMPLES
from selora.sample import generate, image_grid, to_pil

MetricFn = Callable[[list, list[str], torch.Tensor], float]


def metric_profile(cfg: TrainConfig) -> str:
    """Whose metrics fit a run, from ITS data and model (not from the active profile): ``"offline"``
    (the validated proxies) for the phantom data or the mini SD, ``"paper"`` (FID / CLIP score) for
    real data on a real model. A GPU does not make phantom images worth an FID."""
    return "offline" if cfg.dataset == "montgomery-phantom" or cfg.model == "mini-sd" else "paper"


def default_metrics(cfg: TrainConfig | None = None) -> dict[str, MetricFn]:
    """The per-epoch metrics of a run with config ``cfg`` (:func:`metric_profile`; without ``cfg``,
    the active profile): the shipped proxies (cheap, no download) for phantom data / the mini SD;
    none on real data, since FID / CLIP score on a 4-image grid mean little and need downloads
    (``selora.evaluate`` computes them on the whole test split)."""
    if (metric_profile(cfg) if cfg is not None else profile()) != "offline":
        return {}
    from selora.metrics import trainer_metrics

    return trainer_metrics("offline")


class Evaluator:
    """Evaluates a :class:`~selora.trainer.Trainer`'s model on its held-out split (``trainer.eval``).

    ``trainer`` is typed ``Any``: the trainer imports this module, so this one does not import it.
    """

    def __init__(self, trainer: Any, metrics: Mapping[str, MetricFn] | None = None) -> None:
        self.trainer = trainer
        self.metrics = dict(default_metrics(trainer.cfg) if metrics is None else metrics)

    @torch.no_grad()
    def eval_loss(self, data: Any = None) -> float:
        """Held-out MSE on ``data`` (default the eval split, ``trainer.eval``) against the
        :func:`~selora.diffusion.loss_target` (eps or v) with fixed noise/timesteps (same draw every evaluation)."""
        tr = self.trainer
        data = tr.eval if data is None else data
        g, dist = torch.Generator().manual_seed(tr.cfg.seed + 2), tr.dist
        n = len(data)
        eps_latent = torch.randn(data.mean.shape, generator=g)
        noise = torch.randn(data.mean.shape, generator=g)
        t = torch.randint(0, tr.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
        mine = torch.arange(dist.rank, n, dist.world)
        total = torch.zeros(2, dtype=torch.float64)
        for idx in mine.split(tr.cfg.batch_size):
            z0 = data.mean[idx] + data.std[idx] * eps_latent[idx]
            noisy = add_noise(tr.noise_scheduler, z0, noise[idx], t[idx]).to(dist.device)
            with torch.autocast(dist.device.type, dtype=tr.autocast, enabled=tr.autocast is not None):
                pred = tr.model(noisy, t[idx].to(dist.device), data.ids[idx].to(dist.device))
            err = per_sample_errors(pred, loss_target(tr.noise_scheduler, z0, noise[idx], t[idx]))
            total += torch.stack([err.sum().double(), torch.tensor(float(len(idx)), dtype=torch.float64)])
        total = dist.all_sum(total).cpu()
        return (total[0] / total[1]).item()

    def sample_prompts(self) -> tuple[list[str], torch.Tensor | None]:
        """Prompts of the sample grid and their real images (None for configured prompts)."""
        cfg, data = self.trainer.cfg, self.trainer.eval
        k = cfg.num_samples
        if cfg.sample_prompts is not None:
            return list(cfg.sample_prompts)[:k], None
        n = len(data)
        idx = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(k, n))})
        return [data.prompts[i] for i in idx], data.images[idx]

    def evaluate(self) -> dict[str, Any]:
        """Eval loss (all processes), sample grid and :attr:`metrics` (main process); logs the record."""
        tr = self.trainer
        cfg, at = tr.cfg, tr.at
        tr.adapters.eval()
        record: dict[str, Any] = {
            "kind": "eval",
            "step": at.step,
            "epoch": at.epoch,
            "eval_loss": self.eval_loss(),
            **({} if tr.test is None else {"test_loss": self.eval_loss(tr.test)}),  # eval split != test
            "total_rank": tr.total_rank(),
            **tr.parameter_counts(),
        }
        if tr.dist.main and cfg.num_samples > 0:
            prompts, real = self.sample_prompts()
            dev = tr.dist.device
            with torch.autocast(dev.type, dtype=tr.autocast, enabled=tr.autocast is not None):
                images = generate(
                    tr.pipe,
                    prompts,
                    cfg.resolution,
                    cfg.sample_steps,
                    cfg.guidance_scale,
                    seed=cfg.seed,
                    batch=len(prompts),
                    progress=False,
                )
            out = tr.run_dir / SAMPLES
            out.mkdir(exist_ok=True)
            name = f"epoch-{at.epoch:03d}.png" if at.batch == 0 else f"step-{at.step:06d}.png"  # mid-epoch end
            image_grid(images, prompts).save(out / name)
            if real is not None and not (out / "real.png").is_file():
                image_grid(to_pil(real), prompts).save(out / "real.png")  # the held-out scans themselves
            record["samples"] = f"{SAMPLES}/{name}"
            if real is not None and len(images) >= 2:  # a Fréchet distance needs two samples
                for name, fn in self.metrics.items():
                    record[name] = float(fn(images, prompts, real))
        tr.log(record)
        return record
