"""ONE training step, for every loop that trains: the trainer, the GPU check, the SD v1.5 benchmark
and the chapters' small problems (:mod:`selora.book.toy`, :mod:`selora.book.step_cost`).

    adapters.before_forward(step)                  # e.g. a rank truncation drawn for this step
    loss = loss_fn(forward, batch)                 # e.g. noise prediction (paper Sec. 4)
    [on_loss callbacks]                            # a test may poison the loss here
    total = loss + adapters.regulariser()          # the method's own term (0 for most)
    not finite on any process -> skip              # no backward
    scaler.scale(total).backward()
    [on_backward callbacks]                        # e.g. the authors' extra scoring pass
    scaler.unscale_(optimizer); clip the gradient norm
    not finite -> skip (GradScaler: an fp16 overflow, it lowers its scale)
    scale = scaler.get_scale(); scaler.step(optimizer); scaler.update(); lr_schedule.step()
    change = adapters.after_step(step, grad_scale=scale)    # SeLoRA: the expansion test (Alg. 1)
    decisions = controller.step(grad_scale=scale)           # a bare ExpansionController
    optimizer.zero_grad(); new parameters -> rewrap DDP

A skipped step zeroes the gradients and tells the method and the controller to drop what the pass
captured (the next pass is the same step again). What differs between loops comes in as the loss
function, the parts given (no scaler, schedule, adapters or controller: those steps are left out)
and minGPT-style callbacks (``add_callback(event, fn)``; ``fn(train_step)`` may read and replace
:attr:`TrainStep.loss`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selora.core.expansion import Decision, ExpansionController
from selora.diffusion import noise_prediction_loss
from selora.distributed import Dist
from selora.methods import Adapters, RankChange

#: ``loss_fn(forward module, batch) -> 0-d loss``
LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: Why a step was skipped: these two count as bad steps; an fp16 overflow is the GradScaler's business.
NON_FINITE_LOSS, NON_FINITE_GRADIENT, FP16_OVERFLOW = "non-finite loss", "non-finite gradient", "fp16 overflow"
EVENTS = ("on_loss", "on_backward")


def noise_prediction(autocast: torch.dtype | None = None) -> LossFn:
    """The loss of a ``(noisy (N, 4, h, w), t (N,), ids (N, 77), target (N, 4, h, w))`` batch: the UNet's
    prediction (under ``autocast`` when given) against the target (eps or v), MSE in float32."""

    def loss_fn(forward: nn.Module, batch: tuple) -> torch.Tensor:
        noisy, t, ids, target = batch
        with torch.autocast(noisy.device.type, dtype=autocast, enabled=autocast is not None):
            pred = forward(noisy, t, ids)
        return noise_prediction_loss(pred, target)

    return loss_fn


def squared_error(forward: nn.Module, batch: tuple) -> torch.Tensor:
    """The loss of an ``(x (N, in), y (N, out))`` batch: mean squared error of ``forward(x)`` against ``y``."""
    x, y = batch
    return ((forward(x) - y) ** 2).mean()


@dataclass
class StepResult:
    """What one step did: the batch's ``loss`` (detached; also when skipped), the method's
    ``regulariser``, why it was ``skipped`` (None: it was taken), the loss scale of its backward,
    the method's :class:`~selora.methods.RankChange` and a bare controller's decisions."""

    loss: torch.Tensor
    regulariser: torch.Tensor
    skipped: str | None = None
    grad_scale: float = 1.0
    change: RankChange | None = None
    decisions: list[Decision] = field(default_factory=list)


class TrainStep:
    """One optimizer step of ``model`` on a batch (module docstring); call ``step(batch, step_index)``.

    ``forward`` is the module the loss calls: ``model``, or DDP over it when ``dist`` has a process
    group (rebuilt when the method replaces parameters). ``max_grad_norm``: clip at that norm
    (None: only check that it is finite).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        scaler: torch.amp.GradScaler | None = None,
        lr_schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
        adapters: Adapters | None = None,
        controller: ExpansionController | None = None,
        max_grad_norm: float | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.lr_schedule, self.adapters, self.controller = lr_schedule, adapters, controller
        self.max_grad_norm, self.dist = max_grad_norm, dist
        self.forward = dist.wrap(model) if dist is not None else model
        self.callbacks: dict[str, list[Callable[[TrainStep], None]]] = defaultdict(list)
        self.batch: Any = None
        self.loss: torch.Tensor | None = None

    # -- callbacks (minGPT style) ---------------------------------------------------------------
    def add_callback(self, event: str, fn: Callable[[TrainStep], None]) -> None:
        """Run ``fn(self)`` at ``event``: ``on_loss`` (the loss is :attr:`loss`) or ``on_backward``."""
        if event not in EVENTS:
            raise ValueError(f"event: expected one of {EVENTS}, got {event!r}")
        self.callbacks[event].append(fn)

    def trigger(self, event: str) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self)

    # -- the step -------------------------------------------------------------------------------
    def _all_finite(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is finite on every process."""
        finite = torch.tensor([float(torch.isfinite(t).item())])
        world = 1
        if self.dist is not None:
            finite, world = self.dist.all_sum(finite), self.dist.world
        return finite.item() >= world

    def _skip(self, result: StepResult, why: str) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.adapters is not None:
            self.adapters.on_skip()  # SeLoRA: nothing this pass captured reaches the expansion test
        if self.controller is not None:
            self.controller.discard()
        result.skipped = why
        return result

    def __call__(self, batch: Any, step: int) -> StepResult:
        """One optimizer step on ``batch`` as optimizer step ``step`` (0-based; the method's schedule)."""
        adapters, optimizer, scaler = self.adapters, self.optimizer, self.scaler
        self.batch = batch
        if adapters is not None:
            adapters.before_forward(step)
        self.loss = self.loss_fn(self.forward, batch)
        self.trigger("on_loss")
        loss = self.loss
        reg = adapters.regulariser().float().to(loss.device) if adapters is not None else torch.zeros(())
        result = StepResult(loss.detach(), reg)
        if not self._all_finite(loss + reg):
            return self._skip(result, NON_FINITE_LOSS)
        scaler.scale(loss + reg).backward()
        self.trigger("on_backward")
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
        if not torch.isfinite(norm):
            if not scaler.is_enabled():
                return self._skip(result, NON_FINITE_GRADIENT)
            scaler.step(optimizer)  # an fp16 overflow: GradScaler skips the step and lowers the scale
            scaler.update()
            return self._skip(result, FP16_OVERFLOW)
        result.grad_scale = scaler.get_scale()  # what this backward's loss was multiplied by (1.0 without fp16)
        scaler.step(optimizer)
        scaler.update()
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        if adapters is not None:
            result.change = adapters.after_step(step, grad_scale=result.grad_scale)  # needs this step's gradients
        if self.controller is not None:
            result.decisions = self.controller.step(grad_scale=result.grad_scale)
        optimizer.zero_grad(set_to_none=True)
        if result.change is not None and result.change.new_parameters and self.dist is not None and self.dist.parallel:
            self.forward = self.dist.wrap(self.model)  # new Parameter objects: DDP must register them
        return result
