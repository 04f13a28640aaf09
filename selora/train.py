"""The SeLoRA trainer: latent-diffusion fine-tuning of a Stable Diffusion pipeline with adapters.

    python -m selora.train --config FILE|NAME --out RUN_DIR [--set key=value ...] [--max-steps N]
    python -m selora.train --resume RUN_DIR [--max-steps N] [--set epochs=...]
    torchrun --nproc_per_node 2 -m selora.train ...          (gloo on CPU, NCCL on GPU)

One step (paper Sec. 4): VAE latents z0 (cached once per data set, the VAE is frozen), DDPM noise
``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, loss = MSE(eps_theta(z_t, t, c), eps) with the
prompt c through the text encoder (77 tokens, truncated). Adapters sit in the UNet and the text
encoder; ONE :class:`selora.ExpansionController` watches both (one step count, one K generator,
one all-reduce of the Fisher statistics across processes), so the per-sample Fisher of Eq. 3-5
comes from the training step's own backward.

Methods (:data:`METHODS`): ``selora`` (grows rank), and the paper's baselines ``lora`` (r = 4),
``dylora`` (r = 4, a truncation b drawn per step) and ``adalora`` (PEFT, 6 -> ``lora_rank``, its
orthogonality regulariser added to the loss and ``update_and_allocate`` after every step), all
put in by :func:`selora.baselines.make_adapters` and trained by the same loop.

Run directory::

    config.yaml            the resolved config          metrics.jsonl      train/eval records
    rank_history.jsonl     step -> rank per layer       samples/           grids per evaluation
    checkpoints/last/      resumable state              best/              best adapters (eval loss)
    adapters.safetensors   final adapters               ranks.json         final layer -> rank
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from selora.checkpoint import (
    adalora_state_from_files,
    adalora_state_to_files,
    adapter_tensors,
    find_checkpoint,
    load_adapter_tensors,
    merge_adapters,
    optimizer_from_files,
    optimizer_to_files,
    read_adapters,
    read_checkpoint,
    rng_states,
    set_rng_states,
    write_checkpoint,
    write_json,
)
from selora.config import ConfigError, TrainConfig, load_config
from selora.expansion import ExpansionController
from selora.io import atomic_save_safetensors, atomic_write_text
from selora.layers import ranks
from selora.paths import cache_dir
from selora.profile import seed_everything
from selora.sample import generate, image_grid

# -- methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """How a method puts adapters in: its :func:`selora.baselines.make_adapters` name (``kind``),
    the config key of its rank and the ``make_adapters`` argument that receives it, whether an
    :class:`ExpansionController` grows it, and fixed ``make_adapters`` options."""

    kind: str
    rank_key: str
    expands: bool
    rank_arg: str = "rank"
    options: dict[str, Any] = field(default_factory=dict)


#: AdaLoRA's initial rank and orthogonality weight (paper: AdaLoRA 6 -> 4; Zhang et al.'s default 0.5).
ADALORA_INIT_RANK, ADALORA_ORTH_WEIGHT = 6, 0.5

METHODS: dict[str, Method] = {
    "selora": Method("selora", "start_rank", True),
    "lora": Method("lora", "lora_rank", False),
    "dylora": Method("dylora", "lora_rank", False),
    "adalora": Method("adalora", "lora_rank", False, rank_arg="adalora_target_r",
                      options={"adalora_init_r": ADALORA_INIT_RANK, "orth_reg_weight": ADALORA_ORTH_WEIGHT}),
}


def _default_metrics() -> dict[str, Callable[[list, list[str], torch.Tensor], float]]:
    """Offline profile: the shipped proxies (cheap, no download). Paper profile: none here, since
    FID / CLIP score on a 4-image grid mean little and need downloads; ``selora.evaluate`` computes
    them on the whole test split."""
    from selora.profile import profile

    if profile() != "offline":
        return {}
    from selora.metrics import trainer_metrics

    return trainer_metrics("offline")


#: Extra evaluation metrics (FID, CLIP score, ...): ``name -> fn(images, prompts, real) -> float``
#: with the sample grid's PIL images, their prompts and the real images ``(n, 1, H, W)`` in [-1, 1].
#: Computed when the grid shows held-out prompts (real images known) and has at least 2 images.
#: Default: the offline proxies (``fid_proxy``, ``alignment_proxy``) in the offline profile.
EVAL_METRICS: dict[str, Callable[[list, list[str], torch.Tensor], float]] = _default_metrics()

#: Keys that may change when resuming (nothing that changes the model, data or optimisation).
RESUME_KEYS = ("epochs", "checkpoint_every", "eval_every", "num_samples", "sample_steps", "guidance_scale",
               "max_bad_steps", "num_workers", "debug_nan_steps")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


# -- models -------------------------------------------------------------------------------------
class DiffusionModel(nn.Module):
    """UNet + text encoder as one module (one DDP wrapper, one controller over both).

    ``forward(noisy (N, 4, h, w), t (N,), ids (N, 77)) -> eps prediction (N, 4, h, w)``.
    After :func:`add_adapters`, ``.adapters`` holds the method's per-step hooks
    (:class:`selora.baselines.Adapters`).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.adapters = None

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, self.text_encoder(ids)[0]).sample


