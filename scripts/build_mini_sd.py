"""Build and pretrain the mini Stable Diffusion that the offline profile ships in selora/assets/mini-sd/.

The three models have SD v1.5's module types at toy size, so the same adapter targets apply:
- AutoencoderKL, channels (16, 32, 64), x4 downsampling, 4 latent channels (64 px -> 16x16x4);
- UNet2DConditionModel, channels (32, 64, 128), cross-attention (attn1/attn2, to_q/k/v/out,
  GEGLU ff, time_emb_proj) and ``use_linear_projection=True`` (proj_in/proj_out are Linear);
  two downsamplings (16 -> 8 -> 4) so the 4x4 middle block sees the whole image: with zero padding
  that is how a convolutional UNet can know where "left" is;
- CLIPTextModel, 3 layers, width 64, with the real 49,408-token CLIP tokenizer.

They are pretrained on a general captioned synthetic set this script draws (shapes, colours,
sizes, stripes, nine positions on a dark background; NOT chest X-rays, so fine-tuning on
radiographs is a domain shift, as SD -> CXR is). The VAE additionally sees generic images
(soft ellipses, gradients, gratings, grey and colour) so it can encode other domains. The UNet
is trained with 10 % empty prompts (classifier-free guidance) under a FROZEN text encoder that was
pretrained first, on the captions alone, to name every attribute its caption states (see
``train_text_encoder``: a random encoder maps "on the left" and "on the right" to hidden states
with cosine 0.996, and a UNet trained under it ignored its prompts); fine-tuning adapters can still
adapt the text encoder, as SD v1.5 kept its pretrained CLIP frozen.
``--vae-from FOLDER`` reuses the VAE of an earlier run's folder (its stage 1a) instead of training one.

The UNet phase uses a constant learning rate after warm-up and ships an EMA of the weights, so
nothing depends on the planned step count: the snapshot written every ``--snapshot-every`` steps
(into the cache) is bit-for-bit the model a run with ``--unet-steps`` = that step ships.

Seeded; on one CPU thread with a fixed torch version the run is reproducible. Prints the runtime
and loss curves, saves ``training_log.json``, ``loss_curve.png`` and ``samples.png`` (the probe:
does the model follow position, colour and shape words?) next to the pipeline, and replaces the
output folder atomically (fp16 safetensors via save_pretrained).

The committed folder (UNet step 1500): stage 1a VAE 584 s, UNet 1237 s, stage 2 decoder 1239 s
on one heavily shared CPU thread. It loads and samples, but does NOT yet follow its prompts
(probe at chance; the VAE reconstructs at ~20 dB and loses colour) -- see training_log.json.

    python scripts/build_mini_sd.py                     # rebuild the committed model (1 thread)
    python scripts/build_mini_sd.py --quick --out DIR   # a one-minute smoke test
    python scripts/build_mini_sd.py --probe DIR         # probe an existing folder again
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel

from selora.io import atomic_dir, atomic_write_bytes, atomic_write_text
from selora.minisd.architecture import make_text_encoder
from selora.minisd.save import drop_loaded_from, save_folder
from selora.minisd.training import lr_at, psnr, thin
from selora.models import MINI_SD_DIR, sd15_scheduler_config
from selora.paths import cache_dir
from selora.profile import seed_everything, set_threads
from selora.tokenizer import CONTEXT_LENGTH, load_clip_tokenizer

SIZE = 64  # pixels; the VAE makes 16x16x4 latents
COLOURS = {
    "red": (0.90, 0.15, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.60, 0.20, 0.80),
    "gray": (0.50, 0.50, 0.50),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (5.5, 7.5), "large": (10.5, 13.0)}  # radius range in pixels
ROWS = {"upper": 15.0, "middle": 32.0, "lower": 49.0}  # y of the cell centre
COLS = {"left": 15.0, "center": 32.0, "right": 49.0}
# How a cell is named in a caption; several phrasings per cell so the words, not one template, matter.
POSITION_PHRASES = {
    ("upper", "left"): ("in the upper left", "at the top left"),
    ("upper", "center"): ("at the top", "in the upper middle"),
    ("upper", "right"): ("in the upper right", "at the top right"),
    ("middle", "left"): ("on the left", "in the left middle"),
    ("middle", "center"): ("in the center", "in the middle"),
    ("middle", "right"): ("on the right", "in the right middle"),
    ("lower", "left"): ("in the lower left", "at the bottom left"),
    ("lower", "center"): ("at the bottom", "in the lower middle"),
    ("lower", "right"): ("in the lower right", "at the bottom right"),
}


# ----------------------------------------------------------------------------- synthetic data
def _grid(supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a supersampled SIZE x SIZE image."""
    c = (np.arange(SIZE * supersample) + 0.5) / supersample
    return np.meshgrid(c, c, indexing="ij")


