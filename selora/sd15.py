"""A stand-in for the hub's Stable Diffusion v1.5: its exact module structure at narrow widths.

:func:`build_sd15_structure` writes a diffusers pipeline folder laid out like a snapshot of
``stable-diffusion-v1-5/stable-diffusion-v1-5``: the UNet with SD v1.5's config except the
widths (4 down/up blocks, 2 layers per block, conv ``proj_in``/``proj_out``, 8 attention heads),
the VAE with SD's 4 blocks, a 12-layer CLIP text encoder (vocabulary 49,408, 77 positions, the
hub's token ids), SD's CLIP tokenizer (rebuilt offline, :mod:`selora.tokenizer`), the hub's PNDM
scheduler config keys, and a ``model_index.json`` that names a safety checker and a feature
extractor whose folders are absent (as in a snapshot downloaded without them). The weights are
random; the folder builds in seconds and lets the paper path run end to end on a CPU (the dress
rehearsal in ``tests/test_dress_rehearsal.py``) without the 4 GB download.
:func:`build_sd15_modules` gives the same modules in memory, at any width up to SD v1.5's own
(``benchmarks/gpu_check.py`` builds them at full width on the GPU). SD v1.5's own config is written
once, here: :func:`sd15_unet`, :func:`sd15_vae` and :func:`sd15_text_encoder` default to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

#: SD v1.5's widths; :func:`build_sd15_structure` scales them by ``width / 320``.
SD15_BLOCK_OUT = (320, 640, 1280, 1280)
SD15_VAE_BLOCK_OUT = (128, 256, 512, 512)
SD15_TEXT_WIDTH, SD15_TEXT_LAYERS, SD15_TEXT_HEADS = 768, 12, 12
SD15_TOKENS = 77  # CLIP's context: every prompt is padded or cut to it

#: The hub's ``scheduler/scheduler_config.json`` of SD v1.5 (keys and values, diffusers version aside).
HUB_SCHEDULER_EXTRA = {
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

#: The hub's ``model_index.json`` entries of the two components a snapshot may lack.
ABSENT_COMPONENTS = {
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}


def sd15_unet(width: int = SD15_BLOCK_OUT[0], text_width: int = SD15_TEXT_WIDTH):
    """SD v1.5's UNet (THE place its config is written) at first-block width ``width`` (cross-attention
    ``text_width``); the defaults are SD v1.5 itself (859.5 M parameters). Random weights, on torch's
    default device (``with torch.device("meta")``: shapes only)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(c * width // SD15_BLOCK_OUT[0] for c in SD15_BLOCK_OUT),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=text_width,
        attention_head_dim=8,  # diffusers' name for SD v1's 8 heads per attention
        use_linear_projection=False,  # conv 1x1 proj_in / proj_out, as in SD v1.5
    )


def sd15_vae(first: int = SD15_VAE_BLOCK_OUT[0]):
    """SD's 4-block VAE, ``first`` wide at its first block (SD: 128, the default), 32 GroupNorm groups
    (SD's) when ``first`` is a multiple of 32, else 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(c * first // SD15_VAE_BLOCK_OUT[0] for c in SD15_VAE_BLOCK_OUT),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32 if first % 32 == 0 else 8,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_text_encoder(text_width: int = SD15_TEXT_WIDTH):
    """A 12-layer CLIP text encoder of hidden size ``text_width`` with the hub's token ids; the
    default is SD v1.5's (CLIP ViT-L/14's text model, 123.1 M parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text_width,
            intermediate_size=4 * text_width,
            projection_dim=text_width,
            num_hidden_layers=SD15_TEXT_LAYERS,
            num_attention_heads=SD15_TEXT_HEADS,
            max_position_embeddings=SD15_TOKENS,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            # the hub's text_encoder/config.json carries these (legacy) ids, not the tokenizer's
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )


