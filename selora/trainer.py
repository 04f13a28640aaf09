"""The training loop: latent-diffusion fine-tuning of a Stable Diffusion pipeline with adapters.

One step (paper Sec. 4, :mod:`selora.diffusion`): a sample of the cached VAE posterior z0, DDPM
noise ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, loss = MSE(eps_theta(z_t, t, c), eps) with
the prompt c through the text encoder; the step itself is :class:`selora.train_step.TrainStep`.
The method (:mod:`selora.methods`) is reached only through its :class:`~selora.methods.Adapters`
hooks, so SeLoRA and the baselines share this loop. The trainer owns the run's
:class:`~selora.run_state.RunState`; :class:`~selora.run_state.Checkpointer` saves and restores it
and :class:`~selora.held_out.Evaluator` checks the model, each given only the parts it needs. The run
folder is described in :mod:`selora.rundir`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from selora import rundir
from selora.checkpoint import find_checkpoint
from selora.config import ConfigError, TrainConfig
from selora.data import open_dataset
from selora.diffusion import EncodedSplit, encode_split, noise_scheduler, tokenize, training_batch
from selora.distributed import Dist, init_distributed
from selora.dtypes import AUTOCAST
from selora.held_out import Evaluator
from selora.models import load_pipeline
from selora.params import count_parameters
from selora.pipeline import DiffusionModel, add_adapters, enable_checkpointing
from selora.profile import seed_everything
from selora.run_state import Checkpointer, RunState, TrainingParts
from selora.train_step import FP16_OVERFLOW, TrainStep, noise_prediction


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


# -- the parts, each built by its own function ---------------------------------------------------
def start_processes(cfg: TrainConfig) -> Dist:
    """Seed every RNG, join the process group, check that the config fits it."""
    seed_everything(cfg.seed)  # global RNGs too (the trainer itself draws only from its own generators)
    dist = init_distributed()
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be divisible by the {dist.world} processes")
    if cfg.mixed_precision != "no" and dist.device.type != "cuda":
        raise ConfigError(f"mixed_precision={cfg.mixed_precision!r}: needs a CUDA device; use 'no' on the CPU")
    return dist


def encode_splits(cfg: TrainConfig, pipe: Any) -> tuple[EncodedSplit, EncodedSplit, EncodedSplit | None]:
    """``(train, eval, test)`` splits encoded once by ``pipe``'s VAE (latents cached); test is None
    when the eval split is the test split (the best epoch chosen on another split logs the test loss too)."""
    vae, tok, tag = pipe.vae, pipe.tokenizer, f"{cfg.dataset}-{cfg.resolution}"
    train = encode_split(open_dataset(cfg, "train"), vae, tok, cfg.num_workers, f"{tag}-train")
    held_out = encode_split(
        open_dataset(cfg, cfg.eval_split), vae, tok, cfg.num_workers, f"{tag}-{cfg.eval_split}", keep_images=True
    )
    other = cfg.eval_split != "test"
    test = encode_split(open_dataset(cfg, "test"), vae, tok, 0, f"{tag}-test") if other else None
    return train, held_out, test


def build_model(cfg: TrainConfig, pipe: Any, total_steps: int) -> DiffusionModel:
    """The pipeline's UNet + text encoder with ``cfg.method``'s adapters, in training mode."""
    adapter_gen = torch.Generator().manual_seed(cfg.seed)  # lora_A rows, then the method's own draws
    model = add_adapters(pipe, cfg, total_steps=total_steps, generator=adapter_gen)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)  # non-reentrant: text-encoder adapters keep their gradients
    model.train()
    return model


def build_training_parts(cfg: TrainConfig, model: DiffusionModel, dist: Dist, total_steps: int) -> TrainingParts:
    """AdamW over the adapters, its warm-up/cosine schedule, the fp16 GradScaler and the data generator;
    the method is attached to the optimizer (SeLoRA: its controller, Fisher statistics summed over processes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.mixed_precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, latent samples, dropout
    model.adapters.attach(optimizer, dist.all_sum if dist.parallel else None)
    return TrainingParts(model.adapters, optimizer, lr_schedule, scaler, generator)


class Trainer:
    """Fine-tune ``cfg.model`` on ``cfg.dataset`` into ``run_dir`` (:mod:`selora.rundir`); call :meth:`run`.

    ``resume=True`` continues from the newest good checkpoint (``checkpoints/last``, else
    ``checkpoints/previous``). ``max_steps`` ends the run once that many optimizer steps are done in
    total, as the last epoch does (evaluation, best/, final adapters); a resume with a larger one
    continues it. ``metrics``: extra evaluation metrics (see :class:`selora.held_out.Evaluator`;
    default: those of the run's data and model, :func:`selora.held_out.default_metrics`).
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
        self.dist = start_processes(cfg)
        self.pipe = load_pipeline(cfg.model, AUTOCAST[cfg.mixed_precision] or torch.float32, self.dist.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.train_data, self.eval_data, self.test_data = encode_splits(cfg, self.pipe)
        self.steps_per_epoch = len(self.train_data) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={cfg.batch_size}: larger than the {len(self.train_data)} training images")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.empty_ids = tokenize(self.pipe.tokenizer, [""])[0]
        self.noise_scheduler = noise_scheduler(self.pipe)
        self.model = build_model(cfg, self.pipe, self.total_steps)
        self.adapters = self.model.adapters
        self.parts = build_training_parts(cfg, self.model, self.dist, self.total_steps)
        self.evaluator = Evaluator(
            cfg,
            self.run_dir,
            self.dist,
            self.pipe,
            self.model,
            self.noise_scheduler,
            self.eval_data,
            self.test_data,
            metrics,
        )
        self.checkpoints = Checkpointer(self.run_dir, self.dist, self.parts)
        if resume:
            self.state = self.checkpoints.restore()
        else:
            self.state = RunState()
            self.checkpoints.start_run_dir(cfg.to_yaml())
        self.rank_total = self.total_rank()  # kept up to date from the method's rank changes
        self.step_fn = TrainStep(  # after a resume: DDP wraps the parameters the checkpoint's ranks gave
            self.model,
            self.parts.optimizer,
            noise_prediction(AUTOCAST[cfg.mixed_precision]),
            scaler=self.parts.scaler,
            lr_schedule=self.parts.lr_schedule,
            adapters=self.adapters,
            max_grad_norm=cfg.max_grad_norm,
            dist=self.dist,
        )

    def total_rank(self) -> int:
        """The sum of every adapter's rank (walks every layer)."""
        return sum(self.adapters.ranks().values())

    def log(self, record: dict) -> None:
        if self.dist.main:
            rundir.append_record(self.run_dir / rundir.METRICS, record)

    # -- one step --------------------------------------------------------------------------------
    def _count_bad(self, why: str) -> None:
        """Count and log a non-finite step; stop with NonFiniteLossError after ``max_bad_steps`` in a row."""
        s = self.state
        s.bad += 1
        self.log({"kind": "train", "step": s.step, "batch": s.attempt, "epoch": s.epoch, "loss": None, "skipped": why})
        if s.bad >= self.cfg.max_bad_steps:
            last = self.run_dir / rundir.LAST
            raise NonFiniteLossError(
                f"{why} in {s.bad} consecutive steps (batches {s.attempt - s.bad + 1}-{s.attempt}); "
                f"stopped; the last good checkpoint is {last if find_checkpoint(last) else 'none (no checkpoint yet)'}"
            )
        warnings.warn(f"batch {s.attempt}: {why}; step skipped ({s.bad} in a row)", RuntimeWarning, stacklevel=2)

    def train_step(self, idx: torch.Tensor) -> float | None:
        """One optimizer step on the global batch ``idx``; returns the mean loss or None if skipped."""
        s = self.state
        s.attempt += 1
        batch = training_batch(  # (noisy, t, ids, target): target eps, or v for a v-prediction model
            self.train_data,
            idx,
            self.parts.generator,
            self.noise_scheduler,
            self.empty_ids,
            self.cfg.prompt_dropout,
            self.dist.local_slice(len(idx)),
            self.dist.device,
        )
        result = self.step_fn(batch, s.step)
        if result.skipped == FP16_OVERFLOW:  # GradScaler lowered its scale: not a bad step
            return None
        if result.skipped:
            self._count_bad(result.skipped)
            return None
        s.step += 1
        s.bad = 0
        if result.change is not None:
            self.rank_total = self.total_rank()
            if self.dist.main:
                rundir.append_record(self.run_dir / rundir.RANK_HISTORY, {"step": s.step, **result.change.record})
        mean_loss = (self.dist.all_sum(result.loss.float().reshape(1)) / self.dist.world).item()
        self.log(
            {
                "kind": "train",
                "step": s.step,
                "batch": s.attempt,
                "epoch": s.epoch,
                "loss": mean_loss,
                "lr": self.parts.optimizer.param_groups[0]["lr"],
                "total_rank": self.rank_total,
                **self.adapters.train_record(result.regulariser),
            }
        )
        return mean_loss

    # -- evaluation and the run's ends ---------------------------------------------------------------
    def check_held_out(self) -> None:
        """Evaluate (log the record) and keep the adapters in ``best/`` if the eval loss is the lowest."""
        s = self.state
        record = self.evaluator.record(s.step, s.epoch, mid_epoch=s.batch != 0)
        self.log(record)
        s.eval_step = s.step
        if s.best is None or record["eval_loss"] < s.best["eval_loss"]:
            s.best = {"eval_loss": record["eval_loss"], "step": s.step, "epoch": s.epoch}
            self.checkpoints.write_best(s.best)

    def _finish(self) -> None:
        """The last epoch is done: final adapters, then the checkpoint marked finished."""
        self.state.finished, self.state.stopped_at = True, None
        self.checkpoints.write_final(self.state.step)
        self.checkpoints.save(self.state)

    def _end_at_max_steps(self) -> None:
        """End at ``max_steps`` like at the last epoch: evaluation (unless one ran at this step) and
        best/, final adapters, then the checkpoint marked ``stopped_at``; nothing if that is done."""
        s = self.state
        if s.stopped_at == s.step:
            return
        if s.eval_step != s.step:
            self.check_held_out()
        s.stopped_at = s.step
        self.checkpoints.write_final(s.step)
        self.checkpoints.save(s)

    def _reopen(self) -> None:
        """Training goes on past a ``--max-steps`` end: its final adapters no longer belong to ``last``."""
        if self.state.stopped_at is not None:
            self.state.stopped_at = None
            self.checkpoints.drop_final()

    # -- the loop --------------------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def run(self) -> dict[str, Any]:
        """Train to the end of the last epoch, or to ``max_steps`` and end there the same way
        (evaluation, best/, final adapters, a checkpoint); returns a summary dict. A finished run
        (all epochs) has nothing to do; one ended at ``max_steps`` continues with a larger one."""
        cfg, s = self.cfg, self.state
        bar = tqdm(
            total=self.total_steps,
            initial=s.step,
            desc="train",
            unit="step",
            disable=not (self.progress and self.dist.main),
        )
        try:
            while not s.finished:
                if s.epoch >= cfg.epochs:
                    self._finish()
                    break
                if self._stopped():
                    self._end_at_max_steps()
                    return self.summary("stopped at --max-steps")
                self._reopen()
                order = torch.randperm(
                    len(self.train_data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + s.epoch)
                )
                while s.batch < self.steps_per_epoch and not self._stopped():
                    b = s.batch
                    s.batch += 1
                    loss = self.train_step(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                    if loss is not None:
                        bar.update(1)
                        if not bar.disable:
                            bar.set_postfix(loss=f"{loss:.4f}", rank=self.rank_total)
                        if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
                            self.checkpoints.save(s)
                if s.batch < self.steps_per_epoch:
                    continue  # stopped by max_steps
                s.epoch += 1
                s.batch = 0
                if s.epoch % cfg.eval_every == 0 or s.epoch == cfg.epochs:
                    self.check_held_out()
                self.checkpoints.save(s)
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
            **self.state.counters(),
            "total_rank": self.rank_total,
            **self.parameter_counts(),
            "best": self.state.best,
            "run_dir": str(self.run_dir),
        }
