"""Tiny random-init models with Stable Diffusion's module types, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel

from selora.models import sd15_scheduler_config
from selora.tokenizer import load_clip_tokenizer

RES = 16  # image side of the tiny pipeline; its VAE makes 8 x 8 latents


def tiny_unet() -> UNet2DConditionModel:
    """A two-block UNet (one cross-attention block down and up), 8 x 8 latents, context width 16."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
    )


def tiny_clip() -> CLIPTextModel:
    """A two-layer CLIP text model of width 16 with a 100-token vocabulary."""
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def unet_forward(unet: torch.nn.Module) -> torch.Tensor:
    """``unet`` on fixed random inputs: 2 latents ``(4, 8, 8)``, 5 context tokens of width 16."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 16, generator=g)
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def make_tiny_clip(tokenizer):
    """A random CLIP built from a config (no download) with ``tokenizer`` and CLIP's image processor."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
            "projection_dim": 16,
        },
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    # A random CLIP's embeddings share one dominant direction (image-image and text-text cosines ~0.9),
    # so every image-text cosine has the sign of the draw: positive under transformers 5's initialisation,
    # negative under 4.x's for the same seed. The CLIP score clips a negative mean to 0, where no pairing
    # could change it; negating the text projection (no bias) flips every cosine, so scores are positive.
    with torch.no_grad():
        grey = processor(images=[torch.full((3, 32, 32), 128, dtype=torch.uint8)], return_tensors="pt")
        img = model.get_image_features(pixel_values=grey["pixel_values"])
        txt = model.get_text_features(**tokenizer(["normal"], return_tensors="pt"))
        img, txt = (getattr(out, "pooler_output", out) for out in (img, txt))  # 5.x: a model output
        if torch.nn.functional.cosine_similarity(img, txt).item() < 0:
            model.text_projection.weight.neg_()
    return lambda: (model, processor)


def make_tiny_pipeline(folder: Path) -> Path:
    """Save a random-init StableDiffusionPipeline (SD v1.5 module types at toy size) to ``folder``."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RES // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=16,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=32,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=load_clip_tokenizer("offline"),
        unet=unet,
        scheduler=PNDMScheduler(**sd15_scheduler_config(), skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