YY, XX = _grid()


def _downsample(a: np.ndarray) -> np.ndarray:
    """Average 2x2 supersampled pixels: (2S, 2S) -> (S, S) antialiased coverage."""
    return a.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))


def shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    """Antialiased coverage in [0, 1] of ``shape`` with centre (cy, cx) and radius r; (S, S)."""
    dy, dx = YY - cy, XX - cx
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "square":
        m = np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    elif shape == "triangle":  # apex up, base at +0.8 r
        m = (dy <= 0.8 * r) & (abs(dx) <= (dy + r) / 1.8)
    elif shape == "cross":
        m = ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _downsample(m.astype(np.float32))


def draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One random object: shape, colour, size, row, column and whether it is striped."""
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "row": list(ROWS)[rng.integers(len(ROWS))],
        "col": list(COLS)[rng.integers(len(COLS))],
        "striped": bool(rng.random() < 0.3),
    }


def render(attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """The image of ``attrs`` on a dark background: float32 (3, S, S) in [0, 1]."""
    lo, hi = SIZES[attrs["size"]]
    r = rng.uniform(lo, hi)
    cy = ROWS[attrs["row"]] + rng.uniform(-3, 3)
    cx = COLS[attrs["col"]] + rng.uniform(-3, 3)
    cover = shape_mask(attrs["shape"], cy, cx, r)
    if attrs["striped"]:  # dark diagonal bands across the object
        cover = cover * _downsample(np.where(((XX + YY) // 3) % 2 == 0, 1.0, 0.25).astype(np.float32))
    colour = np.clip(np.array(COLOURS[attrs["colour"]]) + rng.normal(0, 0.03, 3), 0, 1)
    background = rng.uniform(0.0, 0.15)
    img = background + cover[None] * (colour[:, None, None] - background)
    return img.astype(np.float32)


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A caption naming the object; size, colour, stripes and position each left out 15 % of the time."""
    words = []
    if rng.random() > 0.15:
        words.append(attrs["size"])
    if attrs["striped"] and rng.random() > 0.15:
        words.append("striped")
    if rng.random() > 0.15:
        words.append(attrs["colour"])
    words.append(attrs["shape"])
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if rng.random() > 0.15:
        phrases = POSITION_PHRASES[(attrs["row"], attrs["col"])]
        text += " " + phrases[rng.integers(len(phrases))]
    return text


