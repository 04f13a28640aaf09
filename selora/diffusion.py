"""Latent diffusion, the parts fine-tuning needs: token ids, VAE latents, the DDPM forward process
and the noise-prediction loss (paper Sec. 4).

    z0 ~ q(z | x) (the VAE posterior, scaled by the VAE's ``scaling_factor``)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                   (DDPM forward process)
    loss = || eps_theta(z_t, t, c) - eps ||^2                       (mean over the batch)

The target is eps for a pipeline whose scheduler config says ``prediction_type: epsilon`` (SD v1.5,
the mini SD) and the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 for ``v_prediction``
(:func:`loss_target`); any other prediction type is refused (:func:`noise_scheduler`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from selora.config import ConfigError
from selora.io import atomic_save_safetensors
from selora.paths import cache_dir

#: Scheduler ``prediction_type`` values training supports (the loss target: eps or v).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(N, 77)``: padded to and truncated at ``tokenizer.model_max_length`` (start + 75 + end)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def noise_scheduler(pipe):
    """The DDPM training schedule of ``pipe`` (its scheduler's betas, timesteps and prediction type).

    ConfigError (one line, naming the pipeline's scheduler config) for a prediction type other than
    :data:`PREDICTION_TYPES`.
    """
    from diffusers import DDPMScheduler

    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        source = getattr(pipe, "name_or_path", None) or "the pipeline"
        raise ConfigError(
            f"{source}/scheduler/scheduler_config.json: prediction_type={kind!r}; "
            "training supports 'epsilon' or 'v_prediction'"
        )
    return DDPMScheduler.from_config(pipe.scheduler.config)


def loss_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict ``(N, 4, h, w)``: the noise ``eps`` (``epsilon``) or the
    velocity ``sqrt(abar_t) eps - sqrt(1 - abar_t) z0`` (``v_prediction``), as ``scheduler`` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    raise ValueError(f"prediction_type={kind!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def add_noise(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process ``z_t`` ``(N, 4, h, w)`` for latents ``z0``, noise ``eps`` and steps ``t`` ``(N,)``."""
    return scheduler.add_noise(z0, noise, t)


def noise_prediction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: MSE of the UNet's prediction ``(N, 4, h, w)`` against the :func:`loss_target`
    (the true noise for an eps-prediction model), in float32."""
    return F.mse_loss(pred.float(), target.float())


def per_sample_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Prediction MSE against the :func:`loss_target` per sample ``(N,)`` on the CPU, in float32."""
    return (pred.float().cpu() - target).pow(2).flatten(1).mean(1)


def training_batch(
    data: EncodedSplit,
    idx: torch.Tensor,
    generator: torch.Generator,
    scheduler,
    empty_ids: torch.Tensor,
    prompt_dropout: float,
    part: slice = slice(None),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch ``(noisy latents, t, ids, target)`` for the data-set indices ``idx`` (N,);
    the target is the noise or the velocity (:func:`loss_target`).

    Every random draw is made for the WHOLE batch from ``generator`` (a latent sample of the cached
    posterior, the noise, the timesteps, which prompts are dropped to the empty prompt ``empty_ids``
    with probability ``prompt_dropout``), then ``part`` is sliced out, so N processes each taking
    their part see exactly what one process with the whole batch sees.
    """
    n = len(idx)
    shape = (n, *data.mean.shape[1:])
    eps_latent = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    drop = torch.rand(n, generator=generator) < prompt_dropout
    idx = idx[part]
    z0 = data.mean[idx] + data.std[idx] * eps_latent[part]  # a sample of the cached posterior
    noisy = add_noise(scheduler, z0, noise[part], t[part])
    target = loss_target(scheduler, z0, noise[part], t[part])
    ids = torch.where(drop[part, None], empty_ids, data.ids[idx])
    return noisy.to(device), t[part].to(device), ids.to(device), target.to(device)


@torch.no_grad()
def vae_posterior(
    vae: nn.Module,
    images: torch.Tensor,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior ``(mean, std)`` ``(N, 4, h, w)`` of ``images`` ``(N, C, R, R)`` in [-1, 1], on the CPU.

    Grayscale images are repeated to the VAE's input channels.
    """
    ref = next(vae.parameters())
    means, stds = [], []
    for part in images.split(chunk):
        x = part.expand(-1, vae.config.in_channels, -1, -1).to(ref)
        posterior = vae.encode(x).latent_dist
        # contiguous: the VAE may return channels-last views, which would change the UNet's numerics
        means.append(posterior.mean.float().cpu().contiguous())
        stds.append(posterior.std.float().cpu().contiguous())
    return torch.cat(means), torch.cat(stds)


@dataclass
class EncodedSplit:
    """One split encoded once: latent posterior ``mean``/``std`` ``(N, 4, h, w)`` (scaled by the
    VAE scaling factor), token ``ids`` ``(N, 77)``, ``prompts`` and (if kept) the ``images``
    ``(N, 1, R, R)`` in [-1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor
    ids: torch.Tensor
    prompts: list[str]
    images: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.prompts)


def fingerprint(images: torch.Tensor, vae: nn.Module) -> str:
    """sha256 of the images and the VAE weights (the latent cache key), 16 hex chars."""
    digest = hashlib.sha256()
    digest.update(images.float().numpy().tobytes())
    for name, t in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_split(
    ds, vae: nn.Module, tokenizer, num_workers: int = 0, tag: str = "split", chunk: int = 16, keep_images: bool = False
) -> EncodedSplit:
    """VAE posterior of every image of data set ``ds`` (cached in ``cache_dir("latents")``) and the
    prompts' token ids (:func:`tokenize`)."""
    from torch.utils.data import DataLoader

    images, prompts = [], []
    for batch in DataLoader(ds, batch_size=chunk, num_workers=num_workers):
        images.append(batch["image"].float())
        prompts.extend(batch["prompt"])
    stack = torch.cat(images)
    path = cache_dir("latents") / f"{tag}-{fingerprint(stack, vae)}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        mean, std = cached["mean"], cached["std"]
    else:
        mean, std = vae_posterior(vae, stack, chunk)
        atomic_save_safetensors({"mean": mean.contiguous(), "std": std.contiguous()}, path)
    scale = float(vae.config.scaling_factor)
    return EncodedSplit(
        mean * scale, std * scale, tokenize(tokenizer, prompts), prompts, stack if keep_images else None
    )
