"""The build's stages, in order; each writes its result into the build folder and is skipped when
that result is already there, so an interrupted build resumes with the same command.

0. text encoder: on captions alone, learn to state every attribute (heads thrown away, then frozen);
1. view pools: captioned lateral/oblique radiographs rendered from the CT (training and judge pools);
2. VAE: reconstruct shapes, generic images and the views (never a frontal chest radiograph);
3. latents: posterior means of the captioned sets, and SD's scaling factor;
4. UNet: latent diffusion (eps MSE), 10 % empty prompts, EMA weights;
5. judge: the attribute classifier of :mod:`selora.minisd.judge`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file, save_file

from selora.data.ct import load_chest_ct
from selora.data.drr import Scene, build_scene, random_patient, render
from selora.data.images import resize_center_crop
from selora.io import atomic_dir
from selora.minisd import judge as judging
from selora.minisd import shapes, views
from selora.minisd.architecture import make_text_encoder, make_unet, make_vae
from selora.minisd.domains import ATTRIBUTES, DOMAINS, labels, random_captions
from selora.minisd.training import EMA, Loop, psnr
from selora.models import sd15_scheduler_config
from selora.tokenizer import CONTEXT_LENGTH


@dataclass
class Build:
    """Where a build keeps its stages' results, its seed, step counts, and its wall-time deadline."""

    folder: Path
    seed: int
    steps: dict[str, int]
    deadline: float | None = None
    _scene: Scene | None = field(default=None, repr=False)

    def rng(self, *key: int) -> np.random.Generator:
        """The numpy stream named ``key`` (each stage has its own: stages stay independent)."""
        return np.random.default_rng([self.seed, *key])

    def gen(self, key: int) -> torch.Generator:
        """The torch stream named ``key`` (noise, timesteps, posterior samples)."""
        return torch.Generator().manual_seed(self.seed * 1000 + key)

    def scene(self) -> Scene:
        """The CT's scene (:func:`selora.data.drr.build_scene`), built on first use."""
        if self._scene is None:
            self._scene = build_scene(load_chest_ct())
        return self._scene

    def loop(self, name: str, module, params, peak_lr: float, key: int, **kw) -> Loop:
        """The resumable :class:`Loop` of stage ``name`` (its snapshot folder, steps and streams)."""
        return Loop(
            name,
            self.folder,
            module,
            params,
            self.steps[name],
            peak_lr,
            self.rng(key),
            self.gen(key),
            deadline=self.deadline,
            **kw,
        )


def tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded to CLIP's 77 positions, (n, 77)."""
    return tokenizer(
        texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def text_stage(b: Build, tokenizer, batch: int = 64) -> tuple[torch.nn.Module, dict]:
    """Stage 0: the text encoder names every attribute its caption states (one linear head each).

    Heads read the mean of ``last_hidden_state`` over all 77 positions (padding positions see the
    whole caption through the causal mask, and the UNet attends to all of them); each head has a
    "not stated" class. A random encoder maps "... on the left" and "... on the right" to hidden
    states with cosine ~0.996 and a UNet trained under it ignored its prompts.
    """
    encoder = make_text_encoder()
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(64, len(v) + 1) for k, v in ATTRIBUTES.items()})
    both = torch.nn.ModuleDict({"encoder": encoder, "heads": heads})
    loop = b.loop("text_encoder", both, list(both.parameters()), 1e-3, key=10)

    def loss_and_hits(texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        pooled = encoder(tokens(tokenizer, texts))[0].mean(dim=1)
        ys = [labels(t) for t in texts]
        loss, hits = torch.zeros(()), {}
        for k, head in heads.items():
            y = torch.tensor([lab[k] for lab in ys])
            logits = head(pooled)
            loss = loss + F.cross_entropy(logits, y)
            hits[k] = float((logits.argmax(1) == y).float().mean())
        return loss, hits

    log = loop.run(lambda step: loss_and_hits(random_captions(batch, loop.rng))[0])
    with torch.no_grad():
        _, accuracy = loss_and_hits(random_captions(1024, b.rng(11)))
    return encoder.requires_grad_(False), {
        "steps": loop.steps,
        "batch": batch,
        "seconds": round(loop.seconds),
        "held_out_accuracy": accuracy,
        "loss": log,
    }


def view_pool(b: Build, name: str, n: int, key: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Stage 1: ``n`` captioned views rendered once and kept in the build folder."""
    folder = b.folder / name
    if not (folder / "attrs.json").is_file():
        imgs, attrs = views.render_set(n, b.scene(), b.rng(key))
        b.folder.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder) as tmp:
            save_file({"images": torch.from_numpy(np.ascontiguousarray(imgs))}, tmp / "images.safetensors")
            (tmp / "attrs.json").write_text(json.dumps(attrs))
    return load_file(folder / "images.safetensors")["images"].numpy(), json.loads((folder / "attrs.json").read_text())


def to_model(x: np.ndarray) -> torch.Tensor:
    """uint8 images -> float tensor in [-1, 1], as SD's VAE expects."""
    return torch.from_numpy(x).float() / 127.5 - 1


def shapes_set(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``n`` rendered objects: uint8 images (n, 3, S, S) and their attributes."""
    attrs = [shapes.draw_attributes(rng) for _ in range(n)]
    return np.stack([np.round(shapes.render(a, rng) * 255).astype(np.uint8) for a in attrs]), attrs


def vae_batch(pool: np.ndarray, batch: int, rng: np.random.Generator) -> torch.Tensor:
    """A quarter objects, a quarter generic images, half pool views (flipped half the time); [-1, 1]."""
    q = batch // 4
    objs = shapes_set(q, rng)[0]
    generic = np.round(np.stack([shapes.generic_image(rng) for _ in range(q)]) * 255).astype(np.uint8)
    picked = pool[rng.integers(len(pool), size=batch - 2 * q)]
    flip = rng.random(len(picked)) < 0.5
    picked[flip] = picked[flip][..., ::-1]
    return to_model(np.concatenate([objs, generic, picked]))


def frontal_scans(b: Build, n: int) -> torch.Tensor:
    """``n`` frontal stand-in scans (normal and with findings) as the loader gives them: (n, 3, S, S) in [-1, 1].

    Never seen by the VAE: they are what its held-out PSNR is measured on.
    """
    out = []
    for i in range(n):
        rng = b.rng(90, i)
        with torch.no_grad():
            pixels, _ = render(random_patient(rng, abnormal=i % 2 == 1), b.scene(), views.RENDER_SIZE, rng)
        out.append(resize_center_crop(torch.from_numpy(pixels / 4095.0), shapes.SIZE).expand(3, -1, -1))
    return torch.stack(out).float()


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, chunk: int = 16) -> float:
    """PSNR (dB) of the posterior mean's decoding of ``images`` (n, 3, S, S) in [-1, 1]."""
    rec = torch.cat(
        [vae.decode(vae.encode(images[i : i + chunk]).latent_dist.mean).sample for i in range(0, len(images), chunk)]
    )
    return psnr(rec, images)


def vae_stage(b: Build, pool: np.ndarray, held_views: np.ndarray, batch: int = 8) -> tuple[AutoencoderKL, dict]:
    """Stage 2: L1 + MSE + 1e-6 KL on fresh mixed batches; held-out PSNR on every kind of image (as many
    of each as ``held_views`` holds)."""
    vae = make_vae()
    loop = b.loop("vae", vae, list(vae.parameters()), 1e-3, key=20)

    def loss(step: int) -> torch.Tensor:
        x = vae_batch(pool, batch, loop.rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=loop.gen)).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    log = loop.run(loss)
    _as_shipped(vae)
    result = {
        "steps": loop.steps,
        "batch": batch,
        "seconds": round(loop.seconds),
        "loss": log,
        "held_out_psnr_db": held_out_psnr(b, vae, held_views),
    }
    return vae, result


def _as_shipped(vae: AutoencoderKL) -> None:
    """Round the weights through fp16 (what the folder stores) and freeze them."""
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(p.half().float())
    vae.requires_grad_(False)


def held_out_psnr(b: Build, vae: AutoencoderKL, held_views: np.ndarray) -> dict[str, float]:
    """PSNR (dB) on as many fresh frontal stand-in scans, objects and generic images as ``held_views`` holds."""
    rng, n = b.rng(21), len(held_views)
    held = {
        "frontal_stand_in_scans": frontal_scans(b, n),
        "views": to_model(held_views),
        "shapes": to_model(shapes_set(n, rng)[0]),
        "generic": to_model(np.round(np.stack([shapes.generic_image(rng) for _ in range(n)]) * 255).astype(np.uint8)),
    }
    return {k: reconstruction_psnr(vae, x) for k, x in held.items()}


@torch.no_grad()
def latent_stage(b: Build, vae: AutoencoderKL, sets: dict[str, np.ndarray], chunk: int = 64) -> tuple[dict, float]:
    """Stage 3: posterior means of every captioned image per domain, (n, 4, S/8, S/8), and SD's scaling factor.

    The UNet learns the means, not posterior samples: a small VAE's posterior std would bury the
    image under latent noise, and its decoder reads the means as well.
    """
    file = b.folder / "latents" / "latents.safetensors"
    if not file.is_file():
        latents = {
            name: torch.cat(
                [vae.encode(to_model(imgs[i : i + chunk])).latent_dist.mean for i in range(0, len(imgs), chunk)]
            )
            for name, imgs in sets.items()
        }
        b.folder.mkdir(parents=True, exist_ok=True)
        with atomic_dir(file.parent) as tmp:
            save_file({k: v.contiguous() for k, v in latents.items()}, tmp / file.name)
    latents = load_file(file)
    return latents, float(1 / torch.cat(list(latents.values())).std())


def unet_stage(
    b: Build,
    text_encoder,
    tokenizer,
    latents: dict[str, torch.Tensor],
    attrs: dict[str, list[dict[str, str]]],
    scaling: float,
    batch: int = 32,
) -> tuple[torch.nn.Module, dict]:
    """Stage 4: eps-prediction MSE under the frozen text encoder; half of each batch from each domain,
    10 % empty prompts (classifier-free guidance); constant learning rate after warm-up, EMA weights shipped."""
    scheduler = DDPMScheduler(**sd15_scheduler_config())
    unet = make_unet(text_encoder.config.hidden_size)
    ema = EMA(unet)
    loop = b.loop("unet", unet, list(unet.parameters()), 1e-3, key=40, ema=ema, decay=False)
    names = list(DOMAINS)

    def loss(step: int) -> torch.Tensor:
        rng = loop.rng
        zs, texts = [], []
        for j in range(batch):
            name = names[j % len(names)]
            i = int(rng.integers(len(attrs[name])))
            zs.append(latents[name][i])
            texts.append("" if rng.random() < 0.1 else DOMAINS[name].caption(attrs[name][i], rng))
        z = torch.stack(zs) * scaling
        noise = torch.randn(z.shape, generator=loop.gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=loop.gen)
        with torch.no_grad():
            context = text_encoder(tokens(tokenizer, texts))[0]
        return F.mse_loss(unet(scheduler.add_noise(z, noise, t), t, context).sample, noise)

    log = loop.run(loss)
    return ema.copy(), {"steps": loop.steps, "batch": batch, "seconds": round(loop.seconds), "loss": log}


def judge_stage(
    b: Build, pool: np.ndarray, pool_attrs: list[dict[str, str]], batch: int = 32
) -> tuple[judging.Judge, dict]:
    """Stage 5: the attribute classifier on fresh objects and the judge's view pool (its last fifth held out)."""
    judge = judging.Judge()
    cut = len(pool) - len(pool) // 5
    train, held = slice(0, cut), slice(cut, len(pool))
    loop = b.loop("judge", judge, list(judge.parameters()), 1e-3, key=50)

    def batches(rng: np.random.Generator, n: int, part: slice) -> list:
        idx = rng.integers(part.start, part.stop, size=n)
        return [
            judging.as_batch(*shapes_set(n, rng), "shapes"),
            judging.as_batch(pool[idx], [pool_attrs[i] for i in idx], "views"),
        ]

    log = loop.run(lambda step: judging.loss_and_hits(judge, batches(loop.rng, batch, train))[0])
    with torch.no_grad():
        rng = b.rng(51)
        _, hits = judging.loss_and_hits(
            judge,
            [
                judging.as_batch(*shapes_set(256, rng), "shapes"),
                judging.as_batch(pool[held], pool_attrs[held], "views"),
            ],
        )
    accuracy = {k: h / n for k, (h, n) in hits.items()}
    return judge.requires_grad_(False), {
        "steps": loop.steps,
        "seconds": round(loop.seconds),
        "loss": log,
        "held_out_accuracy": accuracy,
    }
