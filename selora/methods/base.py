"""The interface every fine-tuning method implements; the trainer and the checkpoint code call only this.

One training step, as the trainer drives it::

    adapters.before_forward(step)                   # DyLoRA: draw this step's truncation b
    loss = diffusion_loss + adapters.regulariser()  # AdaLoRA: orth_reg_weight * R(A, B); else 0
    scaler.scale(loss).backward(); scaler.unscale_(optimizer)
    if not finite: optimizer.zero_grad(); adapters.on_skip()   # SeLoRA: drop this pass's Fisher capture
    scale = scaler.get_scale(); scaler.step(optimizer); scaler.update()
    change = adapters.after_step(step, grad_scale=scale)  # SeLoRA: expansion test; AdaLoRA: update_and_allocate
    optimizer.zero_grad()

A method is a subclass of :class:`Adapters` registered in :data:`selora.methods.METHODS`. The base
class is the plain LoRA family (:class:`~selora.core.layers.LoRALinear` and subclasses): every hook is a
no-op, the adapter factors are ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union

import torch
from torch import nn

from selora.core.criteria import Reduce
from selora.core.inject import inject, replace_modules, select_linear
from selora.core.layers import LoRALinear, lora_layers


class MethodConfig(Protocol):
    """The training-config fields a method reads (:class:`selora.config.TrainConfig` has them all;
    the config imports the method registry, so the methods name only this shape)."""

    start_rank: int
    lora_rank: int
    lora_scale: float
    threshold: float
    interval: int
    max_rank: int | None
    seed: int
    criterion: str
    signal_alpha: float
    signal_window: int


#: A preset, a list of names/regexes (see :func:`selora.core.inject`), or ``{submodule: those}`` to give
#: parts of one model their own targets, e.g. ``{"unet": "paper-unet", "text_encoder": "paper-text-encoder"}``.
Targets = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]  # noqa: UP007 (run-time alias, Python 3.10)
#: ``{layer name: {factor name: parameter}}``, e.g. ``{"unet.x.to_q": {"lora_A": (r, in), "lora_B": (out, r)}}``.
Factors = dict[str, dict[str, nn.Parameter]]


@dataclass(frozen=True)
class RankChange:
    """What :meth:`Adapters.after_step` reports when ranks changed: the rank-history ``record``
    (without its step) and whether adapter parameters were replaced (a DDP wrapper must be rebuilt)."""

    record: dict[str, Any]
    new_parameters: bool = False


def _parts(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module, str | Sequence[str]]]:
    """``(prefix, submodule, its targets)`` for a plain target spec (prefix "") or a mapping."""
    if isinstance(targets, Mapping):
        return [(prefix, model.get_submodule(prefix), t) for prefix, t in targets.items()]
    return [("", model, targets)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def resolve_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules ``targets`` selects (rules of :func:`selora.core.inject`)."""
    return [_join(prefix, n) for prefix, sub, spec in _parts(model, targets) for n in select_linear(sub, spec)]


def inject_parts(
    model: nn.Module, targets: Targets, kind: str, rank: int, scale: float, generator: torch.Generator | None
) -> dict[str, LoRALinear]:
    """:func:`selora.core.inject` on every part of ``targets``; everything else frozen; qualified names."""
    model.requires_grad_(False)
    layers = {}
    for prefix, sub, spec in _parts(model, targets):
        injected = inject(sub, spec, kind=kind, rank=rank, scale=scale, generator=generator)
        layers.update({_join(prefix, n): m for n, m in injected.items()})
    return layers


