"""The training loop: latent-diffusion fine-tuning of a Stable Diffusion pipeline with adapters.

One step (paper Sec. 4, :mod:`selora.diffusion`): a sample of the cached VAE posterior z0, DDPM
noise ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, loss = MSE(eps_theta(z_t, t, c), eps) with
the prompt c through the text encoder. The method (:mod:`selora.methods`) is reached only through
its :class:`~selora.methods.Adapters` hooks, so SeLoRA and the baselines share this loop; the run
folder is described in :mod:`selora.rundir`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from selora import rundir
from selora.checkpoint import (
    find_checkpoint,
)
from selora.checkpointing import Checkpointer, Progress
from selora.config import ConfigError, TrainConfig
from selora.data import open_dataset
from selora.diffusion import encode_split, noise_prediction_loss, noise_scheduler, tokenize, training_batch
from selora.distributed import init_distributed
from selora.evaluation import Evaluator
from selora.models import load_pipeline
from selora.params import count_parameters
from selora.pipeline import add_adapters, enable_checkpointing
from selora.profile import seed_everything

AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


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


class Trainer:
    """Fine-tune ``cfg.model`` on ``cfg.dataset`` into ``run_dir`` (:mod:`selora.rundir`); call :meth:`run`.

    ``resume=True`` continues from the newest good checkpoint (``checkpoints/last``, else
    ``checkpoints/previous``). ``max_steps`` ends the run once that many optimizer steps are done in
    total, as the last epoch does (evaluation, best/, final adapters); a resume with a larger one
    continues it. ``metrics``: extra evaluation metrics (see :class:`selora.evaluation.Evaluator`;
    default: those of the run's data and model,
    :func:`selora.evaluation.default_metrics`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path | str,
        resume: bool = False,
        max_steps: int | None = None,
        progress: bool = True,
        metrics: Mapping[str, Callable] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.max_steps, self.progress = cfg, Path(run_dir), max_steps, progress
        seed_everything(cfg.seed)  # global RNGs too (the trainer itself draws only from its own generators)
        self.dist = init_distributed()
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"batch_size={cfg.batch_size}: must be divisible by the {self.dist.world} processes")
        if cfg.mixed_precision != "no" and self.dist.device.type != "cuda":
            raise ConfigError(f"mixed_precision={cfg.mixed_precision!r}: needs a CUDA device; use 'no' on the CPU")
        self.autocast = AUTOCAST[cfg.mixed_precision]
        self._load_data(self.autocast or torch.float32)
        adapter_gen = torch.Generator().manual_seed(cfg.seed)  # lora_A rows, then the method's own draws
        self.model = add_adapters(self.pipe, cfg, total_steps=self.total_steps, generator=adapter_gen)
        self.adapters = self.model.adapters
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)  # non-reentrant: text-encoder adapters keep their gradients
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=cfg.mixed_precision == "fp16")
        self.gen = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, latent samples, dropout
        self.adapters.attach(self.optimizer, self.dist.all_sum if self.dist.world > 1 else None)
        self.at = Progress()
        self.best: dict[str, Any] | None = None
        self.finished = False
        self.metrics_path, self.ranks_path = self.run_dir / rundir.METRICS, self.run_dir / rundir.RANK_HISTORY
        self.evaluator = Evaluator(self, metrics)
        self.checkpoints = Checkpointer(self)
        if resume:
            self.checkpoints.restore()
        elif self.dist.main:
            self.checkpoints.start_run_dir()
        self.ddp = self._wrap()

    # -- set-up ----------------------------------------------------------------------------------
    def _load_data(self, dtype: torch.dtype) -> None:
        """The frozen base pipeline, both splits encoded once (latents cached) and the DDPM schedule."""
        cfg = self.cfg
        self.pipe = load_pipeline(cfg.model, dtype, self.dist.device)
        self.pipe.set_progress_bar_config(disable=True)
        vae, tok, tag = self.pipe.vae, self.pipe.tokenizer, f"{cfg.dataset}-{cfg.resolution}"
        self.train = encode_split(open_dataset(cfg, "train"), vae, tok, cfg.num_workers, f"{tag}-train")
        self.eval = encode_split(
            open_dataset(cfg, cfg.eval_split), vae, tok, cfg.num_workers, f"{tag}-{cfg.eval_split}", keep_images=True
        )
        other = cfg.eval_split != "test"  # the best epoch chosen on another split: log the test loss too
        self.test = encode_split(open_dataset(cfg, "test"), vae, tok, 0, f"{tag}-test") if other else None
        self.steps_per_epoch = len(self.train) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={cfg.batch_size}: larger than the {len(self.train)} training images")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.empty_ids = tokenize(tok, [""])[0]
        self.noise_scheduler = noise_scheduler(self.pipe)

    def _wrap(self) -> nn.Module:
        """The module the training forward goes through: DDP over the model with several processes."""
        return self.dist.wrap(self.model)

    def total_rank(self) -> int:
        return sum(self.adapters.ranks().values())

    def log(self, record: dict) -> None:
        if self.dist.main:
            rundir.append_record(self.metrics_path, record)

    # -- one step --------------------------------------------------------------------------------
    def _skip(self, why: str) -> None:
        """Count a non-finite step; stop with NonFiniteLossError after ``max_bad_steps`` in a row."""
        at = self.at
        at.bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.adapters.on_skip()  # SeLoRA: nothing this pass captured reaches the expansion test
        self.log(
            {"kind": "train", "step": at.step, "batch": at.attempt, "epoch": at.epoch, "loss": None, "skipped": why}
        )
        if at.bad >= self.cfg.max_bad_steps:
            last = self.run_dir / rundir.LAST
            raise NonFiniteLossError(
                f"{why} in {at.bad} consecutive steps (batches {at.attempt - at.bad + 1}-{at.attempt}); "
                f"stopped; the last good checkpoint is {last if find_checkpoint(last) else 'none (no checkpoint yet)'}"
            )
        warnings.warn(f"batch {at.attempt}: {why}; step skipped ({at.bad} in a row)", RuntimeWarning, stacklevel=2)

    def _backward(self, loss: torch.Tensor) -> bool:
        """Scaled backward, unscale, clip; False if the gradient is not finite (the step is skipped)."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
        if torch.isfinite(norm):
            return True
        if self.scaler.is_enabled():  # fp16 overflow: GradScaler skips the step and lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.adapters.on_skip()
        else:
            self._skip("non-finite gradient")
        return False

    def train_step(self, idx: torch.Tensor) -> float | None:
        """One optimizer step on the global batch ``idx``; returns the mean loss or None if skipped."""
        at, dev = self.at, self.dist.device
        at.attempt += 1
        noisy, t, ids, target = training_batch(  # target: eps, or v for a v-prediction model
            self.train,
            idx,
            self.gen,
            self.noise_scheduler,
            self.empty_ids,
            self.cfg.prompt_dropout,
            self.dist.local_slice(len(idx)),
            dev,
        )
        self.adapters.before_forward(at.step)
        with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
            pred = self.ddp(noisy, t, ids)
        loss = noise_prediction_loss(pred, target)  # mean over the local batch
        if at.attempt in self.cfg.debug_nan_steps:  # test hook (config key debug_nan_steps)
            loss = loss * float("nan")
        reg = self.adapters.regulariser().float().to(loss.device)
        finite = self.dist.all_sum(torch.tensor([float(torch.isfinite(loss + reg).item())]))
        if finite.item() < self.dist.world:
            self._skip("non-finite loss")
            return None
        if not self._backward(loss + reg):
            return None
        scale = self.scaler.get_scale()  # what this backward's loss was multiplied by (1.0 without fp16)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        change = self.adapters.after_step(at.step, grad_scale=scale)  # needs this step's gradients
        self.optimizer.zero_grad(set_to_none=True)
        at.step += 1
        at.bad = 0
        if change is not None:
            if change.new_parameters and self.dist.world > 1:
                self.ddp = self._wrap()  # new Parameter objects: DDP must register them
            if self.dist.main:
                rundir.append_record(self.ranks_path, {"step": at.step, **change.record})
        mean_loss = (self.dist.all_sum(loss.detach().float().reshape(1)) / self.dist.world).item()
        self.log(
            {
                "kind": "train",
                "step": at.step,
                "batch": at.attempt,
                "epoch": at.epoch,
                "loss": mean_loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "total_rank": self.total_rank(),
                **self.adapters.train_record(reg),
            }
        )
        return mean_loss

    # -- checkpoints -----------------------------------------------------------------------------
    #: The step at which ``--max-steps`` ended the run (final adapters written); None while it goes on.
    stopped_at: int | None = None
    #: The step of the latest evaluation (None before the first).
    eval_step: int | None = None

    def evaluate(self) -> None:
        """Evaluate (records the step) and keep the adapters in ``best/`` if the eval loss is the lowest."""
        record = self.evaluator.evaluate()
        self.eval_step = self.at.step
        self.checkpoints.save_best(record)

    # -- the loop --------------------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self.max_steps is not None and self.at.step >= self.max_steps

    def run(self) -> dict[str, Any]:
        """Train to the end of the last epoch, or to ``max_steps`` and end there the same way
        (evaluation, best/, final adapters, a checkpoint); returns a summary dict. A finished run
        (all epochs) has nothing to do; one ended at ``max_steps`` continues with a larger one."""
        cfg, at = self.cfg, self.at
        bar = tqdm(
            total=self.total_steps,
            initial=at.step,
            desc="train",
            unit="step",
            disable=not (self.progress and self.dist.main),
        )
        try:
            while not self.finished:
                at = self.at
                if at.epoch >= cfg.epochs:
                    self.checkpoints.finish()
                    break
                if self._stopped():
                    self.checkpoints.end_at_max_steps()
                    return self.summary("stopped at --max-steps")
                self.checkpoints.reopen()
                order = torch.randperm(
                    len(self.train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + at.epoch)
                )
                while at.batch < self.steps_per_epoch and not self._stopped():
                    b = at.batch
                    at.batch += 1
                    loss = self.train_step(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                    if loss is not None:
                        bar.update(1)
                        if not bar.disable:  # the total rank costs a walk over every layer
                            bar.set_postfix(loss=f"{loss:.4f}", rank=self.total_rank())
                        if cfg.checkpoint_every and at.step % cfg.checkpoint_every == 0:
                            self.checkpoints.save()
                if at.batch < self.steps_per_epoch:
                    continue  # stopped by max_steps
                at.epoch += 1
                at.batch = 0
                if at.epoch % cfg.eval_every == 0 or at.epoch == cfg.epochs:
                    self.evaluate()
                self.checkpoints.save()
        finally:
            bar.close()
        return self.summary("finished")

    def parameter_counts(self) -> dict[str, Any]:
        """``trainable`` adapter parameters, frozen ``base`` parameters (UNet + text encoder) and the fraction."""
        counts = count_parameters(self.model)
        return {"trainable": counts.trainable, "base": counts.base, "trainable_fraction": counts.fraction}

    def summary(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            **asdict(self.at),
            "total_rank": self.total_rank(),
            **self.parameter_counts(),
            "best": self.best,
            "run_dir": str(self.run_dir),
        }
