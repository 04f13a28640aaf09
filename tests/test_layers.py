"""LoRALinear / SeLoRALinear: layout, forward, merge, expansion (Eq. 1-2)."""

import math

import pytest
import torch
from torch import nn

import selora
from selora.core.layers import kaiming_rows


def test_lora_layout_and_forward():
    base = nn.Linear(7, 5)
    layer = selora.LoRALinear(base, rank=3, scale=0.5, generator=torch.Generator().manual_seed(0))
    assert layer.base is base and not any(p.requires_grad for p in base.parameters())
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (5, 3)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.rank == 3 and layer.scaling == 0.5
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 7)
    expected = base(x) + 0.5 * (x @ layer.lora_A.T) @ layer.lora_B.T  # Eq. 1, PEFT layout
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merge()(x), layer(x))
    assert not any(p.requires_grad for p in layer.merge().parameters())


def test_initial_rows_use_kaiming_bound():
    layer = selora.SeLoRALinear(nn.Linear(50, 3), rank=8)
    bound = math.sqrt(6 / 50)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std() > 0.4 * bound  # U(-b, b) has std b / sqrt(3) ~ 0.58 b


def test_custom_init_is_used_for_rows_and_expansion():
    ones = lambda rows, d, gen: torch.ones(rows, d)  # noqa: E731
    layer = selora.SeLoRALinear(nn.Linear(4, 3), rank=2, init=ones)
    assert torch.equal(layer.lora_A, torch.ones(2, 4))
    assert torch.equal(layer.expand(1), torch.ones(1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_expansion_keeps_output(dtype, shape):
    torch.manual_seed(0)
    layer = selora.SeLoRALinear(nn.Linear(6, 4), rank=2).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(shape, dtype=dtype)
    before = layer(x).detach()
    old_A, old_B = layer.lora_A, layer.lora_B
    K = layer.expand(2, generator=torch.Generator().manual_seed(1))
    after = layer(x).detach()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)
    assert layer.rank == 4 and layer.scaling == 1.0
    assert layer.lora_A is not old_A and layer.lora_B is not old_B  # new Parameter objects
    assert layer.lora_A.dtype == dtype and layer.lora_A.requires_grad
    assert torch.equal(layer.lora_A[:2], old_A) and torch.equal(layer.lora_A[2:], K)
    assert torch.equal(layer.lora_B[:, :2], old_B)
    assert torch.count_nonzero(layer.lora_B[:, 2:]) == 0  # new B exactly zero


def test_K_within_bound_and_not_degenerate():
    layer = selora.SeLoRALinear(nn.Linear(200, 3))
    K = layer.expand(3, generator=torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / 200)
    assert K.shape == (3, 200) and K.abs().max() <= bound
    assert K.std() > 0.4 * bound and torch.linalg.matrix_rank(K) == 3
    assert (K > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_expand_with_given_K_and_bad_K():
    layer = selora.SeLoRALinear(nn.Linear(4, 3))
    K = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(layer.expand(2, K=K), K)
    with pytest.raises(ValueError, match="K: expected shape"):
        layer.expand(1, K=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="K: expected shape"):
        layer.expand(1, K=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="k: expected"):
        layer.expand(0)
    with pytest.raises(ValueError, match="rank"):
        selora.LoRALinear(nn.Linear(4, 3), rank=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        selora.LoRALinear(nn.Conv1d(4, 3, 1))


def test_step_after_expansion_moves_new_B_columns():
    torch.manual_seed(0)
    layer = selora.SeLoRALinear(nn.Linear(6, 4))
    layer.expand(1)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    ((layer(x) - y) ** 2).mean().backward()
    assert layer.lora_B.grad[:, 1].abs().sum() > 0  # K != 0 feeds the new column at once
    opt.step()
    assert torch.count_nonzero(layer.lora_B[:, 1]) == 4


def test_zero_init_blocks_gradients():
    """With K = 0 and B_new = 0 neither new part ever receives gradient (the paper's reason for K)."""
    torch.manual_seed(0)
    layer = selora.SeLoRALinear(nn.Linear(6, 4), rank=1)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.expand(1, K=torch.zeros(1, 6))
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.05)
    for _ in range(20):
        x, y = torch.randn(8, 6), torch.randn(8, 4)
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        assert torch.count_nonzero(layer.lora_A.grad[1]) == 0
        assert torch.count_nonzero(layer.lora_B.grad[:, 1]) == 0
        assert torch.count_nonzero(layer.lora_A.grad[0]) > 0  # the old rank does learn
        opt.step()
    assert torch.count_nonzero(layer.lora_A[1]) == 0 and torch.count_nonzero(layer.lora_B[:, 1]) == 0


def test_stale_graph_does_not_leak_into_new_parameters():
    layer = selora.SeLoRALinear(nn.Linear(3, 2))
    loss = layer(torch.randn(4, 3)).sum()
    old_B = layer.lora_B
    layer.expand(1)
    loss.backward()  # the graph was built with the old parameters
    assert old_B.grad is not None and old_B.grad.shape == (2, 1)
    assert layer.lora_B.grad is None


def test_kaiming_rows_seeded():
    a = kaiming_rows(2, 9, torch.Generator().manual_seed(5))
    b = kaiming_rows(2, 9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, kaiming_rows(2, 9, torch.Generator().manual_seed(6)))


def test_ranks_and_trainable_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    layers = selora.inject(model, "all-linear", kind="lora", rank=3)
    assert selora.ranks(model) == {"0": 3, "2": 3}
    params = selora.trainable_parameters(model)
    assert {id(p) for p in params} == {id(p) for m in layers.values() for p in (m.lora_A, m.lora_B)}
    assert selora.num_trainable(model) == 3 * (4 + 8) + 3 * (8 + 2)
