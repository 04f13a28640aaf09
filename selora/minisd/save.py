"""Writing a mini SD as a stock diffusers pipeline folder: fp16 safetensors, SD v1.5's tokenizer
layout, a text encoder every supported transformers major loads, no machine paths; atomically."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from selora.io import atomic_dir
from selora.models import sd15_scheduler_config, write_clip_text_level
from selora.tokenizer import write_clip_tokenizer_files


def assemble(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    """A stock StableDiffusionPipeline (PNDM as in SD v1.5, no safety checker) from the parts."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**sd15_scheduler_config(), skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def drop_loaded_from(config_file: Path) -> None:
    """Remove ``_name_or_path`` (the folder a model was loaded from: a machine path) from a saved config."""
    config = json.loads(config_file.read_text())
    config.pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def compute_in_float32(config_file: Path) -> None:
    """Mark a transformers config as float32 so a default ``from_pretrained`` upcasts the fp16 weights.

    transformers >= 5 otherwise loads the text encoder in the stored fp16 while diffusers loads the
    UNet and VAE in float32, and a plain ``StableDiffusionPipeline.from_pretrained(folder)`` fails.
    """
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_folder(parts: tuple, out: Path, extras: dict[str, bytes]) -> None:
    """Save (vae, text_encoder, tokenizer, unet) as an fp16 pipeline folder, atomically replacing ``out``.

    Copies are cast to fp16, so the fp32 models being trained are left untouched; ``extras`` are
    written beside (build log, figures).
    """
    vae, text_encoder, tokenizer, unet = parts
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    halves = [copy.deepcopy(m).to(torch.float16) for m in (vae, text_encoder, unet)]
    with atomic_dir(out) as tmp:
        assemble(halves[0], halves[1], tokenizer, halves[2]).save_pretrained(tmp, safe_serialization=True)
        write_clip_text_level(tmp / "text_encoder" / "model.safetensors")
        # SD v1.5's tokenizer folder layout (vocab.json + merges.txt, 1.5 MB) instead of tokenizer.json (3.5 MB,
        # written by transformers 5 only)
        (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        write_clip_tokenizer_files(tmp / "tokenizer")
        compute_in_float32(tmp / "text_encoder" / "config.json")
        for name, data in extras.items():
            (tmp / name).write_bytes(data)
