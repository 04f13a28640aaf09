"""What every pretraining stage shares: the optimiser step, the schedule, an EMA, and a loop that
snapshots itself so a stopped build resumes where it stopped.

A snapshot is one folder per stage (written atomically): ``state.safetensors`` (module weights,
AdamW moments, EMA weights, torch generator states) and ``state.json`` (step, numpy generator
states, the loss log). Restoring all of it makes a resumed run continue the same random streams.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selora.io import atomic_dir


class Paused(Exception):
    """The build passed its wall-time budget; everything done so far is in its snapshots."""


def lr_at(step: int, total: int | None, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 1 % of ``peak`` over ``total`` steps (constant if None)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (``a`` clamped to the range first)."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def thin(log: list[float], every: int = 25) -> list[float]:
    """Means over consecutive blocks of ``every`` steps, rounded, for the JSON log."""
    return [round(float(np.mean(log[i : i + every])), 5) for i in range(0, len(log), every)]


class EMA:
    """Exponential moving average of a module's weights (warm-up: decay (1+t)/(10+t))."""

    def __init__(self, module: nn.Module, decay: float = 0.995) -> None:
        self.module, self.decay, self.step = module, decay, 0
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for s, p in zip(self.shadow, self.module.parameters()):
            s.lerp_(p, 1 - d)

    def copy(self) -> nn.Module:
        """A deep copy of the module holding the averaged weights (the original keeps training)."""
        c = copy.deepcopy(self.module)
        with torch.no_grad():
            for p, s in zip(c.parameters(), self.shadow):
                p.copy_(s)
        return c.eval()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"opt.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Loop:
    """``steps`` optimiser steps of ``module`` under AdamW, snapshotted every ``every`` steps into ``folder``.

    ``loss_fn(step)`` draws its batch from ``rng``/``gen`` (restored on resume) and returns the loss;
    the learning rate is :func:`lr_at` (cosine to ``steps``, or constant with ``decay=False``). Past
    ``deadline`` (a ``time.time()``) the loop snapshots and raises :class:`Paused`.
    """

    def __init__(
        self,
        name: str,
        folder: Path,
        module: nn.Module,
        params: list[nn.Parameter],
        steps: int,
        peak_lr: float,
        rng: np.random.Generator,
        gen: torch.Generator,
        ema: EMA | None = None,
        every: int = 250,
        deadline: float | None = None,
        decay: bool = True,
    ) -> None:
        self.name, self.folder, self.module, self.params = name, Path(folder) / name, module, params
        self.steps, self.peak_lr, self.decay = steps, peak_lr, decay
        self.rng, self.gen, self.ema, self.every, self.deadline = rng, gen, ema, every, deadline
        self.opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
        self.log: list[float] = []
        self.seconds = 0.0
        self.step = self._resume()

    def _resume(self) -> int:
        """Restore the last snapshot if there is one; the step to continue from."""
        if not (self.folder / "state.json").is_file():
            return 0
        meta = json.loads((self.folder / "state.json").read_text())
        tensors = load_file(self.folder / "state.safetensors")
        self.module.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("m.")})
        _load_optimizer(self.opt, tensors)
        if self.ema is not None:
            self.ema.shadow = [tensors[f"ema.{i}"] for i in range(len(self.ema.shadow))]
            self.ema.step = meta["step"]
        self.gen.set_state(tensors["gen"])
        self.rng.bit_generator.state = meta["rng"]
        self.log, self.seconds = meta["log"], meta["seconds"]
        print(f"{self.name}: resumed at step {meta['step']}/{self.steps}", flush=True)
        return meta["step"]

    def save(self) -> None:
        """Write the snapshot of the current step (atomically replacing the previous one)."""
        tensors = {f"m.{k}": v.contiguous() for k, v in self.module.state_dict().items()}
        tensors.update(_optimizer_tensors(self.opt))
        if self.ema is not None:
            tensors.update({f"ema.{i}": s for i, s in enumerate(self.ema.shadow)})
        tensors["gen"] = self.gen.get_state()
        meta = {"step": self.step, "rng": self.rng.bit_generator.state, "log": self.log, "seconds": self.seconds}
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.folder) as tmp:
            save_file(tensors, tmp / "state.safetensors")
            (tmp / "state.json").write_text(json.dumps(meta))

    def run(self, loss_fn: Callable[[int], torch.Tensor]) -> list[float]:
        """Train to ``steps`` (from wherever the snapshot was); the loss of every step."""
        t0 = time.time() - self.seconds
        self.module.train()
        while self.step < self.steps:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, self.steps if self.decay else None, self.peak_lr)
            loss = loss_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            if self.ema is not None:
                self.ema.update()
            self.log.append(loss.item())
            self.step += 1
            self.seconds = time.time() - t0
            if self.step % 100 == 0 or self.step == self.steps:
                mean = np.mean(self.log[-100:])
                print(f"{self.name} {self.step}/{self.steps}  loss {mean:.4f}  {self.seconds:.0f}s", flush=True)
            if self.step % self.every == 0 or self.step == self.steps:
                self.save()
                if self.deadline is not None and time.time() > self.deadline and self.step < self.steps:
                    raise Paused(f"{self.name} paused at step {self.step}/{self.steps}")
        self.module.eval()
        return self.log
