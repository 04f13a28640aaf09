"""The held-out check during training (after an epoch, or where ``--max-steps`` ends a run):
held-out loss, a sample grid and extra metrics (main process).

Extra metrics (FID, CLIP score, the offline proxies) are ``name -> fn(images, prompts, real) -> float``
with the grid's PIL images, their prompts and the real images ``(n, 1, H, W)`` in [-1, 1]; they are
computed when the grid shows held-out prompts (real images known) and has at least 2 images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from selora.config import TrainConfig, is_offline_demo
from selora.diffusion import EncodedSplit, add_noise, loss_target, per_sample_errors
from selora.distributed import Dist
from selora.dtypes import AUTOCAST
from selora.params import count_parameters
from selora.pipeline import DiffusionModel
from selora.profile import profile
from selora.rundir import SAMPLES
from selora.sample import generate, image_grid, to_pil

MetricFn = Callable[[list, list[str], torch.Tensor], float]


def metric_profile(cfg: TrainConfig) -> str:
    """Whose metrics fit a run, from ITS data and model (not from the active profile): ``"offline"``
    (the validated proxies) for the phantom data or the mini SD, ``"paper"`` (FID / CLIP score) for
    real data on a real model. A GPU does not make phantom images worth an FID."""
    return "offline" if is_offline_demo(cfg) else "paper"


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
    """Checks ``model`` (the adapted UNet + text encoder of ``pipe``) on ``eval_data`` (the config's
    ``eval_split``) and, when that is not the test split, the loss on ``test_data`` too; sample
    grids go to ``run_dir/samples``. ``metrics``: extra metrics (default :func:`default_metrics`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        dist: Dist,
        pipe: Any,
        model: DiffusionModel,
        noise_scheduler: Any,
        eval_data: EncodedSplit,
        test_data: EncodedSplit | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.dist, self.pipe, self.model = cfg, Path(run_dir), dist, pipe, model
        self.noise_scheduler, self.eval_data, self.test_data = noise_scheduler, eval_data, test_data
        self.autocast = AUTOCAST[cfg.mixed_precision]
        self.metrics = dict(default_metrics(cfg) if metrics is None else metrics)

    @torch.no_grad()
    def eval_loss(self, data: EncodedSplit | None = None) -> float:
        """Held-out MSE on ``data`` (default ``eval_data``) against the :func:`~selora.diffusion.loss_target`
        (eps or v) with fixed noise/timesteps (the same draw at every evaluation), over every process."""
        data = self.eval_data if data is None else data
        g, dist, sched = torch.Generator().manual_seed(self.cfg.seed + 2), self.dist, self.noise_scheduler
        n = len(data)
        eps_latent = torch.randn(data.mean.shape, generator=g)
        noise = torch.randn(data.mean.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
        mine = torch.arange(dist.rank, n, dist.world)
        total = torch.zeros(2, dtype=torch.float64)
        for idx in mine.split(self.cfg.batch_size):
            z0 = data.mean[idx] + data.std[idx] * eps_latent[idx]
            noisy = add_noise(sched, z0, noise[idx], t[idx]).to(dist.device)
            with torch.autocast(dist.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                pred = self.model(noisy, t[idx].to(dist.device), data.ids[idx].to(dist.device))
            err = per_sample_errors(pred, loss_target(sched, z0, noise[idx], t[idx]))
            total += torch.stack([err.sum().double(), torch.tensor(float(len(idx)), dtype=torch.float64)])
        total = dist.all_sum(total).cpu()
        return (total[0] / total[1]).item()

    def sample_prompts(self) -> tuple[list[str], torch.Tensor | None]:
        """Prompts of the sample grid and their real images (None for configured prompts)."""
        cfg, data = self.cfg, self.eval_data
        k = cfg.num_samples
        if cfg.sample_prompts is not None:
            return list(cfg.sample_prompts)[:k], None
        n = len(data)
        idx = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(k, n))})
        return [data.prompts[i] for i in idx], data.images[idx]

    def record(self, step: int, epoch: int, mid_epoch: bool = False) -> dict[str, Any]:
        """The evaluation record at optimizer step ``step`` of ``epoch``: held-out loss (all
        processes), total rank, parameter counts; on the main process the sample grid (named by
        epoch, or by step at a ``mid_epoch`` end) and :attr:`metrics`."""
        adapters = self.model.adapters
        adapters.eval()
        counts = count_parameters(self.model)
        record: dict[str, Any] = {
            "kind": "eval",
            "step": step,
            "epoch": epoch,
            "eval_loss": self.eval_loss(),
            **({} if self.test_data is None else {"test_loss": self.eval_loss(self.test_data)}),  # eval split != test
            "total_rank": sum(adapters.ranks().values()),
            "trainable": counts.trainable,
            "base": counts.base,
            "trainable_fraction": counts.fraction,
        }
        if self.dist.main and self.cfg.num_samples > 0:
            record.update(self._samples(f"step-{step:06d}.png" if mid_epoch else f"epoch-{epoch:03d}.png"))
        return record

    def _samples(self, name: str) -> dict[str, Any]:
        """The sample grid saved as ``samples/<name>`` (and the real scans once) and the metrics on it."""
        cfg, dev = self.cfg, self.dist.device
        prompts, real = self.sample_prompts()
        with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
            images = generate(
                self.pipe,
                prompts,
                cfg.resolution,
                cfg.sample_steps,
                cfg.guidance_scale,
                seed=cfg.seed,
                batch=len(prompts),
                progress=False,
            )
        out = self.run_dir / SAMPLES
        out.mkdir(exist_ok=True)
        image_grid(images, prompts).save(out / name)
        if real is not None and not (out / "real.png").is_file():
            image_grid(to_pil(real), prompts).save(out / "real.png")  # the held-out scans themselves
        found: dict[str, Any] = {"samples": f"{SAMPLES}/{name}"}
        if real is not None and len(images) >= 2:  # a Fréchet distance needs two samples
            for metric, fn in self.metrics.items():
                found[metric] = float(fn(images, prompts, real))
        return found
