"""The base model per profile: Stable Diffusion v1.5 (paper) or the shipped mini SD (offline).

Both go through the same ``StableDiffusionPipeline.from_pretrained`` call; only the source
differs. The paper names ``runwayml/stable-diffusion-v1-5``, which has been removed from the
Hugging Face hub; ``stable-diffusion-v1-5/stable-diffusion-v1-5`` is the maintained mirror of the
same weights. The offline model is a genuine diffusers pipeline folder in ``selora/assets/mini-sd/``
(built by ``scripts/build_mini_sd.py``) and is loaded with the hub switched off.
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from selora.paths import ASSETS_DIR
from selora.profile import device as default_device
from selora.profile import profile as active_profile

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MINI_SD_DIR = ASSETS_DIR / "mini-sd"
RESOLUTION = {"paper": 224, "offline": 64}  # image side in pixels (paper: 224 x 224 crops)


def _check(profile: str | None) -> str:
    name = profile or active_profile()
    if name not in RESOLUTION:
        raise ValueError(f"profile {name!r}: expected one of {', '.join(RESOLUTION)}")
    return name


def resolution(profile: str | None = None) -> int:
    """Training/sampling image side for ``profile`` (default: the active one): 224 paper, 64 offline."""
    return RESOLUTION[_check(profile)]


def sd15_scheduler_config() -> dict[str, object]:
    """SD v1.5's noise schedule: 1000 steps, "scaled_linear" betas 0.00085 -> 0.012, eps prediction."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }


def load_pipeline(
    profile: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> StableDiffusionPipeline:
    """The base StableDiffusionPipeline of ``profile`` in ``dtype`` on ``device``, safety checker off.

    paper: ``from_pretrained(SD15_MODEL_ID)`` (downloads ~4 GB once into the HF cache);
    offline: ``from_pretrained(MINI_SD_DIR, local_files_only=True)``, never touching the network.
    """
    name = _check(profile)
    if name == "paper":
        source, local = SD15_MODEL_ID, False
    else:
        if not (MINI_SD_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{MINI_SD_DIR}: the offline model folder is missing model_index.json "
                "(rebuild it with `python scripts/build_mini_sd.py`)"
            )
        source, local = str(MINI_SD_DIR), True
    pipe = StableDiffusionPipeline.from_pretrained(
        source,
        torch_dtype=dtype,
        local_files_only=local,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device if device is not None else default_device())