class Adapters:
    """The adapters of one model and the method's hooks (the base class: LoRA, fixed rank).

    Subclasses set :attr:`name`, :attr:`rank_field` (the config field holding the rank they are
    built with) and :attr:`default_rank`, and override the hooks they need.
    """

    name: ClassVar[str] = "lora"
    kind: ClassVar[str] = "lora"  # the selora.core.inject layer kind
    rank_field: ClassVar[str] = "lora_rank"
    default_rank: ClassVar[int] = 4

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        self.model = model
        self.layers = dict(layers)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        """ValueError (naming the key) for settings of ``cfg`` this method cannot train with."""

    @classmethod
    def card_text(cls, cfg: MethodConfig, scaling: str) -> str:
        """What a model card says about this method as ``cfg`` trains it (``scaling``: the layers' s values)."""
        return f"LoRA (Hu et al. 2021) at a fixed rank {cfg.lora_rank} in every adapted layer, scaling s = {scaling}."

    @classmethod
    def from_config(
        cls, model: nn.Module, targets: Targets, cfg: MethodConfig, total_steps: int, generator: torch.Generator
    ) -> Adapters:
        """Adapt ``model`` in place as ``cfg`` says (rank from :attr:`rank_field`, scale ``lora_scale``)."""
        return cls.build(
            model,
            targets,
            rank=getattr(cfg, cls.rank_field),
            scale=cfg.lora_scale,
            total_steps=total_steps,
            generator=generator,
        )

    @classmethod
    def build(
        cls,
        model: nn.Module,
        targets: Targets,
        *,
        rank: int | None = None,
        scale: float = 1.0,
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Adapters:
        """Adapt ``model`` in place on ``targets`` (rank default :attr:`default_rank`); only adapters train.

        ``generator`` seeds the initial ``lora_A`` rows; ``total_steps`` is for methods with a schedule.
        """
        return cls(model, inject_parts(model, targets, cls.kind, rank or cls.default_rank, scale, generator))

    def attach(self, optimizer: torch.optim.Optimizer, reduce: Reduce | None = None) -> None:
        """Called once the optimizer holding the adapter parameters exists (SeLoRA: its controller)."""

    # -- the step ------------------------------------------------------------------------------
    def before_forward(self, step: int) -> None:
        """Before the training forward of optimizer step ``step`` (0-based)."""

    def regulariser(self) -> torch.Tensor:
        """The method's term added to the training loss (0-d tensor)."""
        return torch.zeros(())

    def after_step(self, step: int, grad_scale: float = 1.0) -> RankChange | None:
        """After ``optimizer.step()``, before ``zero_grad``: a :class:`RankChange` if ranks changed.

        ``grad_scale``: the loss scale of this step's backward (a ``GradScaler``'s; 1 without one).
        The parameters' ``.grad`` are already unscaled; what backward hooks saw is not.
        """
        return None

    def on_skip(self) -> None:
        """The step was skipped after its forward (non-finite loss or gradient, fp16 overflow):
        drop anything captured from it; the next forward/backward is the same step again."""

    def train_record(self, regulariser: torch.Tensor) -> dict[str, Any]:
        """Extra fields of the step's training record."""
        return {}

    def eval(self) -> None:
        """Before an evaluation of the adapted model."""

    # -- state -----------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """``{qualified layer name: rank}`` of every adapter (as grown or pruned so far)."""
        return {name: layer.rank for name, layer in lora_layers(self.model).items()}

    def factors(self) -> Factors:
        """``{layer: {factor name: parameter}}`` of every adapter, in model order."""
        return {
            name: {"lora_A": layer.lora_A, "lora_B": layer.lora_B} for name, layer in lora_layers(self.model).items()
        }

    def generators(self) -> dict[str, torch.Generator]:
        """Generators the method keeps drawing from during training (their states are checkpointed)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The method's training state beyond the adapter values (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; called before the adapter values and the optimizer are loaded."""

    def prepare_load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Make the adapters fit saved ``tensors`` before they are copied in (SeLoRA: grow ranks)."""

    def merge(self) -> int:
        """Replace every adapter layer by its merged ``nn.Linear`` (W0 + s B A); returns the count."""
        merged = {id(layer): layer.merge() for layer in lora_layers(self.model, LoRALinear).values()}
        replace_modules(self.model, merged)
        return len(merged)
