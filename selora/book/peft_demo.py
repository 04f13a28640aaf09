"""Chapter 11's small pieces: a tiny BERT built from a config (no hub), a teacher with a planted
low-rank update, its token batches, and the distillation loss a ``transformers.Trainer`` can train.

The task: a PEFT student (the base model with rank-1 LoRA adapters) learns to reproduce the last
hidden states of a teacher that is the same base model with a rank-``k`` update
``U V^T / sqrt(in)`` added to the weight of every targeted linear layer. A rank-1 adapter cannot
represent a rank-``k`` update, so the target asks for more than one rank per layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from transformers import BertConfig, BertModel

__all__ = [
    "Distillation",
    "TINY_BERT",
    "max_abs_diff",
    "plant_rank",
    "planted_teacher",
    "tiny_bert",
    "token_batch",
]

#: The tiny BERT's config: 2 layers of width 32, no dropout (a deterministic teacher and student).
TINY_BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_bert(seed: int = 0) -> BertModel:
    """A randomly initialised :data:`TINY_BERT` (torch seeded with ``seed``), in eval mode."""
    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY_BERT)).eval()


@torch.no_grad()
def plant_rank(linear: nn.Linear, rank: int, generator: torch.Generator) -> None:
    """Add the rank-``rank`` update ``U V^T / sqrt(in)`` (standard normal U, V) to ``linear.weight``."""
    U = torch.randn(linear.out_features, rank, generator=generator)
    V = torch.randn(rank, linear.in_features, generator=generator)
    linear.weight += U @ V / linear.in_features**0.5


def planted_teacher(base: nn.Module, targets: Iterable[str], rank: int, seed: int = 0) -> nn.Module:
    """A frozen copy of ``base`` with a rank-``rank`` update (:func:`plant_rank`) in every
    ``nn.Linear`` whose name ends with one of ``targets`` (e.g. ``("query", "value")``)."""
    teacher = copy.deepcopy(base).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(seed)
    ends = tuple(targets)
    planted = [m for name, m in teacher.named_modules() if isinstance(m, nn.Linear) and name.endswith(ends)]
    if not planted:
        raise ValueError(f"targets: no nn.Linear of the model ends with any of {ends}")
    for m in planted:
        plant_rank(m, rank, g)
    return teacher


def token_batch(step: int, batch: int = 16, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Token ids ``(batch, length)`` of training step ``step``: uniform over the tiny vocabulary,
    the same for the same ``(step, seed)``."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randint(0, TINY_BERT["vocab_size"], (batch, length), generator=g)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` as a float (float32 comparison on the CPU)."""
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


class Distillation(nn.Module):
    """What a ``transformers.Trainer`` trains: ``forward(input_ids)`` returns ``{"loss": MSE of the
    student's last hidden states against the frozen teacher's}``.

    Args:
        student: the PEFT model (e.g. ``get_peft_model(tiny_bert(), LoraConfig(r=1, ...))``).
        teacher: the frozen target model (:func:`planted_teacher`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher(input_ids=input_ids).last_hidden_state
        out = self.student(input_ids=input_ids).last_hidden_state
        return {"loss": nn.functional.mse_loss(out, target)}
