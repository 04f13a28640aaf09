"""AdaLoRA 6 -> 4 via PEFT: explicit orthogonality regulariser, budget allocation each step, counts."""

from types import SimpleNamespace

import pytest
import torch
from helpers.tiny_models import tiny_clip, tiny_unet, unet_forward
from torch import nn

from selora.methods import (
    METHODS,
    adalora_config,
    adalora_ranks,
    inject_adalora,
    orthogonal_regulariser,
    resolve_targets,
)
from selora.params import count_parameters


class WithLoss(nn.Module):
    """A model whose output has ``.loss`` — the only case where PEFT adds the regulariser itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))

    def forward(self, x, y):
        return SimpleNamespace(loss=(self.net(x) - y).pow(2).mean())


def toy(total_step=50, weight=0.5, targets=("net.0", "net.2", "net.4")):
    model = WithLoss()
    tuner = inject_adalora(model, adalora_config(list(targets), total_step, orth_reg_weight=weight))
    return model, tuner


def test_regulariser_equals_what_peft_adds_for_models_with_a_loss():
    model, tuner = toy(weight=0.3)
    with torch.no_grad():  # move away from init so R is not a constant sqrt(r)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    plain = model(x, y).loss
    with_peft = tuner(x, y).loss  # PEFT's forward adds orth_reg_weight * R
    assert (with_peft - plain).item() == pytest.approx(0.3 * float(orthogonal_regulariser(model)), rel=1e-5)


def test_regulariser_changes_the_loss_and_its_gradient():
    model, _ = toy()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = model(x, y).loss
    g_plain = torch.autograd.grad(plain, params, allow_unused=True, retain_graph=True)
    reg = 0.5 * orthogonal_regulariser(model)
    g_reg = torch.autograd.grad(plain + reg, params, allow_unused=True)
    assert reg.item() > 0
    changed = [
        not torch.equal(a if a is not None else torch.zeros_like(p), b) for a, b, p in zip(g_plain, g_reg, params)
    ]
    assert sum(changed) >= 6, "R(A, B) must put gradient on every A and B matrix"


def test_regulariser_is_zero_for_orthonormal_factors():
    model, _ = toy(targets=("net.0", "net.2"))  # in, out >= r = 6, so orthonormal factors exist
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.linalg.qr(torch.randn(p.shape[1], p.shape[0]))[0].T)  # orthonormal rows
            elif "lora_B" in n:
                p.copy_(torch.linalg.qr(torch.randn(p.shape[0], p.shape[1]))[0])  # orthonormal columns
    assert orthogonal_regulariser(model).item() == pytest.approx(0.0, abs=1e-5)


def test_budget_falls_from_6_to_4_per_layer_with_update_and_allocate_each_step():
    unet = tiny_unet()
    total = 30
    adapters = METHODS["adalora"].build(unet, "authors-unet", total_steps=total)
    n = len(adapters.layers)
    assert set(adalora_ranks(unet).values()) == {0}  # E starts at zero: the output is the base model's
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    live = []
    for step in range(total):
        adapters.before_forward(step)
        loss = unet_forward(unet).pow(2).mean() + adapters.regulariser()
        loss.backward()
        opt.step()
        adapters.after_step(step)
        opt.zero_grad()
        live.append(sum(adalora_ranks(unet).values()))
    ranks = adalora_ranks(unet)
    assert sum(ranks.values()) == 4 * n, f"final budget must be target_r x layers = {4 * n}"
    assert max(ranks.values()) <= 6 and len(set(ranks.values())) > 1, "AdaLoRA reallocates rank between layers"
    assert live[total // 10 - 1] == 6 * n, "warm-up keeps the full initial budget"


def test_parameter_counts_for_every_method_on_the_same_targets():
    counts = {}
    for method in ("lora", "dylora", "adalora", "selora"):
        unet = tiny_unet()
        base = sum(p.numel() for p in unet.parameters())
        names = resolve_targets(unet, "authors-unet")
        dims = [(unet.get_submodule(n).in_features, unet.get_submodule(n).out_features) for n in names]
        METHODS[method].build(unet, "authors-unet", total_steps=10)
        counts[method] = c = count_parameters(unet)
        assert c.base == base
        assert c.fraction == pytest.approx(c.trainable / base)
        per_layer = {
            "lora": lambda i, o: 4 * (i + o),
            "dylora": lambda i, o: 4 * (i + o),
            "adalora": lambda i, o: 6 * (i + o + 1),
            "selora": lambda i, o: i + o,
        }[method]
        assert c.trainable == sum(per_layer(i, o) for i, o in dims), method
    assert counts["selora"].trainable < counts["lora"].trainable < counts["adalora"].trainable
    assert "trainable" in str(counts["lora"]) and "%" in str(counts["lora"])


def test_adalora_on_a_clip_text_encoder_keeps_only_adapters_trainable():
    clip = tiny_clip()
    adapters = METHODS["adalora"].build(clip, "paper-text-encoder", total_steps=10)
    trainable = [n for n, p in clip.named_parameters() if p.requires_grad]
    assert trainable and all(k in n for n in trainable for k in ("default",))
    expected = [n for n, m in tiny_clip().named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert sorted(adapters.layers) == sorted(expected)  # the paper's text-encoder targets: attention q/k/v
    out = clip(input_ids=torch.tensor([[0, 5, 7, 1]])).last_hidden_state
    (out.pow(2).mean() + adapters.regulariser()).backward()
    assert all(p.grad is not None for n, p in clip.named_parameters() if "lora_A" in n)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="total_steps: AdaLoRA's rank budget schedule needs"):
        METHODS["adalora"].build(tiny_unet(), "authors-unet")
    with pytest.raises(ValueError, match="tinit=5 \\+ tfinal=5: expected fewer than total_step=10"):
        adalora_config(["x"], 10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="matched no nn.Linear module"):
        resolve_targets(tiny_unet(), ["no_such_layer"])


class UNetAndTextEncoder(nn.Module):
    """Like the trainer's DiffusionModel: one module holding both adapted models."""

    def __init__(self):
        super().__init__()
        self.unet, self.text_encoder = tiny_unet(), tiny_clip()

    def forward(self, ids):
        ctx = self.text_encoder(input_ids=ids).last_hidden_state
        x = torch.randn(ids.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(1))
        return self.unet(x, torch.tensor([10] * ids.shape[0]), encoder_hidden_states=ctx).sample


TARGETS = {"unet": "authors-unet", "text_encoder": "paper-text-encoder"}


@pytest.mark.parametrize("method", ["lora", "dylora", "adalora", "selora"])
def test_one_call_adapts_unet_and_text_encoder_together(method):
    model = UNetAndTextEncoder()
    expected = resolve_targets(model, TARGETS)
    assert any(n.startswith("unet.") for n in expected) and any(n.startswith("text_encoder.") for n in expected)
    adapters = METHODS[method].build(model, TARGETS, total_steps=10, generator=torch.Generator().manual_seed(0))
    assert sorted(adapters.layers) == sorted(expected)
    adapters.before_forward(0)
    if method == "dylora":
        assert len({m.truncation for m in adapters.layers.values()}) == 1, "one b for UNet and text encoder"
    loss = model(torch.tensor([[0, 5, 7, 1]])).pow(2).mean() + adapters.regulariser()
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:3]
    assert any(
        p.grad is not None for n, p in model.named_parameters() if n.startswith("text_encoder.") and "lora_" in n
    )
    if method == "adalora":
        adapters.after_step(0)
        assert len(adalora_ranks(model)) == len(expected), "one AdaLoRA budget over both models"