def load_base_pipeline(model: str, dtype: torch.dtype, device: torch.device):
    """The base ``StableDiffusionPipeline``: ``mini-sd`` / ``sd-v1-5`` (selora.models) or a local folder."""
    from selora.models import load_pipeline

    if model in ("mini-sd", "sd-v1-5"):
        return load_pipeline("offline" if model == "mini-sd" else "paper", dtype=dtype, device=device)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    return pipe.to(device)


def check_method(cfg: TrainConfig) -> None:
    """ConfigError for method settings the config schema cannot see (before any work)."""
    if cfg.method == "adalora" and cfg.lora_rank > ADALORA_INIT_RANK:
        raise ConfigError(f"lora_rank={cfg.lora_rank}: AdaLoRA prunes from rank {ADALORA_INIT_RANK} down to "
                          f"lora_rank; expected lora_rank <= {ADALORA_INIT_RANK}")


def add_adapters(pipe, cfg: TrainConfig, total_steps: int | None = None,
                 generator: torch.Generator | None = None) -> DiffusionModel:
    """Put the method's adapters into ``pipe.unet`` (+ text encoder); everything else frozen.

    Initial ``lora_A`` rows come from ``generator`` (default: seeded with ``cfg.seed``, the same on
    every process; DyLoRA keeps drawing its truncations from it). AdaLoRA needs ``total_steps``
    for its budget schedule (any value >= 1 when only loading weights: the masks live in E).
    LoRA-family adapter parameters are float32 even when the frozen weights are half precision.
    """
    from selora.baselines import make_adapters

    method = METHODS[cfg.method]
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    pipe.vae.requires_grad_(False)
    model = DiffusionModel(pipe.unet, pipe.text_encoder)
    rank = cfg.values[method.rank_key]
    targets = {"unet": cfg.unet_targets}
    if cfg.text_encoder_targets is not None:
        targets["text_encoder"] = cfg.text_encoder_targets
    check_method(cfg)
    try:
        model.adapters = make_adapters(model, method.kind, targets, scale=cfg.lora_scale, total_steps=total_steps,
                                       generator=gen, **{method.rank_arg: rank}, **method.options)
    except ValueError as err:
        raise ConfigError(f"method={cfg.method}: {err}") from None
    for module in model.modules():
        for pname in ("lora_A", "lora_B"):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter) and p.dtype != torch.float32:
                setattr(module, pname, nn.Parameter(p.detach().float()))
    return model


def adapter_ranks(model: DiffusionModel) -> dict[str, int]:
    """``{qualified layer name: rank}`` of every adapter: the LoRA family's rank (SeLoRA: as grown);
    AdaLoRA's live rank, i.e. its initial rank until the allocator first masks triplets of E, then
    the triplets its latest ``rank_pattern`` keeps."""
    out = ranks(model)
    tuner = model.adapters.tuner if model.adapters is not None else None
    if tuner is not None:
        from selora.baselines.adalora import ADAPTER
        from selora.checkpoint import adalora_factors

        pattern = tuner.peft_config[ADAPTER].rank_pattern or {}
        for name, factors in adalora_factors(model).items():
            keep = pattern.get(f"{name}.lora_E.{ADAPTER}")
            out[name] = int(sum(keep)) if keep is not None else factors["lora_E"].shape[0]
    return out


