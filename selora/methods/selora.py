"""SeLoRA as a method: rank-1 :class:`~selora.core.layers.SeLoRALinear` adapters grown by ONE
:class:`~selora.core.expansion.ExpansionController` over the whole model (one step count, one K
generator, one all-reduce of the Fisher statistics across processes), so the per-sample Fisher of
Eq. 3-5 comes from the training step's own backward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from selora.core.expansion import ExpansionController
from selora.core.layers import SeLoRALinear
from selora.methods.base import Adapters, MethodConfig, RankChange, Reduce, Targets


class SeLoRAAdapters(Adapters):
    """SeLoRA (Algorithm 1): rank ``start_rank``, an expansion test every ``interval`` steps
    (``criterion``: the paper's FI-Ratio, or the signal test of :mod:`selora.core.signal` at level
    ``alpha`` over the last ``window`` steps of each interval)."""

    name: ClassVar[str] = "selora"
    kind: ClassVar[str] = "selora"
    rank_field: ClassVar[str] = "start_rank"
    default_rank: ClassVar[int] = 1

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        threshold: float = 1.1,
        interval: int = 40,
        max_rank: int | None = None,
        seed: int = 0,
        criterion: str = "fi-ratio",
        alpha: float = 0.001,
        window: int = 1,
    ) -> None:
        super().__init__(model, layers)
        self.threshold, self.interval, self.max_rank, self.seed = threshold, interval, max_rank, seed
        self.criterion, self.alpha, self.window = criterion, alpha, window
        self.controller: ExpansionController | None = None

    @classmethod
    def from_config(
        cls, model: nn.Module, targets: Targets, cfg: MethodConfig, total_steps: int, generator: torch.Generator
    ) -> SeLoRAAdapters:
        adapters = cls.build(model, targets, rank=cfg.start_rank, scale=cfg.lora_scale, generator=generator)
        adapters.threshold, adapters.interval = cfg.threshold, cfg.interval
        adapters.max_rank, adapters.seed = cfg.max_rank, cfg.seed
        adapters.criterion, adapters.alpha = cfg.criterion, cfg.signal_alpha
        adapters.window = cfg.signal_window if cfg.criterion == "signal" else 1  # the paper's test: its step only
        return adapters

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        if cfg.criterion != "signal":
            return
        if not 0 < cfg.signal_alpha < 1:
            raise ValueError(f"key 'signal_alpha': expected a probability in (0, 1), got {cfg.signal_alpha!r}")
        if cfg.signal_window > cfg.interval:
            raise ValueError(f"key 'signal_window': expected at most interval={cfg.interval}, got {cfg.signal_window}")

    def attach(self, optimizer: torch.optim.Optimizer, reduce: Reduce | None = None) -> None:
        """The controller over every SeLoRA layer; its K generator is seeded ``seed + 1``."""
        self.controller = ExpansionController(
            self.model,
            optimizer,
            threshold=self.threshold,
            interval=self.interval,
            max_rank=self.max_rank,
            generator=torch.Generator().manual_seed(self.seed + 1),
            reduce=reduce,
            criterion=self.criterion,
            alpha=self.alpha,
            window=self.window,
        )

    def after_step(self, step: int, grad_scale: float = 1.0) -> RankChange | None:
        """The controller's step: on a test step, the ranks, the layers that grew and every ratio
        (Fisher statistics of the unscaled loss: divided by ``grad_scale ** 2``); under the signal
        criterion also every layer's statistic R, effective dimension and p-value."""
        decisions = self.controller.step(grad_scale=grad_scale)
        if not decisions:
            return None
        grown = [d.name for d in decisions if d.expanded]
        record = {"ranks": self.ranks(), "expanded": grown, "ratios": {d.name: d.ratio for d in decisions}}
        if self.criterion == "signal":
            record["signal"] = {d.name: d.signal for d in decisions}
            record["signal_dof"] = {d.name: d.dof for d in decisions}
            record["p_values"] = {d.name: d.p_value for d in decisions}
        return RankChange(record, new_parameters=bool(grown))

    def on_skip(self) -> None:
        """A skipped step: the controller drops its captures; the test (same K) comes with the next pass."""
        if self.controller is not None:
            self.controller.discard()

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])

    def prepare_load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Grow every layer below its saved rank (zero rows; the copy overwrites them)."""
        for name, layer in self.layers.items():
            key = f"{name}.lora_A"
            rank = tensors[key].shape[0] if key in tensors else 0
            if isinstance(layer, SeLoRALinear) and rank > layer.rank:
                layer.expand(rank - layer.rank, K=layer.lora_A.new_zeros(rank - layer.rank, layer.in_features))