def generic_image(rng: np.random.Generator) -> np.ndarray:
    """An uncaptioned image for the VAE: gradient, soft ellipses, maybe a grating; (3, S, S) in [0, 1]."""
    y, x = YY[::2, ::2] / SIZE, XX[::2, ::2] / SIZE
    base = rng.uniform(0, 0.6, 3)
    img = base[:, None, None] + rng.uniform(-0.3, 0.3, (3, 1, 1)) * (x if rng.random() < 0.5 else y)
    for _ in range(rng.integers(2, 9)):
        cy, cx = rng.uniform(0, 1, 2)
        ay, ax = rng.uniform(0.04, 0.35, 2)
        theta = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        d = (u / ax) ** 2 + (v / ay) ** 2
        alpha = 0.5 - 0.5 * np.tanh((d - 1) * rng.uniform(1.5, 15))  # soft or sharp edge
        img = img + alpha * (rng.uniform(0, 1, 3)[:, None, None] - img) * rng.uniform(0.3, 1.0)
    if rng.random() < 0.4:  # a grating, from wide bands to rib-like stripes
        f, phi = rng.uniform(1, 12), rng.uniform(0, np.pi)
        img = img + rng.uniform(0.05, 0.25) * np.sin(2 * np.pi * f * (x * np.cos(phi) + y * np.sin(phi)))
    if rng.random() < 0.5:
        img = np.repeat(img.mean(0, keepdims=True), 3, axis=0)
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1).astype(np.float32)


