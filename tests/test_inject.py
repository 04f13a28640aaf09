"""inject() into a tiny diffusers UNet and a tiny CLIP text model built from config (no downloads)."""

import pytest
import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from helpers.tiny_models import tiny_clip, tiny_unet, unet_forward
from torch import nn
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

import selora


def n_linear(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def authors_expected(unet: nn.Module) -> int:
    """to_q/to_k/to_v per attention, GEGLU proj per feed-forward, time_emb_proj per resnet."""
    return (
        3 * sum(isinstance(m, Attention) for m in unet.modules())
        + sum(isinstance(m, FeedForward) for m in unet.modules())
        + sum(isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None for m in unet.modules())
    )


def check_frozen_and_flowing(model, layers, out):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in layers.values() for p in (m.lora_A, m.lora_B)}
    out.pow(2).mean().backward()
    for name, m in layers.items():
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0, name
        assert m.base.weight.grad is None


@pytest.mark.parametrize("preset", ["all-linear", "paper-unet", "authors-unet"])
def test_unet_presets(preset):
    unet = tiny_unet()
    attention = [n for n, m in unet.named_modules() if isinstance(m, Attention)]
    expected = {
        "all-linear": n_linear(unet),
        "paper-unet": 4 * len(attention),  # q/k/v/out of every self- and cross-attention
        "authors-unet": authors_expected(unet),
    }[preset]
    before = unet_forward(unet).detach()
    layers = selora.inject(unet, preset)
    assert len(layers) == expected and expected > 0
    assert all(isinstance(m, selora.SeLoRALinear) and m.rank == 1 for m in layers.values())
    assert all(dict(unet.named_modules())[name] is m for name, m in layers.items())
    out = unet_forward(unet)
    torch.testing.assert_close(out, before)  # B = 0: injection does not change the model
    check_frozen_and_flowing(unet, layers, out)
    if preset == "authors-unet":
        suffixes = ("to_q", "to_k", "to_v", "ff.net.0.proj", "time_emb_proj")
        assert all(name.endswith(suffixes) for name in layers)
    elif preset == "paper-unet":
        suffixes = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
        assert {next(s for s in suffixes if name.endswith(s)) for name in layers} == set(suffixes)
    else:
        assert any(name.endswith("attn2.to_k") for name in layers) and "time_embedding.linear_1" in layers
        bases = {id(m.base) for m in layers.values()}
        assert all(id(m) in bases for m in unet.modules() if isinstance(m, nn.Linear))


def test_clip_text_encoder_preset():
    clip = tiny_clip()
    n_attn = sum(isinstance(m, CLIPAttention) for m in clip.modules())
    n_mlp = sum(isinstance(m, CLIPMLP) for m in clip.modules())
    assert n_linear(clip) == 4 * n_attn + 2 * n_mlp
    ids = torch.tensor([[0, 5, 9, 1], [0, 7, 1, 1]])
    before = clip(input_ids=ids).last_hidden_state.detach()
    layers = selora.inject(clip, "paper-text-encoder", kind="lora", rank=4, scale=2.0)
    assert len(layers) == 3 * n_attn
    assert {name.rsplit(".", 1)[-1] for name in layers} == {"q_proj", "k_proj", "v_proj"}
    assert all(type(m) is selora.LoRALinear and m.rank == 4 and m.scaling == 2.0 for m in layers.values())
    out = clip(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, before)
    check_frozen_and_flowing(clip, layers, out)


def test_target_matching_rules():
    unet = tiny_unet()
    layers = selora.inject(unet, ["attn2.to_k", r"mid_block\..*\.to_q", "time_embedding.linear_1"])
    names = list(layers)
    assert all(n.endswith("attn2.to_k") or n.startswith("mid_block.") or n == "time_embedding.linear_1" for n in names)
    assert sum(n.endswith("attn2.to_k") for n in names) == 4  # 1 down + 1 mid + 2 up transformer blocks
    assert sum(n.endswith(".to_q") for n in names) == 2  # attn1 and attn2 of the mid block


def test_matching_nothing_is_an_error_listing_names():
    with pytest.raises(ValueError, match=r"\['to_qq'\].*available names include: time_embedding.linear_1"):
        selora.inject(tiny_unet(), ["to_q", "to_qq"])
    with pytest.raises(ValueError, match="unknown preset"):
        selora.inject(tiny_unet(), "all-linears")
    with pytest.raises(ValueError, match="no nn.Linear"):
        selora.inject(nn.Sequential(nn.ReLU()), "all-linear")
    with pytest.raises(ValueError, match="kind"):
        selora.inject(tiny_unet(), "all-linear", kind="dora")


def test_shared_linear_is_wrapped_once():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    layers = selora.inject(model, "all-linear")
    assert list(layers) == ["0"] and model[0] is model[2] is layers["0"]


def test_second_injection_skips_adapted_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    first = selora.inject(model, ["0"])
    second = selora.inject(model, "all-linear", kind="lora")
    assert list(first) == ["0"] and list(second) == ["2"]
    assert type(model[0]) is selora.SeLoRALinear and type(model[0].base) is nn.Linear
    assert {id(p) for p in selora.trainable_parameters(model)} == {
        id(p) for m in (model[0], model[2]) for p in (m.lora_A, m.lora_B)
    }
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        selora.inject(model, "all-linear")


def test_replace_modules_every_name_skips_none_and_counts_slots():
    from selora.core.inject import replace_modules

    shared, other = nn.Linear(2, 2), nn.Linear(2, 2)
    inner = nn.Sequential(shared, nn.ReLU())
    model = nn.Sequential(inner, other)
    inner.alias = shared  # the same module under a second name (named_children() lists it once)
    model.register_module("empty", None)  # a None child is skipped, not an error
    assert "alias" not in dict(inner.named_children())
    new, fresh = nn.Identity(), nn.Tanh()
    assert replace_modules(model, {id(shared): new, id(fresh): nn.ReLU()}) == 2
    assert model[0][0] is new and inner.alias is new and model[1] is other and model.empty is None
    assert replace_modules(model, {}) == 0 and replace_modules(model, {id(model): nn.ReLU()}) == 0
    wrapper = nn.Sequential(other)  # a replacement may contain the module it replaces
    assert replace_modules(model, {id(other): wrapper}) == 1 and model[1] is wrapper and wrapper[0] is other
