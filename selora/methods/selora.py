"""SeLoRA as a method: rank-1 :class:`~selora.core.layers.SeLoRALinear` adapters grown by ONE
:class:`~selora.core.expansion.ExpansionController` over the whole model (one step count, one K
generator, one all-reduce of the Fisher statistics across processes), so the per-sample Fisher of
Eq. 3-5 comes from the training step's own backward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from selora.core.criteria import Criterion, criterion_from_config
from selora.core.expansion import INTERVAL, ExpansionController, score_fields
from selora.core.layers import SeLoRALinear
from selora.methods.base import Adapters, MethodConfig, RankChange, Reduce, Targets, inject_parts


class SeLoRAAdapters(Adapters):
    """SeLoRA (Algorithm 1): rank ``start_rank``, an expansion test every ``interval`` steps by
    ``criterion`` (:mod:`selora.core.criteria`; default the paper's FI-Ratio), ranks capped at
    ``max_rank``, K drawn from a generator seeded ``seed + 1``."""

    name: ClassVar[str] = "selora"
    kind: ClassVar[str] = "selora"
    rank_field: ClassVar[str] = "start_rank"
    default_rank: ClassVar[int] = 1

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        criterion: Criterion | None = None,
        *,
        interval: int = INTERVAL,
        max_rank: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, layers)
        self.criterion, self.interval, self.max_rank, self.seed = criterion, interval, max_rank, seed
        self.controller: ExpansionController | None = None

    @classmethod
    def from_config(
        cls, model: nn.Module, targets: Targets, cfg: MethodConfig, total_steps: int, generator: torch.Generator
    ) -> SeLoRAAdapters:
        layers = inject_parts(model, targets, cls.kind, cfg.start_rank, cfg.lora_scale, generator)
        criterion = criterion_from_config(cfg)
        return cls(model, layers, criterion, interval=cfg.interval, max_rank=cfg.max_rank, seed=cfg.seed)

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        criterion_from_config(cfg)

    @classmethod
    def card_text(cls, cfg: MethodConfig, scaling: str) -> str:
        cap = cfg.max_rank if cfg.max_rank is not None else "min(in, out)"
        return (
            f"SeLoRA (self-expanding LoRA, Mao et al. 2024): every adapted layer starts at rank {cfg.start_rank} and "
            f"grows by one rank when {criterion_from_config(cfg).describe()} (tested every {cfg.interval} optimizer "
            f"steps, rank cap {cap}); the scaling s = {scaling} stays fixed while ranks grow, so layers end at "
            "different ranks."
        )

    def attach(self, optimizer: torch.optim.Optimizer, reduce: Reduce | None = None) -> None:
        """The controller over every SeLoRA layer; its K generator is seeded ``seed + 1``."""
        self.controller = ExpansionController(
            self.model,
            optimizer,
            self.criterion,
            interval=self.interval,
            max_rank=self.max_rank,
            generator=torch.Generator().manual_seed(self.seed + 1),
            reduce=reduce,
        )

    def after_step(self, step: int, grad_scale: float = 1.0) -> RankChange | None:
        """The controller's step: on a test step, the ranks, the layers that grew and each layer's
        score fields (:meth:`selora.core.criteria.Score.record`: ``ratios`` of the Fisher statistics of
        the unscaled loss, divided by ``grad_scale ** 2``; the signal test adds ``signal``,
        ``signal_dof`` and ``p_values``)."""
        decisions = self.controller.step(grad_scale=grad_scale)
        if not decisions:
            return None
        grown = [d.name for d in decisions if d.expanded]
        record = {"ranks": self.ranks(), "expanded": grown, **score_fields(decisions)}
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
