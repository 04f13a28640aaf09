"""DyLoRA: truncation b uses exactly the first b components, and only they receive gradient."""

import pytest
import torch
from torch import nn

import selora
from selora.methods import METHODS, DyLoRALinear, sample_truncation, set_truncation
from selora.params import count_parameters


def layer(rank=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    base = nn.Linear(6, 5).to(dtype)
    m = DyLoRALinear(base, rank=rank, scale=0.5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.lora_B.normal_()  # trained-looking B so every component matters
    return m


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_truncation_b_computes_the_first_b_components_with_alpha_over_b(b):
    m = layer()
    m.truncation = b
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    A, B = m.lora_A[:b], m.lora_B[:, :b]
    want = m.base(x) + m.scaling * (m.rank / b) * x @ A.T @ B.T  # DyLoRA: alpha / b with alpha / r = scaling
    assert torch.allclose(m(x), want, atol=1e-12)


@pytest.mark.parametrize("b", [1, 2, 3])
def test_components_beyond_b_do_not_change_the_output(b):
    m = layer()
    m.truncation = b
    x = torch.randn(4, 6, dtype=torch.float64)
    before = m(x)
    with torch.no_grad():
        m.lora_A[b:] += 10.0
        m.lora_B[:, b:] -= 10.0
    assert torch.equal(m(x), before)
    with torch.no_grad():
        m.lora_A[b - 1] += 1.0  # ... while the b-th one does
    assert not torch.allclose(m(x), before)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_gradients_reach_only_the_first_b_components(b):
    m = layer()
    m.truncation = b
    m(torch.randn(8, 6, dtype=torch.float64)).pow(2).sum().backward()
    gA, gB = m.lora_A.grad, m.lora_B.grad
    assert gA[:b].abs().sum(1).min() > 0 and gB[:, :b].abs().sum(0).min() > 0
    assert torch.count_nonzero(gA[b:]) == 0 and torch.count_nonzero(gB[:, b:]) == 0
    assert m.base.weight.grad is None


def test_full_truncation_equals_the_package_lora_layer():
    m = layer()
    lora = selora.LoRALinear(m.base, rank=4, scale=0.5)
    with torch.no_grad():
        lora.lora_A.copy_(m.lora_A)
        lora.lora_B.copy_(m.lora_B)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(m(x), lora(x), atol=1e-12)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))


def test_sampling_covers_1_to_r_uniformly_and_is_seeded():
    model = mlp()
    adapters = METHODS["dylora"].build(model, "all-linear", rank=4, generator=torch.Generator().manual_seed(0))
    draws = [sample_truncation(model, torch.Generator().manual_seed(s)) for s in range(400)]
    counts = torch.bincount(torch.tensor(draws), minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 70, counts  # 100 expected each
    assert [sample_truncation(model, torch.Generator().manual_seed(7)) for _ in range(2)] == [draws[7]] * 2
    adapters.before_forward(0)
    bs = {layer.truncation for layer in adapters.layers.values()}
    assert len(bs) == 1 and 1 <= bs.pop() <= 4, "one b per step for the whole model"


def test_training_loop_hook_and_evaluation_truncation():
    model = mlp()
    adapters = METHODS["dylora"].build(model, "all-linear", generator=torch.Generator().manual_seed(0))
    assert all(isinstance(m, DyLoRALinear) and m.rank == 4 for m in adapters.layers.values())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for m in adapters.layers.values() for p in (m.lora_A, m.lora_B)
    }
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    used = []
    for step in range(12):
        adapters.before_forward(step)
        used.append(next(iter(adapters.layers.values())).truncation)
        loss = (model(x) - y).pow(2).mean() + adapters.regulariser()
        loss.backward()
        opt.step()
        adapters.after_step(step)
        opt.zero_grad()
    assert len(set(used)) > 1
    set_truncation(model)  # evaluate at full rank
    assert all(m.truncation == 4 for m in adapters.layers.values())
    set_truncation(model, 2)
    assert all(m.truncation == 2 for m in adapters.layers.values())
    with pytest.raises(ValueError, match="b=5: expected 1 <= b <= rank 4"):
        set_truncation(model, 5)
    assert count_parameters(model).trainable == 4 * ((6 + 8) + (8 + 8) + (8 + 3))


def test_sample_truncation_without_dylora_layers_is_an_error():
    with pytest.raises(ValueError, match="no DyLoRALinear layers"):
        sample_truncation(mlp())


@pytest.mark.parametrize("b", [1, 3, 4])
def test_merge_folds_in_the_active_truncation(b):
    m = layer()
    m.truncation = b
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(m.merge()(x), m(x), atol=1e-12)
