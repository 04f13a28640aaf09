"""SD v1.5's three module types at toy size, so the paper's adapter targets apply unchanged.

- AutoencoderKL with SD's x8 downsampling (four levels) and 4 latent channels: 128 px -> 16x16x4;
- UNet2DConditionModel, channels (32, 64, 128), cross-attention (attn1/attn2, to_q/k/v/out, GEGLU
  ff, time_emb_proj), ``use_linear_projection=True``; two downsamplings (16 -> 8 -> 4) so the 4x4
  middle block sees the whole image: with zero padding that is how a convolutional UNet can know
  where "left" is;
- CLIPTextModel, 3 layers, width 64, over the real 49,408-token CLIP vocabulary.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from selora.minisd.shapes import SIZE
from selora.tokenizer import CONTEXT_LENGTH

VAE_CHANNELS = (16, 32, 64, 96)  # 1.7 M parameters: 3.4 MB in fp16
LATENT_SIZE = SIZE // 8


def make_vae(channels: tuple[int, ...] = VAE_CHANNELS) -> AutoencoderKL:
    """x8 AutoencoderKL (one level per channel count, the first at full size), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def make_text_encoder() -> CLIPTextModel:
    """3-layer, width-64 CLIP text transformer over the full CLIP vocabulary (49,408 tokens)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=256,
            projection_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def make_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """Cross-attention UNet on LATENT_SIZE x LATENT_SIZE x 4 latents, channels (32, 64, 128)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads, as in SD v1.5
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
    )