def captioned_set(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` rendered objects: uint8 images (n, 3, S, S) and their attributes."""
    attrs = [draw_attributes(rng) for _ in range(n)]
    imgs = np.stack([np.round(render(a, rng) * 255).astype(np.uint8) for a in attrs])
    return imgs, attrs


def to_model(x: np.ndarray) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float tensor in [-1, 1], as SD's VAE expects."""
    x = torch.from_numpy(x).float()
    return (x / 255 if x.max() > 1.5 else x) * 2 - 1


# ----------------------------------------------------------------------------- the three models
def make_vae() -> AutoencoderKL:
    """x4 AutoencoderKL, channels (16, 32, 64), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def make_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """Cross-attention UNet on 16x16x4 latents, channels (32, 64, 128), SD v1.5's block types."""
    return UNet2DConditionModel(
        sample_size=SIZE // 4,
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


# ----------------------------------------------------------------------------- training
# What a caption can state, one classification head each; the last class of every head is "not said".
ATTRIBUTE_CLASSES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "row": tuple(ROWS),
    "col": tuple(COLS),
    "striped": ("striped",),
}
_PHRASE_CELL = {phrase: cell for cell, phrases in POSITION_PHRASES.items() for phrase in phrases}


def caption_labels(text: str) -> dict[str, int]:
    """Class index per attribute head for what ``text`` states (``len(classes)`` = not stated)."""
    words = text.split()
    labels = {k: len(v) for k, v in ATTRIBUTE_CLASSES.items()}
    for head in ("shape", "colour", "size", "striped"):
        for i, word in enumerate(ATTRIBUTE_CLASSES[head]):
            if word in words:
                labels[head] = i
    for phrase, (row, col) in _PHRASE_CELL.items():
        if text.endswith(" " + phrase):
            labels["row"], labels["col"] = list(ROWS).index(row), list(COLS).index(col)
    return labels


def random_captions(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions of random objects, 10 % of them empty (the unconditional prompt)."""
    return ["" if rng.random() < 0.1 else caption(draw_attributes(rng), rng) for _ in range(n)]


def train_text_encoder(
    text_encoder: CLIPTextModel, tokenizer, steps: int, batch: int, rng: np.random.Generator, log: list
) -> dict:
    """Stage 0: teach the text encoder, on captions alone, to say what each caption states.

    Linear heads read the mean of ``last_hidden_state`` over all 77 positions (the padding
    positions see the whole caption through the causal mask, and the UNet attends to all of them)
    and classify shape, colour, size, row, column and stripes, each with a "not stated" class;
    cross-entropy summed over heads. The heads are thrown away; the encoder is then frozen for the
    UNet, as SD v1.5 froze its pretrained CLIP text encoder. Returns held-out accuracy per head and
    the cosine of the hidden states of "... on the left" vs "... on the right" before and after.
    """
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(text_encoder.config.hidden_size, len(v) + 1) for k, v in ATTRIBUTE_CLASSES.items()}
    )
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    def left_right_cosine() -> float:
        with torch.no_grad():
            h = text_encoder(tokens(["a large white circle on the left", "a large white circle on the right"]))[
                0
            ].flatten(1)
        return float(F.cosine_similarity(h[:1], h[1:]).item())

    def loss_and_hits(texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        pooled = text_encoder(tokens(texts))[0].mean(dim=1)
        labels = [caption_labels(t) for t in texts]
        loss, hits = torch.zeros(()), {}
        for k, head in heads.items():
            y = torch.tensor([lab[k] for lab in labels])
            logits = head(pooled)
            loss = loss + F.cross_entropy(logits, y)
            hits[k] = float((logits.argmax(1) == y).float().mean())
        return loss, hits

    cos_before = left_right_cosine()
    text_encoder.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3)
        loss, _ = loss_and_hits(random_captions(batch, rng))
        optimizer_step(opt, loss, params, log)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(
                f"text step {step + 1}/{steps}  cross-entropy {np.mean(log[-100:]):.4f}  {time.time() - t0:.0f}s",
                flush=True,
            )
    text_encoder.eval()
    with torch.no_grad():
        _, accuracy = loss_and_hits(random_captions(512, rng))
    result = {
        "steps": steps,
        "batch": batch,
        "runtime_seconds": round(time.time() - t0),
        "held_out_accuracy": accuracy,
        "left_right_cosine": {"before": cos_before, "after": left_right_cosine()},
    }
    print(f"text encoder: {json.dumps(result)}", flush=True)
    return result


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, log: list) -> None:
    """Backward, clip the gradient norm of ``params`` to 1, step, and log the loss (every stage does this)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    log.append(loss.item())


class EMA:
    """Exponential moving average of the trainable weights of ``modules`` (warm-up: (1+t)/(10+t))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float = 0.995) -> None:
        self.modules, self.decay, self.step = modules, decay, 0
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in modules]

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for m, shadow in zip(self.modules, self.shadow):
            for s, p in zip(shadow, m.parameters()):
                s.lerp_(p, 1 - d)

    def copies(self) -> list[torch.nn.Module]:
        """Deep copies of the modules holding the averaged weights (the originals keep training)."""
        out = []
        for m, shadow in zip(self.modules, self.shadow):
            c = copy.deepcopy(m)
            with torch.no_grad():
                for p, s in zip(c.parameters(), shadow):
                    p.copy_(s)
            out.append(c.eval())
        return out


def mixed_batch(batch: int, rng: np.random.Generator) -> torch.Tensor:
    """VAE training images (batch, 3, S, S) in [-1, 1]: first half captioned objects, then generic."""
    half = batch // 2
    imgs, _ = captioned_set(half, rng)
    return torch.cat([to_model(imgs), to_model(np.stack([generic_image(rng) for _ in range(batch - half)]))])


def held_out_psnr(vae: AutoencoderKL, rng: np.random.Generator, n: int = 64) -> dict[str, float]:
    """Reconstruction PSNR (posterior mean) on ``n`` fresh object images and ``n`` generic ones."""
    held_out = np.concatenate([captioned_set(n, rng)[0] / 255.0, np.stack([generic_image(rng) for _ in range(n)])])
    with torch.no_grad():
        x = to_model(held_out.astype(np.float32))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return {"shapes": psnr(rec[:n], x[:n]), "generic": psnr(rec[n:], x[n:])}


def train_vae(vae: AutoencoderKL, steps: int, batch: int, rng: np.random.Generator, log: list) -> None:
    """Reconstruction (L1) + 1e-6 KL on fresh images each step: half captioned objects, half generic."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3)
        x = mixed_batch(batch, rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        optimizer_step(opt, loss, vae.parameters(), log)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"vae step {step + 1}/{steps}  l1+kl {np.mean(log[-100:]):.4f}  {time.time() - t0:.0f}s", flush=True)


def refine_decoder(folder: Path, steps: int, batch: int, seed: int) -> dict:
    """Stage 2: train only the decoder of ``folder``'s VAE (as shipped, fp16 -> fp32), rewrite vae/.

    The encoder, hence every latent the UNet was trained on, stays bit-identical, so this stage can
    run on any snapshot; its random streams derive from ``seed`` alone. L1 on fresh mixed batches.
    """
    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    rng = np.random.default_rng([seed, 2])
    gen = torch.Generator().manual_seed(seed + 2)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    before = held_out_psnr(vae, np.random.default_rng([seed, 3]))
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    log, t0 = [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3)
        x = mixed_batch(batch, rng)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        loss = F.l1_loss(vae.decode(z).sample, x)
        optimizer_step(opt, loss, params, log)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"decoder step {step + 1}/{steps}  l1 {np.mean(log[-100:]):.4f}  {time.time() - t0:.0f}s", flush=True)
    result = {
        "steps": steps,
        "batch": batch,
        "runtime_seconds": round(time.time() - t0),
        "psnr_db_before": before,
        "psnr_db_after": held_out_psnr(vae, np.random.default_rng([seed, 3])),
        "l1_every_25_steps": thin(log),
    }
    with atomic_dir(folder / "vae") as tmp:
        vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        drop_loaded_from(tmp / "config.json")
    log_file = folder / "training_log.json"
    full = json.loads(log_file.read_text()) if log_file.is_file() else {}
    full["decoder_refine"] = result
    atomic_write_text(log_file, json.dumps(full, indent=1))
    print(f"decoder refined: PSNR {before} -> {result['psnr_db_after']}", flush=True)
    return result


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, imgs: np.ndarray, chunk: int = 64) -> torch.Tensor:
    """Posterior means of every image, (n, 4, S/4, S/4) (the VAE is frozen from here).

    The UNet learns the means, not posterior samples: this small VAE's posterior std (~0.7 against
    |mean| ~1.1) would bury the image under latent noise, and its decoder reads both equally well.
    """
    return torch.cat([vae.encode(to_model(imgs[i : i + chunk])).latent_dist.mean for i in range(0, len(imgs), chunk)])


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer,
    latents: torch.Tensor,
    attrs: list[dict[str, str]],
    scaling: float,
    steps: int,
    batch: int,
    rng: np.random.Generator,
    log: list,
    ema: EMA,
    snapshot: Callable[[int], None],
    snapshot_every: int,
) -> None:
    """Latent-diffusion training (eps-prediction MSE) of the UNet, 10 % empty prompts.

    The text encoder stays frozen (pretrained by ``train_text_encoder``), as SD v1.5 kept CLIP
    frozen. Trained jointly with the UNet it collapsed: after a few hundred steps its outputs for
    different prompts differed by ~5 % and the UNet ignored the prompt.

    Constant learning rate after warm-up plus an EMA of the weights: nothing depends on ``steps``,
    so the snapshot at step K is exactly what a run with ``--unet-steps K`` ships.
    """
    scheduler = DDPMScheduler(**sd15_scheduler_config())
    text_encoder.requires_grad_(False)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, None, 1e-3)
        idx = rng.integers(len(attrs), size=batch)
        texts = ["" if rng.random() < 0.1 else caption(attrs[i], rng) for i in idx]
        ids = tokenizer(
            texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        idx_t = torch.from_numpy(idx)
        z = latents[idx_t] * scaling
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        with torch.no_grad():
            context = text_encoder(ids)[0]
        pred = unet(scheduler.add_noise(z, noise, t), t, context).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(opt, loss, params, log)
        ema.update()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(
                f"unet step {step + 1}/{steps}  eps-mse {np.mean(log[-100:]):.4f}  {time.time() - t0:.0f}s", flush=True
            )
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            snapshot(step + 1)


# ----------------------------------------------------------------------------- saving and probing
def foreground_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (y, x) in pixels and mean colour of the bright object in images (n, S, S, 3) in [0, 1]."""
    w = np.clip(images.max(-1) - 0.25, 0, None) + 1e-6
    y, x = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5, indexing="ij")
    total = w.sum((1, 2))
    centroid = np.stack([(w * y).sum((1, 2)) / total, (w * x).sum((1, 2)) / total], 1)
    colour = (images * w[..., None]).sum((1, 2)) / total[:, None]
    return centroid, colour


def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """Every prompt with every seed (prompt-major), 25 PNDM steps, guidance 7.5: (P*len(seeds), S, S, 3)."""
    all_prompts = [p for p in prompts for _ in seeds]
    gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    return pipe(all_prompts, num_inference_steps=25, guidance_scale=7.5, generator=gens, output_type="np").images


def probe(pipe: StableDiffusionPipeline, seeds: list[int]) -> tuple[dict, np.ndarray, list[str]]:
    """Does the model follow position, colour and shape words? Accuracies + the images for a grid."""
    cells = list(POSITION_PHRASES)
    pos_prompts = [f"a large white circle {POSITION_PHRASES[c][0]}" for c in cells]
    col_prompts = [f"a large {c} square in the center" for c in COLOURS]
    shape_prompts = [f"a large yellow {s} in the center" for s in SHAPES]
    imgs = generate(pipe, pos_prompts + col_prompts + shape_prompts, seeds)
    k = len(seeds)
    centroid, colour = foreground_stats(imgs)
    ys, xs = np.array(list(ROWS.values())), np.array(list(COLS.values()))
    n_pos = len(pos_prompts) * k
    got_row = np.abs(centroid[:n_pos, :1] - ys[None]).argmin(1)
    got_col = np.abs(centroid[:n_pos, 1:] - xs[None]).argmin(1)
    want_row = np.repeat([list(ROWS).index(r) for r, _ in cells], k)
    want_col = np.repeat([list(COLS).index(c) for _, c in cells], k)
    palette = np.array(list(COLOURS.values()))
    col_block = colour[n_pos : n_pos + len(col_prompts) * k]
    got_colour = np.linalg.norm(col_block[:, None] - palette[None], axis=-1).argmin(1)
    result = {
        "seeds": seeds,
        "row_accuracy": float((got_row == want_row).mean()),
        "column_accuracy": float((got_col == want_col).mean()),
        "colour_accuracy": float((got_colour == np.repeat(np.arange(len(COLOURS)), k)).mean()),
        "chance": {"row": 1 / 3, "column": 1 / 3, "colour": 1 / len(COLOURS)},
        "shape": "judged by eye from samples.png (last rows)",
    }
    return result, imgs, pos_prompts + col_prompts + shape_prompts


def grid_png(images: np.ndarray, rows: int) -> bytes:
    """Images (rows*cols, S, S, 3) in [0, 1] as one PNG, one row per prompt."""
    from PIL import Image

    cols = len(images) // rows
    canvas = np.ones((rows * (SIZE + 2), cols * (SIZE + 2), 3))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (SIZE + 2) : r * (SIZE + 2) + SIZE, c * (SIZE + 2) : c * (SIZE + 2) + SIZE] = im
    buf = io.BytesIO()
    Image.fromarray(np.round(canvas * 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def curve_png(vae_curve: list[float], unet_curve: list[float]) -> bytes:
    """The two training-loss curves (25-step means, smoothed over 100 steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, curve, title in (
        (axes[0], vae_curve, "VAE: L1 + KL"),
        (axes[1], unet_curve, "UNet (frozen text encoder): eps MSE"),
    ):
        w = min(4, len(curve))
        ax.plot(25 * (np.arange(len(curve) - w + 1) + w), np.convolve(curve, np.ones(w) / w, mode="valid"))
        ax.set(title=title, xlabel="step", yscale="log")
    fig.suptitle("mini SD pretraining on synthetic shapes: both losses fall")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- main
FULL = {
    "text_steps": 600,
    "vae_steps": 1500,
    "unet_steps": 3000,
    "decoder_steps": 1000,
    "images": 6000,
    "snapshot_every": 250,
    "probe_seeds": 4,
}
QUICK = {
    "text_steps": 10,
    "vae_steps": 10,
    "unet_steps": 20,
    "decoder_steps": 10,
    "images": 256,
    "snapshot_every": 10,
    "probe_seeds": 2,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; ``--quick`` changes the defaults (explicit flags still win) and the output folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=None, help=f"pipeline folder (default {MINI_SD_DIR.name}/ in the package assets)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32, help="UNet batch size")
    ap.add_argument("--vae-batch", type=int, default=16, help="VAE batch size")
    ap.add_argument("--text-batch", type=int, default=64, help="text-encoder batch size (captions)")
    ap.add_argument("--text-steps", type=int, help=f"stage 0, text-encoder steps (default {FULL['text_steps']})")
    ap.add_argument("--vae-steps", type=int, help=f"VAE training steps (default {FULL['vae_steps']})")
    ap.add_argument("--unet-steps", type=int, help=f"UNet steps (default {FULL['unet_steps']})")
    ap.add_argument("--images", type=int, help=f"size of the captioned set (default {FULL['images']})")
    ap.add_argument("--snapshot-every", type=int, help="UNet steps between snapshot folders in the cache, 0 = none")
    ap.add_argument("--probe-seeds", type=int, help="seeds per probe prompt (default 4)")
    ap.add_argument("--vae-from", type=Path, help="take the stage-1a VAE from this pipeline folder (a snapshot)")
    ap.add_argument("--decoder-steps", type=int, help="stage 2, decoder-only VAE steps (default 1500)")
    ap.add_argument("--refine-decoder", type=Path, help="only run stage 2 on an existing pipeline folder")
    ap.add_argument("--probe", type=Path, help="only probe an existing pipeline folder (adds samples.png)")
    ap.add_argument("--quick", action="store_true", help=f"smoke test {QUICK}, writes to the cache")
    args = ap.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = cache_dir("mini-sd-quick") / "mini-sd" if args.quick else MINI_SD_DIR
    for name in (
        "text_steps",
        "vae_steps",
        "unet_steps",
        "decoder_steps",
        "batch",
        "vae_batch",
        "text_batch",
        "images",
        "probe_seeds",
    ):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.snapshot_every < 0:
        ap.error(f"--snapshot-every must be 0 or positive, got {args.snapshot_every}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: exists and is not a folder")
    return args


def probe_folder(folder: Path, seeds: list[int]) -> dict:
    """Load ``folder`` as shipped (stock from_pretrained, fp32), probe it, add samples.png + results."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    result, images, prompts = probe(pipe, seeds)
    log_file = Path(folder) / "training_log.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    log.update(probe=result, probe_prompts=prompts)
    atomic_write_bytes(Path(folder) / "samples.png", grid_png(images, len(prompts)))
    atomic_write_text(log_file, json.dumps(log, indent=1))
    print(f"probe of {folder}: {json.dumps(result)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(1)
    seeds = list(range(args.probe_seeds))
    if args.refine_decoder:
        refine_decoder(args.refine_decoder, args.decoder_steps, args.vae_batch, args.seed)
    if args.probe or args.refine_decoder:
        probe_folder(args.probe or args.refine_decoder, seeds)
        return 0
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    tokenizer = load_clip_tokenizer("offline")
    vae, text_encoder = make_vae(), make_text_encoder()
    unet = make_unet(text_encoder.config.hidden_size)
    n_params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))
    }
    print("parameters:", n_params, flush=True)
    text_log: list[float] = []
    text_result = train_text_encoder(
        text_encoder, tokenizer, args.text_steps, args.text_batch, np.random.default_rng([args.seed, 4]), text_log
    )
    text_result["cross_entropy_every_25_steps"] = thin(text_log)
    t_vae_start = time.time()

    if args.vae_from:  # stage 1a done before: its fp16 VAE as written, and its logged VAE curve
        vae.load_state_dict(
            AutoencoderKL.from_pretrained(args.vae_from / "vae", torch_dtype=torch.float32).state_dict()
        )
        earlier = json.loads((args.vae_from / "training_log.json").read_text())
        vae_curve, vae_final = earlier["loss_every_25_steps"]["vae_l1_kl"], earlier["final_loss_last_100_steps"]["vae"]
    else:
        vae_log: list[float] = []
        train_vae(vae, args.vae_steps, args.vae_batch, rng, vae_log)
        vae_curve, vae_final = thin(vae_log), float(np.mean(vae_log[-100:]))
        vae.to(torch.float16).to(torch.float32)  # the VAE as shipped, so --vae-from gives the same latents
    vae.eval().requires_grad_(False)
    t_vae = time.time() - t_vae_start

    rng = np.random.default_rng([args.seed, 1])  # data + UNet phase: independent of how stage 1a ran
    imgs, attrs = captioned_set(args.images, rng)
    vae_psnr = held_out_psnr(vae, rng)
    latents = encode_latents(vae, imgs)
    scaling = float(1 / latents.std())  # SD's scaling_factor: unit-variance latents
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae: {t_vae:.0f}s, held-out PSNR {vae_psnr}, latent scaling factor {scaling:.4f}", flush=True)

    unet_log: list[float] = []
    ema = EMA([unet])
    t0 = time.time()

    def write(out: Path, step: int) -> None:
        """The EMA weights after ``step`` UNet steps as a pipeline folder, with the log so far."""
        log = {
            "seed": args.seed,
            "args": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("out", "probe", "refine_decoder", "vae_from")
            },
            "unet_steps_done": step,
            "vae_from_earlier_run": args.vae_from is not None,
            "parameters": n_params,
            "runtime_seconds": {
                "text_encoder": text_result["runtime_seconds"],
                "vae": round(t_vae),
                "unet": round(time.time() - t0),
                "total": round(time.time() - t_start),
            },
            "threads": torch.get_num_threads(),
            "versions": {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers")},
            "text_encoder_pretraining": text_result,
            "vae_psnr_db": vae_psnr,
            "vae_scaling_factor": scaling,
            "loss_every_25_steps": {"vae_l1_kl": vae_curve, "unet_eps_mse": thin(unet_log)},
            "final_loss_last_100_steps": {"vae": vae_final, "unet": float(np.mean(unet_log[-100:]))},
        }
        extras = {
            "training_log.json": json.dumps(log, indent=1).encode(),
            "loss_curve.png": curve_png(vae_curve, thin(unet_log)),
        }
        (unet_ema,) = ema.copies()
        save_folder((vae, text_encoder, tokenizer, unet_ema), out, extras)
        print(
            f"wrote {out} after {step} unet steps: {json.dumps(log['runtime_seconds'])}, "
            f"final losses {json.dumps(log['final_loss_last_100_steps'])}",
            flush=True,
        )

    snap_dir = cache_dir("mini-sd-build") / "snapshot"
    train_unet(
        unet,
        text_encoder,
        tokenizer,
        latents,
        attrs,
        scaling,
        args.unet_steps,
        args.batch,
        rng,
        unet_log,
        ema,
        lambda step: write(snap_dir, step),
        args.snapshot_every,
    )
    write(args.out, args.unet_steps)
    refine_decoder(args.out, args.decoder_steps, args.vae_batch, args.seed)
    probe_folder(args.out, seeds)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"runtime {(time.time() - t_start) / 60:.1f} min; {args.out} holds {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
