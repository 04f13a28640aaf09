"""Chapter 11's helpers (selora/book/peft_demo.py): the tiny BERT, the planted teacher, the batches and
the Trainer's distillation loss."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from selora.book import peft_demo


def test_tiny_bert_is_reproducible_and_small():
    a, b = peft_demo.tiny_bert(0), peft_demo.tiny_bert(0)
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 2
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(
        torch.equal(p, q) for p, q in zip(a.parameters(), peft_demo.tiny_bert(1).parameters()) if p.dim() == 2
    )


def test_plant_rank_adds_an_update_of_exactly_that_rank():
    linear = nn.Linear(12, 10)
    before = linear.weight.detach().clone()
    peft_demo.plant_rank(linear, 3, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(linear.weight.detach() - before).item() == 3


def test_planted_teacher_changes_only_the_targets_and_leaves_the_base_alone():
    base = peft_demo.tiny_bert(0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    teacher = peft_demo.planted_teacher(base, ["query", "value"], rank=2, seed=1)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())  # base untouched
    changed = {k for k, v in teacher.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {f"encoder.layer.{i}.attention.self.{n}.weight" for i in (0, 1) for n in ("query", "value")}
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="no nn.Linear"):
        peft_demo.planted_teacher(base, ["nothing"], rank=2)


def test_token_batches_are_fixed_per_step_and_inside_the_vocabulary():
    ids = peft_demo.token_batch(3, batch=5, length=7)
    assert ids.shape == (5, 7) and 0 <= ids.min() and ids.max() < peft_demo.TINY_BERT["vocab_size"]
    assert torch.equal(ids, peft_demo.token_batch(3, batch=5, length=7))
    assert not torch.equal(ids, peft_demo.token_batch(4, batch=5, length=7))


def test_max_abs_diff():
    assert peft_demo.max_abs_diff(torch.zeros(3), torch.tensor([0.0, -2.0, 1.0])) == 2.0


def test_distillation_loss_is_zero_for_the_teacher_itself_and_trains_the_adapters():
    base = peft_demo.tiny_bert(0)
    teacher = peft_demo.planted_teacher(base, ["query"], rank=2, seed=1)
    ids = peft_demo.token_batch(0)
    same = peft_demo.Distillation(peft_demo.planted_teacher(base, ["query"], rank=2, seed=1), teacher)
    assert same(input_ids=ids)["loss"].item() == 0.0
    student = get_peft_model(base, LoraConfig(r=1, target_modules=["query"]))
    loss = peft_demo.Distillation(student, teacher)(input_ids=ids)["loss"]
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for n, p in student.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
