"""The base models: Stable Diffusion v1.5 (paper profile) or the shipped mini SD (offline), and THE loader.

Both go through the same ``StableDiffusionPipeline.from_pretrained`` call; only the source
differs. The paper names ``runwayml/stable-diffusion-v1-5``, which has been removed from the
Hugging Face hub; ``stable-diffusion-v1-5/stable-diffusion-v1-5`` is the maintained mirror of the
same weights. The offline model is a genuine diffusers pipeline folder in ``selora/assets/mini-sd/``
(built by ``scripts/build_mini_sd.py``) and is loaded with the hub switched off.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging
from packaging.version import Version
from safetensors.torch import load_file, save
from transformers.utils import logging as transformers_logging

from selora.distributed import default_device
from selora.dtypes import HALF_DTYPES
from selora.io import atomic_write_bytes
from selora.paths import ASSETS_DIR
from selora.profile import PROFILES
from selora.profile import profile as active_profile


def _import_pipeline_class() -> type:
    """diffusers' ``StableDiffusionPipeline``, imported with transformers' notices muted: the import
    loads CLIP/SigLIP image processors (the safety checker's, never used here), and without
    torchvision transformers prints a fallback notice for each."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        transformers_logging.set_verbosity(verbosity)
    return StableDiffusionPipeline


StableDiffusionPipeline = _import_pipeline_class()

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MINI_SD_DIR = ASSETS_DIR / "mini-sd"
#: The base model each profile fine-tunes (config ``model`` values).
PROFILE_MODELS = {"paper": "sd-v1-5", "offline": "mini-sd"}


#: CLIP's ``text_model.`` module level. transformers 4 (and the hub's files) name every text-encoder weight
#: under it; transformers 5 dropped it from the module names, reads either naming and writes without it.
CLIP_TEXT_LEVEL = "text_model."


def without_clip_text_level(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with :data:`CLIP_TEXT_LEVEL` removed from the front of every name (transformers 5's naming)."""
    return {k.removeprefix(CLIP_TEXT_LEVEL): v for k, v in state.items()}


def write_clip_text_level(file: Path) -> None:
    """Rewrite a saved text-encoder ``model.safetensors`` in place with every name under
    :data:`CLIP_TEXT_LEVEL`, the naming every supported transformers major loads (4.x leaves
    level-less weights unused and the model random); tensors and their bytes are unchanged."""
    named = {CLIP_TEXT_LEVEL + k: v for k, v in without_clip_text_level(load_file(str(file))).items()}
    atomic_write_bytes(Path(file), save(named, {"format": "pt"}))  # a new file: the old one may be memory-mapped


def sd15_scheduler_config() -> dict[str, object]:
    """SD v1.5's noise schedule: 1000 steps, "scaled_linear" betas 0.00085 -> 0.012, eps prediction."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` from diffusers 0.40 on
    (``torch_dtype`` is deprecated there), ``torch_dtype`` before (where ``dtype`` is ignored)."""
    return "dtype" if Version(Version(diffusers.__version__).base_version) >= Version("0.40") else "torch_dtype"


def model_source(model: str) -> tuple[str, bool]:
    """``(from_pretrained source, local_files_only)`` of ``mini-sd``, ``sd-v1-5`` or a local pipeline folder."""
    if model == "sd-v1-5":
        return SD15_MODEL_ID, False
    folder = MINI_SD_DIR if model == "mini-sd" else Path(model)
    if not (folder / "model_index.json").is_file():
        hint = " (rebuild it with `python scripts/build_mini_sd.py`)" if model == "mini-sd" else ""
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json){hint}")
    return str(folder), True


#: The weights file of a pipeline folder's fp16 variant (the hub's SD v1.5 has one per component).
FP16_VARIANT_FILE = Path("unet") / "diffusion_pytorch_model.fp16.safetensors"


def weights_variant(source: str, local: bool, dtype: torch.dtype) -> str | None:
    """``"fp16"`` when a half-precision load can read the source's fp16 weight files, else None.

    The hub's SD v1.5 ships them (2 GB instead of 4.3 GB of fp32 to download); a local folder is
    read from them when it has them (:data:`FP16_VARIANT_FILE`). A bf16 load reads them too (the fp16
    weights are cast to bf16; every SD v1.5 weight lies in fp16's range).
    """
    if dtype not in HALF_DTYPES:
        return None
    if not local:
        return "fp16"
    return "fp16" if (Path(source) / FP16_VARIANT_FILE).is_file() else None


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off for the block (loading takes seconds;
    a chapter's stored output keeps one bar per long task), each library's setting restored after."""
    enabled = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in enabled:
            if was:
                lib.enable_progress_bar()


def load_pipeline(
    model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> StableDiffusionPipeline:
    """The base StableDiffusionPipeline in ``dtype`` on ``device`` (default: CUDA if present), safety checker off.

    ``model``: ``sd-v1-5`` (``from_pretrained(SD15_MODEL_ID)``, downloaded once into the HF cache:
    4.3 GB, or the 2 GB fp16 variant for a float16/bfloat16 load, :func:`weights_variant`),
    ``mini-sd`` (the shipped folder, never touching the network), a local pipeline folder, or None
    for the active profile's model (:data:`PROFILE_MODELS`).
    """
    if model is None:
        model = PROFILE_MODELS[active_profile()]
    if model in PROFILES:
        raise ValueError(
            f"model {model!r}: expected a model name ({', '.join(PROFILE_MODELS.values())}) "
            f"or a pipeline folder, not a profile name; the profile's model is {PROFILE_MODELS[model]!r}"
        )
    source, local = model_source(model)
    with no_loading_bars() if local else nullcontext():  # a hub download keeps its bars (gigabytes)
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            local_files_only=local,
            variant=weights_variant(source, local, dtype),
            safety_checker=None,
            feature_extractor=None,  # only the safety checker uses it; a snapshot may lack its folder
            requires_safety_checker=False,
            **{dtype_keyword(): dtype},
        )
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device if device is not None else default_device())


def base_model_id(model: str) -> str:
    """The card's ``base_model``: the hub id for ``sd-v1-5``, else the config value (``mini-sd``, a folder)."""
    return SD15_MODEL_ID if model == "sd-v1-5" else model