def _as_hub_snapshot(folder: Path, feature_extractor: bool) -> None:
    """Rewrite a saved pipeline folder into the hub snapshot's layout (module docstring)."""
    if feature_extractor:  # the hub's preprocessor_config.json: CLIP's defaults (224 px, bicubic)
        from transformers import CLIPImageProcessor

        CLIPImageProcessor().save_pretrained(folder / "feature_extractor")
    # the hub's text-encoder weights name CLIP's ``text_model.`` level (transformers 5 dropped it from
    # the module names and maps it on load); write them that way, so that mapping is exercised too
    from selora.models import write_clip_text_level

    write_clip_text_level(folder / "text_encoder" / "model.safetensors")
    # the scheduler config as the hub has it (clip_sample is not a PNDM argument but is there)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())
    sched.pop("timestep_spacing", None)  # keys newer than the hub's file
    sched.pop("prediction_type", None)
    sched.update(HUB_SCHEDULER_EXTRA)
    sched_file.write_text(json.dumps(dict(sorted(sched.items())), indent=2) + "\n")
    # model_index.json names the components a snapshot without their folders still lists
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.pop("requires_safety_checker", None)  # absent from the hub's v1.5 index
    index.update(ABSENT_COMPONENTS)
    index_file.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def build_sd15_modules(
    width: int = 32, text_width: int = 48, seed: int = 0, vae_width: int | None = None
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(unet, vae, text_encoder)`` of SD v1.5's structure in memory, random weights drawn after
    ``torch.manual_seed(seed)``, on torch's default device (build them under ``with torch.device(...)``
    to draw them there). ``width`` and ``text_width`` as for :func:`build_sd15_structure`;
    ``vae_width``: the VAE's first-block width, a multiple of 8 (default ``width / 4``; SD v1.5: 128).
    ``(320, 768, vae_width=128)`` is SD v1.5 itself: UNet 859.5 M, VAE 83.7 M, text encoder 123.1 M
    parameters."""
    vae_width = width // 4 if vae_width is None else vae_width
    if width < 32 or width % 32:
        raise ValueError(f"width: expected a positive multiple of 32, got {width}")
    if text_width < 12 or text_width % SD15_TEXT_HEADS:
        raise ValueError(f"text_width: expected a positive multiple of {SD15_TEXT_HEADS}, got {text_width}")
    if vae_width < 8 or vae_width % 8:
        raise ValueError(f"vae_width: expected a positive multiple of 8, got {vae_width}")
    torch.manual_seed(seed)
    return sd15_unet(width, text_width), sd15_vae(vae_width), sd15_text_encoder(text_width)


def build_sd15_structure(
    folder: str | Path, width: int = 32, text_width: int = 48, seed: int = 0, feature_extractor: bool = True
) -> Path:
    """Save a random-init SD v1.5-structured ``StableDiffusionPipeline`` to ``folder``; return it.

    ``width``: the UNet's first block width (SD v1.5: 320; the others are 2x, 4x, 4x), a multiple
    of 32 (SD's 32 GroupNorm groups, 8 heads). ``text_width``: the CLIP text hidden size (SD v1.5:
    768), a multiple of 12 (12 heads); it is also the UNet's ``cross_attention_dim``. The VAE is
    ``width / 4`` wide at its first block (8 for 32; SD v1.5's is 128), with 8 GroupNorm groups (SD's 32
    when that width is a multiple of 32).

    ``model_index.json`` always names the safety checker, whose folder is absent (the folder
    ``from_pretrained(..., safety_checker=None)`` downloads lacks it). ``feature_extractor``: write
    the ``feature_extractor/`` folder (CLIP's image processor, as that download has it); False
    leaves it out too, a snapshot with neither folder.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from selora.models import sd15_scheduler_config
    from selora.tokenizer import load_clip_tokenizer

    folder = Path(folder)
    unet, vae, text = build_sd15_modules(width, text_width, seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=load_clip_tokenizer("offline"),
        unet=unet,
        scheduler=PNDMScheduler(
            **sd15_scheduler_config(), **{k: v for k, v in HUB_SCHEDULER_EXTRA.items() if k != "clip_sample"}
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _as_hub_snapshot(folder, feature_extractor)
    return folder