# -- data ---------------------------------------------------------------------------------------
def open_dataset(cfg: TrainConfig, split: str):
    """The map-style data set of ``split`` (images ``(1, R, R)`` in [-1, 1] and ``"prompt"``)."""
    if cfg.dataset == "iuxray":
        from selora.data.iuxray import IUXrayDataset

        return IUXrayDataset(cfg.data_root, split, size=cfg.resolution, seed=cfg.split_seed)
    from selora.data import montgomery_root
    from selora.data.montgomery import MontgomeryDataset

    root = cfg.data_root
    if root is None:
        root = montgomery_root("offline" if cfg.dataset == "montgomery-phantom" else "paper")
    return MontgomeryDataset(root, split, size=cfg.resolution, seed=cfg.split_seed)


def split_prompts(cfg: TrainConfig, split: str) -> list[str]:
    """The prompts of ``split`` of the run's data set, in data-set order."""
    from selora.data.errors import DataError

    try:
        ds = open_dataset(cfg, split)
    except DataError as err:
        raise ConfigError(f"--split {split}: {err}") from None
    return [ds[i]["prompt"] for i in range(len(ds))]


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


def _fingerprint(images: torch.Tensor, vae: nn.Module) -> str:
    """sha256 of the images and the VAE weights (the latent cache key), 16 hex chars."""
    digest = hashlib.sha256()
    digest.update(images.float().numpy().tobytes())
    for name, t in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_split(ds, vae: nn.Module, tokenizer, num_workers: int = 0, tag: str = "split", chunk: int = 16,
                 keep_images: bool = False) -> EncodedSplit:
    """VAE posterior of every image (cached in ``cache_dir("latents")``) and the prompts' token ids.

    Grayscale images are repeated to the VAE's input channels. Token ids are padded to and
    truncated at ``tokenizer.model_max_length`` (77: start token + 75 + end token).
    """
    from torch.utils.data import DataLoader

    images, prompts = [], []
    for batch in DataLoader(ds, batch_size=chunk, num_workers=num_workers):
        images.append(batch["image"].float())
        prompts.extend(batch["prompt"])
    stack = torch.cat(images)
    path = cache_dir("latents") / f"{tag}-{_fingerprint(stack, vae)}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        mean, std = cached["mean"], cached["std"]
    else:
        ref = next(vae.parameters())
        means, stds = [], []
        for part in stack.split(chunk):
            x = part.expand(-1, vae.config.in_channels, -1, -1).to(ref)
            dist_ = vae.encode(x).latent_dist
            # contiguous: the VAE may return channels-last views, which would change the UNet's numerics
            means.append(dist_.mean.float().cpu().contiguous())
            stds.append(dist_.std.float().cpu().contiguous())
        mean, std = torch.cat(means), torch.cat(stds)
        atomic_save_safetensors({"mean": mean.contiguous(), "std": std.contiguous()}, path)
    scale = float(vae.config.scaling_factor)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return EncodedSplit(mean * scale, std * scale, ids, prompts, stack if keep_images else None)


# -- distributed --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """Process layout: ``rank`` of ``world`` processes (1 without torchrun) and the device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over processes (``t`` itself with one process)."""
        if self.world > 1:
            t = t.to(self.device).clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL with CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


