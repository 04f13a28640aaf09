"""What scoring an expansion costs: a plain training step, a SeLoRA test step whose Fisher statistics
come from the step's own backward (:mod:`selora.core.fisher`), and a step with the extra forward/backward
pass that the authors' code runs to score (the book's page "The cost of the test"). Each is measured two
ways: matrix-product FLOPs counted by torch's ``FlopCounterMode`` (exact, the same on every machine) and wall-clock time
(this machine, its load; ``benchmarks/core.py`` measures time ratios at SD v1.5's widths).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from selora.core.expansion import ExpansionController
from selora.train_step import TrainStep, squared_error

__all__ = ["SCORING_MODES", "StepCost", "scoring_costs"]


#: The three steps :func:`scoring_costs` compares, in the order it runs them.
PLAIN, TEST, EXTRA_PASS = SCORING_MODES = ("plain step", "test step (hooks)", "step + extra fwd/bwd")


@dataclass
class StepCost:
    """One kind of training step: matrix-product FLOPs (exact, the same on every machine) and the
    wall-clock seconds of each timed step (this machine, its load)."""

    flops: int = 0
    seconds: list[float] = field(default_factory=list)


def _extra_pass(step: TrainStep) -> None:
    """The authors' scoring pass: one more forward/backward of the step's batch."""
    squared_error(step.forward, step.batch).backward()


def _build_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, ctl: ExpansionController | None
) -> TrainStep:
    """The trainer's step (:class:`selora.train_step.TrainStep`) on the MSE: forward, backward (and the
    extra pass in that mode), ``optimizer.step()``, ``ctl.step()``, zero_grad."""
    step = TrainStep(model, optimizer, squared_error, controller=ctl)
    if mode == EXTRA_PASS:
        step.add_callback("on_backward", _extra_pass)
    return step


def scoring_costs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int = 5,
    rounds: int = 3,
    warmup: int = 2,
    modes: Sequence[str] = SCORING_MODES,
) -> dict[str, StepCost]:
    """What scoring an expansion costs, per full-batch MSE training step of ``model`` on (x, y).

    ``"plain step"``: no controller armed. ``"test step (hooks)"``: an ExpansionController scores
    every step from the step's own backward (rank cap 1: nothing grows). ``"step + extra
    fwd/bwd"``: one more forward/backward on the same batch, what a scorer that re-runs the model
    (the authors' code) pays. FLOPs: one untimed step per mode under torch's FlopCounterMode
    (forward, backward and hook products). Seconds: ``rounds x steps`` timed steps per mode
    after ``warmup``, the modes interleaved round by round so that they share the machine's noise.
    """
    unknown = [m for m in modes if m not in SCORING_MODES]
    if unknown:
        raise ValueError(f"modes: expected some of {SCORING_MODES}, got {unknown}")
    if any(getattr(m, "_capture", None) is not None for m in model.modules()):
        raise ValueError("model: a SeLoRA controller is armed on it (close() it first), so every step would be scored")
    costs = {mode: StepCost() for mode in modes}
    for round_ in range(rounds):
        for mode, cost in costs.items():
            ctl = ExpansionController(model, optimizer, interval=1, max_rank=1) if mode == TEST else None
            step = _build_step(model, optimizer, mode, ctl)
            if round_ == 0:
                with FlopCounterMode(display=False) as counter:
                    step((x, y), 0)
                cost.flops = counter.get_total_flops()
            for i in range(warmup + steps):
                start = time.perf_counter()
                step((x, y), 0)
                if i >= warmup:
                    cost.seconds.append(time.perf_counter() - start)
            if ctl is not None:
                ctl.close()
    return costs
