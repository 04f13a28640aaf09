"""selora.params: the one way parameters are counted — trainable vs frozen base, per component by
name prefix — on small modules and on the shipped mini SD with real adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selora.core.inject import inject
from selora.core.layers import lora_layers, num_trainable
from selora.models import load_pipeline
from selora.params import ParameterCount, adapter_counts, count_parameters, per_component, trainable_counts

PARTS = ("a", "b")  # components of the small two-part model below


def two_part_model(rank: int = 2) -> nn.Module:
    """``a``: Linear(6 -> 8) + Linear(8 -> 8), ``b``: Linear(8 -> 3); LoRA of ``rank`` on every linear layer."""
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8)), "b": nn.Sequential(nn.Linear(8, 3))})
    model.requires_grad_(False)
    for part in PARTS:
        inject(model[part], "all-linear", kind="lora", rank=rank, generator=torch.Generator().manual_seed(0))
    return model


def test_count_parameters_splits_trainable_from_the_frozen_base():
    model = two_part_model(rank=2)
    base = (6 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    assert count_parameters(model) == ParameterCount(trainable=2 * ((6 + 8) + (8 + 8) + (8 + 3)), base=base)
    assert count_parameters(model).trainable == num_trainable(model)
    assert count_parameters(model).fraction == pytest.approx(2 * 41 / base)
    assert str(ParameterCount(1234, 100_000)) == "1,234 trainable / 100,000 base (1.234 %)"
    assert str(ParameterCount(0, 0)).endswith("(nan %)")


def test_per_component_groups_by_name_prefix_and_rejects_strangers():
    sizes = [("a.x", 3), ("b.y", 4), ("a.z", 5)]
    assert per_component(sizes, PARTS) == {"a": 8, "b": 4, "total": 12}
    assert per_component([], PARTS) == {"a": 0, "b": 0, "total": 0}
    with pytest.raises(ValueError, match=r"'ab.x': expected a name starting with one of \('a', 'b'\)"):
        per_component([("ab.x", 1)], PARTS)  # a prefix is a whole first part, not a string prefix


def test_trainable_and_adapter_counts_on_a_small_model():
    model = two_part_model(rank=2)
    counts = trainable_counts(model, lora_rank=3, components=PARTS)
    assert counts == {
        "a": {"selora": 2 * 30, "lora": 3 * 30},
        "b": {"selora": 2 * 11, "lora": 3 * 11},
        "total": {"selora": 2 * 41, "lora": 3 * 41},
    }
    tensors = {
        f"{name}.{key}": p
        for name, layer in lora_layers(model).items()
        for key, p in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
    }
    got = adapter_counts(tensors, model, components=PARTS)
    for part in PARTS:
        c = count_parameters(model[part])
        assert got[part] == {"trainable": c.trainable, "base": c.base, "fraction": c.trainable / c.base}
    assert got["total"] == {
        "trainable": 82,
        "base": count_parameters(model).base,
        "fraction": 82 / count_parameters(model).base,
    }
    with pytest.raises(ValueError, match="no LoRA/SeLoRA layers"):
        trainable_counts(nn.Linear(2, 2), components=PARTS)


def test_trainable_counts_agree_with_the_models_parameters(mini_model):
    counts = trainable_counts(mini_model, lora_rank=4)
    assert counts["total"]["selora"] == num_trainable(mini_model)  # rank 1 everywhere at the start
    assert counts["total"]["lora"] == 4 * counts["total"]["selora"]
    for key in ("selora", "lora"):
        assert counts["unet"][key] + counts["text_encoder"][key] == counts["total"][key]
        assert counts["unet"][key] > 0 and counts["text_encoder"][key] > 0
    # grow one layer by two ranks: SeLoRA's count follows, LoRA's does not move
    layer = next(iter(lora_layers(mini_model).values()))
    layer.expand(2, generator=torch.Generator().manual_seed(0))
    grown = trainable_counts(mini_model, lora_rank=4)
    assert grown["total"]["selora"] == num_trainable(mini_model)
    assert grown["total"]["selora"] - counts["total"]["selora"] == 2 * (layer.in_features + layer.out_features)
    assert grown["total"]["lora"] == counts["total"]["lora"]
    # and LoRA's count is what a real rank-4 LoRA injection trains
    pipe = load_pipeline("mini-sd", device="cpu")
    inject(pipe.unet, "all-linear", kind="lora", rank=4)  # the targets of the mini_model fixture
    assert num_trainable(pipe.unet) == counts["unet"]["lora"]