# -- the trainer --------------------------------------------------------------------------------
def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, then constant or cosine to 0."""
    warm, cosine = cfg.warmup_steps, cfg.lr_scheduler == "cosine"

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 1, H, W)`` images in [-1, 1] -> N grayscale PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a[0].numpy(), mode="L") for a in arr]


def read_records(run_dir: Path | str) -> dict[str, list[dict]]:
    """A run's records: ``{"train": [...], "eval": [...], "ranks": [...]}`` from metrics.jsonl and
    rank_history.jsonl (train: step, batch, epoch, loss, lr, total_rank; skipped batches have
    ``loss`` None; ranks: step, ranks per layer, expanded, ratios)."""
    run_dir = Path(run_dir)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    history = [json.loads(x) for x in (run_dir / "rank_history.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"train": [r for r in metrics if r["kind"] == "train"], "eval": [r for r in metrics if r["kind"] == "eval"],
            "ranks": history}


def _jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` lines of ``path`` (records written after the checkpoint are dropped)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    atomic_write_text(path, "".join(lines[:n]))


class Trainer:
    """Fine-tune ``cfg.model`` on ``cfg.dataset`` into ``run_dir`` (see the module docstring).

    ``resume=True`` continues from ``run_dir/checkpoints/last``. ``max_steps`` stops (with a
    checkpoint) once that many optimizer steps are done in total. Call :meth:`run`.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path | str, resume: bool = False, max_steps: int | None = None,
                 progress: bool = True) -> None:
        self.cfg, self.run_dir, self.max_steps, self.progress = cfg, Path(run_dir), max_steps, progress
        check_method(cfg)
        seed_everything(cfg.seed)  # global RNGs too (the trainer itself draws only from its own generators)
        self.d = init_distributed()
        if cfg.batch_size % self.d.world:
            raise ConfigError(f"batch_size={cfg.batch_size}: must be divisible by the {self.d.world} processes")
        if cfg.mixed_precision != "no" and self.d.device.type != "cuda":
            raise ConfigError(f"mixed_precision={cfg.mixed_precision!r}: needs a CUDA device; use 'no' on the CPU")
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.autocast = dtype if dtype != torch.float32 else None

        self._load_data(dtype)
        # adapters, optimizer, schedule, controller
        self.adapter_gen = torch.Generator().manual_seed(cfg.seed)  # lora_A rows, then DyLoRA's b draws
        self.model = add_adapters(self.pipe, cfg, total_steps=self.total_steps, generator=self.adapter_gen)
        self.adapters = self.model.adapters
        if cfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            self.pipe.text_encoder.gradient_checkpointing_enable()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.d.device.type, enabled=cfg.mixed_precision == "fp16")
        self.gen = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, latent samples, dropout
        self.controller = None
        if METHODS[cfg.method].expands:
            reduce = self.d.all_sum if self.d.world > 1 else None
            self.controller = ExpansionController(
                self.model, self.optimizer, threshold=cfg.threshold, interval=cfg.interval, max_rank=cfg.max_rank,
                generator=torch.Generator().manual_seed(cfg.seed + 1), reduce=reduce)
        self.step = self.epoch = self.batch = self.attempt = self.bad = 0
        self.best: dict[str, Any] | None = None
        self.finished = False
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.ranks_path = self.run_dir / "rank_history.jsonl"
        if resume:
            self._restore()
        elif self.d.main:
            self._start_run_dir()
        self.ddp = self._wrap()

    # -- helpers -------------------------------------------------------------------------------
    def _start_run_dir(self) -> None:
        """A fresh run directory: the resolved config, empty metrics, the rank history's step 0."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml(), encoding="utf-8")
        for path in (self.metrics_path, self.ranks_path):
            _truncate_lines(path, 0)
        _jsonl(self.ranks_path, {"step": 0, "ranks": adapter_ranks(self.model)})

    def _load_data(self, dtype: torch.dtype) -> None:
        """The frozen base pipeline, both splits encoded once (latents cached) and the DDPM schedule."""
        from diffusers import DDPMScheduler

        cfg = self.cfg
        self.pipe = load_base_pipeline(cfg.model, dtype, self.d.device)
        self.pipe.set_progress_bar_config(disable=True)
        vae, tok, tag = self.pipe.vae, self.pipe.tokenizer, f"{cfg.dataset}-{cfg.resolution}"
        self.train = encode_split(open_dataset(cfg, "train"), vae, tok, cfg.num_workers, f"{tag}-train")
        self.eval = encode_split(open_dataset(cfg, cfg.eval_split), vae, tok, cfg.num_workers,
                                 f"{tag}-{cfg.eval_split}", keep_images=True)
        self.steps_per_epoch = len(self.train) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={cfg.batch_size}: larger than the {len(self.train)} training images")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.empty_ids = tok([""], padding="max_length", max_length=self.train.ids.shape[1], truncation=True,
                             return_tensors="pt").input_ids[0]
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

    def _wrap(self) -> nn.Module:
        """The module the training forward goes through: DDP over the model with several processes."""
        if self.d.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.d.device.index] if self.d.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, init_sync=False)

    def total_rank(self) -> int:
        return sum(adapter_ranks(self.model).values())

    def _generators(self) -> dict[str, torch.Generator]:
        """The trainer's own generators whose states a checkpoint keeps."""
        gens = {"train": self.gen}
        if self.controller is not None:
            gens["controller"] = self.controller.generator
        if self.cfg.method == "dylora":
            gens["truncation"] = self.adapter_gen
        return gens

    def _log(self, record: dict) -> None:
        if self.d.main:
            _jsonl(self.metrics_path, record)

    def _lines(self, path: Path) -> int:
        return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0

    # -- one step ------------------------------------------------------------------------------
    def _batch_inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's share of a global batch: (noisy latents, t, ids, target noise).

        Every random draw is made for the WHOLE global batch from ``self.gen`` (identical on every
        process), then sliced, so N processes see exactly what one process with the same batch sees.
        """
        g, data = self.gen, self.train
        n = len(idx)
        shape = (n, *data.mean.shape[1:])
        eps_latent = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
        drop = torch.rand(n, generator=g) < self.cfg.prompt_dropout
        part = slice(self.d.rank * n // self.d.world, (self.d.rank + 1) * n // self.d.world)
        idx = idx[part]
        z0 = data.mean[idx] + data.std[idx] * eps_latent[part]  # a sample of the cached posterior
        noisy = self.noise_scheduler.add_noise(z0, noise[part], t[part])  # DDPM forward process
        ids = torch.where(drop[part, None], self.empty_ids, data.ids[idx])
        dev = self.d.device
        return noisy.to(dev), t[part].to(dev), ids.to(dev), noise[part].to(dev)

    def _skip(self, why: str) -> None:
        """Count a non-finite step; stop with NonFiniteLossError after ``max_bad_steps`` in a row."""
        self.bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._log({"kind": "train", "step": self.step, "batch": self.attempt, "epoch": self.epoch,
                   "loss": None, "skipped": why})
        if self.bad >= self.cfg.max_bad_steps:
            last = self.run_dir / "checkpoints" / "last"
            raise NonFiniteLossError(
                f"{why} in {self.bad} consecutive steps (batches {self.attempt - self.bad + 1}-{self.attempt}); "
                f"stopped; the last good checkpoint is {last if find_checkpoint(last) else 'none (no checkpoint yet)'}"
            )
        warnings.warn(f"batch {self.attempt}: {why}; step skipped ({self.bad} in a row)", RuntimeWarning, stacklevel=2)

    def train_step(self, idx: torch.Tensor) -> float | None:
        """One optimizer step on the global batch ``idx``; returns the mean loss or None if skipped."""
        self.attempt += 1
        noisy, t, ids, noise = self._batch_inputs(idx)
        self.adapters.before_forward(self.step)  # DyLoRA: this step's truncation b
        with torch.autocast(self.d.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            pred = self.ddp(noisy, t, ids)
        loss = F.mse_loss(pred.float(), noise.float())  # noise-prediction MSE, mean over the local batch
        if self.attempt in self.cfg.debug_nan_steps:  # test hook (config key debug_nan_steps)
            loss = loss * float("nan")
        reg = self.adapters.regulariser().float().to(loss.device)  # AdaLoRA: orth_reg_weight * R(A, B); else 0
        finite = self.d.all_sum(torch.tensor([float(torch.isfinite(loss + reg).item())]))
        if finite.item() < self.d.world:
            self._skip("non-finite loss")
            return None
        self.scaler.scale(loss + reg).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(norm):
            if self.scaler.is_enabled():  # fp16 overflow: GradScaler skips the step and lowers the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self._skip("non-finite gradient")
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        decisions = self.controller.step() if self.controller is not None else []
        before = adapter_ranks(self.model) if self.cfg.method == "adalora" else None
        self.adapters.after_step(self.step)  # AdaLoRA: update_and_allocate (needs this step's gradients)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bad = 0
        now = adapter_ranks(self.model) if before is not None else None
        if now != before and self.d.main:  # AdaLoRA's allocator masked triplets of E
            _jsonl(self.ranks_path, {"step": self.step, "ranks": now, "pruned": [k for k in now if now[k] < before[k]]})
        if decisions:
            grown = [d.name for d in decisions if d.expanded]
            if grown and self.d.world > 1:
                self.ddp = self._wrap()  # new Parameter objects: DDP must register them
            if self.d.main:
                _jsonl(self.ranks_path, {"step": self.step, "ranks": adapter_ranks(self.model), "expanded": grown,
                                         "ratios": {d.name: d.ratio for d in decisions}})
        mean_loss = (self.d.all_sum(loss.detach().float().reshape(1)) / self.d.world).item()
        record = {"kind": "train", "step": self.step, "batch": self.attempt, "epoch": self.epoch, "loss": mean_loss,
                  "lr": self.optimizer.param_groups[0]["lr"], "total_rank": self.total_rank()}
        if self.cfg.method == "adalora":
            record["reg"] = reg.item()
        self._log(record)
        return mean_loss

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self) -> float:
        """Held-out noise-prediction MSE with fixed noise/timesteps (same draw every evaluation)."""
        data, g = self.eval, torch.Generator().manual_seed(self.cfg.seed + 2)
        n = len(data)
        eps_latent = torch.randn(data.mean.shape, generator=g)
        noise = torch.randn(data.mean.shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
        mine = torch.arange(self.d.rank, n, self.d.world)
        total = torch.zeros(2, dtype=torch.float64)
        for idx in mine.split(self.cfg.batch_size):
            z0 = data.mean[idx] + data.std[idx] * eps_latent[idx]
            noisy = self.noise_scheduler.add_noise(z0, noise[idx], t[idx]).to(self.d.device)
            with torch.autocast(self.d.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                pred = self.model(noisy, t[idx].to(self.d.device), data.ids[idx].to(self.d.device))
            err = (pred.float().cpu() - noise[idx]).pow(2).flatten(1).mean(1)
            total += torch.stack([err.sum().double(), torch.tensor(float(len(idx)), dtype=torch.float64)])
        total = self.d.all_sum(total).cpu()
        return (total[0] / total[1]).item()

    def sample_prompts(self) -> tuple[list[str], torch.Tensor | None]:
        """Prompts of the sample grid and their real images (None for configured prompts)."""
        k = self.cfg.num_samples
        if self.cfg.sample_prompts is not None:
            return list(self.cfg.sample_prompts)[:k], None
        n = len(self.eval)
        idx = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(k, n))})
        return [self.eval.prompts[i] for i in idx], self.eval.images[idx]

    def evaluate(self) -> dict[str, Any]:
        """Eval loss (all processes), sample grid and :data:`EVAL_METRICS` (main process).

        DyLoRA is evaluated at its full rank r (the truncation a step drew is reset)."""
        if self.cfg.method == "dylora":
            from selora.baselines import set_truncation

            set_truncation(self.model, None)
        record: dict[str, Any] = {"kind": "eval", "step": self.step, "epoch": self.epoch, "eval_loss": self.eval_loss(),
                                  "total_rank": self.total_rank(), **self.parameter_counts()}
        if self.d.main and self.cfg.num_samples > 0:
            prompts, real = self.sample_prompts()
            with torch.autocast(self.d.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                images = generate(self.pipe, prompts, self.cfg.resolution, self.cfg.sample_steps,
                                  self.cfg.guidance_scale, seed=self.cfg.seed, batch=len(prompts), progress=False)
            out = self.run_dir / "samples"
            out.mkdir(exist_ok=True)
            image_grid(images, prompts).save(out / f"epoch-{self.epoch:03d}.png")
            if real is not None and not (out / "real.png").is_file():
                image_grid(to_pil(real), prompts).save(out / "real.png")  # the held-out scans themselves
            record["samples"] = f"samples/epoch-{self.epoch:03d}.png"
            if real is not None and len(images) >= 2:  # a Fréchet distance needs two samples
                for name, fn in EVAL_METRICS.items():
                    record[name] = float(fn(images, prompts, real))
        self._log(record)
        return record

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        """Write ``checkpoints/last`` atomically (main process) and wait for it on every process."""
        if self.d.main:
            tensors, opt_meta = optimizer_to_files(self.optimizer)
            gens = self._generators()
            ctl = adalora = None
            if self.adapters.tuner is not None:
                adalora_t, adalora = adalora_state_to_files(self.adapters.tuner)
                tensors.update(adalora_t)
            if self.controller is not None:
                cs = self.controller.state_dict()
                ctl = {"count": cs["count"], "ranks": cs["ranks"], "candidates": sorted(cs["candidates"])}
                tensors.update({f"controller.K.{k}": v for k, v in cs["candidates"].items()})
            rng_t, rng_meta = rng_states(gens)
            tensors.update(rng_t)
            state = {
                "step": self.step, "epoch": self.epoch, "batch": self.batch, "attempt": self.attempt, "bad": self.bad,
                "best": self.best, "finished": self.finished, "world": self.d.world,
                "records": {"metrics": self._lines(self.metrics_path), "ranks": self._lines(self.ranks_path)},
                "optimizer": opt_meta, "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "controller": ctl, "rng": rng_meta,
            }
            if adalora is not None:
                state["adalora"] = adalora
            write_checkpoint(self.run_dir / "checkpoints" / "last", adapter_tensors(self.model),
                             adapter_ranks(self.model), tensors, state)
        self.d.barrier()

    def _restore(self) -> None:
        """Resume from ``checkpoints/last``: ranks first (controller grows the layers and swaps the
        optimizer's parameters), then adapter values, optimizer, schedule, RNG and counters."""
        found = find_checkpoint(self.run_dir / "checkpoints" / "last")
        if found is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint in checkpoints/last")
        adapters, tensors, state = read_checkpoint(found)
        if self.controller is not None:
            names = state["controller"]["candidates"]
            self.controller.load_state_dict({
                "count": state["controller"]["count"], "ranks": state["controller"]["ranks"],
                "generator": tensors["rng.gen.controller"],
                "candidates": {k: tensors[f"controller.K.{k}"] for k in names},
            })
        load_adapter_tensors(self.model, adapters, where=str(found))
        if self.adapters.tuner is not None:
            adalora_state_from_files(self.adapters.tuner, tensors, state["adalora"])
        optimizer_from_files(self.optimizer, tensors, state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_states(tensors, state["rng"], self._generators())
        for key in ("step", "epoch", "batch", "attempt", "bad", "best", "finished"):
            setattr(self, key, state[key])
        if self.d.main:
            _truncate_lines(self.metrics_path, state["records"]["metrics"])
            _truncate_lines(self.ranks_path, state["records"]["ranks"])
        self.d.barrier()

    def _save_best(self, record: dict) -> None:
        if self.best is not None and record["eval_loss"] >= self.best["eval_loss"]:
            return
        self.best = {"eval_loss": record["eval_loss"], "step": self.step, "epoch": self.epoch}
        if self.d.main:
            write_checkpoint(self.run_dir / "best", adapter_tensors(self.model), adapter_ranks(self.model),
                             state=self.best)

    def _finish(self) -> None:
        self.finished = True
        if self.d.main:
            atomic_save_safetensors(adapter_tensors(self.model), self.run_dir / "adapters.safetensors")
            write_json(self.run_dir / "ranks.json", adapter_ranks(self.model))
        self.save()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the end (or to ``max_steps``); returns a summary dict."""
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and self.d.main))
        try:
            while not self.finished:
                if self.max_steps is not None and self.step >= self.max_steps:
                    self.save()
                    return self.summary("stopped at --max-steps")
                if self.epoch >= cfg.epochs:
                    self._finish()
                    break
                order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
                    cfg.seed * 100_003 + self.epoch))
                while self.batch < self.steps_per_epoch and not (self.max_steps is not None and self.step >= self.max_steps):
                    b = self.batch
                    self.batch += 1
                    loss = self.train_step(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                    if loss is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", rank=self.total_rank())
                        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                            self.save()
                if self.batch < self.steps_per_epoch:
                    continue  # stopped by max_steps
                self.epoch += 1
                self.batch = 0
                if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                    self._save_best(self.evaluate())
                self.save()
        finally:
            bar.close()
        return self.summary("finished")

    def parameter_counts(self) -> dict[str, Any]:
        """``trainable`` adapter parameters, frozen ``base`` parameters (UNet + text encoder) and the fraction."""
        from selora.baselines import count_parameters

        counts = count_parameters(self.model)
        return {"trainable": counts.trainable, "base": counts.base, "trainable_fraction": counts.fraction}

    def summary(self, status: str) -> dict[str, Any]:
        return {"status": status, "step": self.step, "epoch": self.epoch, "total_rank": self.total_rank(),
                **self.parameter_counts(), "best": self.best, "run_dir": str(self.run_dir)}


# -- loading a finished run (sampling) ----------------------------------------------------------
def run_config(run_dir: Path | str) -> TrainConfig:
    """The resolved config a run directory was trained with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(path)


def load_run(run_dir: Path | str, adapters: str = "best", merged: bool = False, device: torch.device | None = None):
    """``(config, pipeline with the run's adapters)``; ``adapters`` = ``best`` or ``last``.

    ``last`` is ``adapters.safetensors`` of a finished run or else the latest checkpoint; ``best``
    falls back to ``last`` when no evaluation ran. ``merged=True`` folds W0 + s B A into plain Linears.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    candidates = [run_dir / "best" / "adapters.safetensors"] if adapters == "best" else []
    candidates += [run_dir / "adapters.safetensors", run_dir / "checkpoints" / "last" / "adapters.safetensors"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no adapters (best/, adapters.safetensors or checkpoints/last/)")
    dev = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    pipe = load_base_pipeline(cfg.model, torch.float32, dev)
    model = add_adapters(pipe, cfg, total_steps=1)  # AdaLoRA: the budget schedule is unused when only loading
    load_adapter_tensors(model, read_adapters(path), where=str(path))
    if merged:
        merge_adapters(model)
    model.requires_grad_(False)
    return cfg, pipe


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m selora.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="config file or shipped name (montgomery-offline, montgomery-paper, iuxray-paper)")
    ap.add_argument("--out", type=Path, help="run directory to create")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    ap.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps in total")
    ap.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, Path, bool]:
    """Check the command line and load the config; ConfigError on any problem, before any work."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: expected an integer >= 1")
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume takes the config from RUN_DIR/config.yaml; drop --config")
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise ConfigError(f"--out {args.out} differs from --resume {args.resume}; a run resumes in place")
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        bad = [o.partition("=")[0].strip() for o in args.overrides if o.partition("=")[0].strip() not in RESUME_KEYS]
        if bad:
            raise ConfigError(f"--set {bad[0]}: cannot change when resuming; only {', '.join(RESUME_KEYS)}")
        return load_config(saved, args.overrides), args.resume, True
    if args.config is None or args.out is None:
        raise ConfigError("expected --config FILE and --out RUN_DIR (or --resume RUN_DIR)")
    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"--out {args.out}: exists and is not empty; use --resume {args.out} to continue it")
    return load_config(args.config, args.overrides), args.out, False


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 done, 1 training stopped (non-finite loss), 2 bad input."""
    from selora.data.errors import DataError
    from selora.profile import set_threads

    args = parse_args(argv)
    try:
        cfg, run_dir, resume = resolve(args)
        set_threads()
        trainer = Trainer(cfg, run_dir, resume=resume, max_steps=args.max_steps, progress=not args.no_progress)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.d.main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
