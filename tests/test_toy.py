"""selora.book.toy: planted-rank tasks, the stacked model, the training loop, SD-1.5 layer shapes."""

import pytest
import torch

from selora.book import toy


def test_planted_delta_has_the_planted_rank_and_singular_values():
    g = torch.Generator().manual_seed(0)
    d = toy.planted_delta(20, 12, 3, generator=g, top=2.0, bottom=0.5, dtype=torch.float64)
    s = torch.linalg.svdvals(d)
    assert d.shape == (20, 12)
    assert torch.allclose(s[:3], torch.tensor([2.0, 1.25, 0.5], dtype=torch.float64), atol=1e-10)
    assert s[3:].abs().max() < 1e-10


def test_planted_delta_rejects_impossible_rank():
    with pytest.raises(ValueError, match="rank=13"):
        toy.planted_delta(20, 12, 13, generator=torch.Generator())


def test_planted_task_is_reproducible_and_exact():
    a = toy.planted_task(8, 6, 2, n=50, seed=3)
    b = toy.planted_task(8, 6, 2, n=50, seed=3)
    c = toy.planted_task(8, 6, 2, n=50, seed=4)
    assert torch.equal(a.y, b.y) and not torch.equal(a.y, c.y)
    assert not a.base.weight.requires_grad
    fitted = a.base(a.x) + a.x @ a.delta.T
    assert torch.allclose(fitted, a.y, atol=1e-5)
    assert torch.linalg.matrix_rank(a.delta) == 2


def test_planted_stack_routes_each_chunk_through_its_own_layer():
    model, x, y, deltas = toy.planted_stack([1, 3], width=5, n=7, seed=1)
    assert x.shape == (7, 10) and y.shape == (7, 10) and len(deltas) == 2
    with torch.no_grad():
        out = model(x)
        first = model.layer0(x[:, :5])
    assert torch.equal(out[:, :5], first)
    exact = torch.cat([out[:, :5] + x[:, :5] @ deltas[0].T, out[:, 5:] + x[:, 5:] @ deltas[1].T], -1)
    assert torch.allclose(exact, y, atol=1e-5)


def test_train_fits_a_full_rank_correction_and_logs_every_step():
    task = toy.planted_task(6, 4, 2, n=64, seed=0)
    correction = torch.nn.Linear(6, 4, bias=False)
    torch.nn.init.zeros_(correction.weight)

    class Model(torch.nn.Module):
        def forward(self, x):
            return task.base(x) + correction(x)

    model = Model()
    model.correction = correction
    before = toy.mse(model, task.x, task.y)
    opt = torch.optim.Adam(correction.parameters(), lr=0.05)
    seen = []
    log = toy.train(model, task.x, task.y, opt, 200, batch_size=16, on_step=lambda s, m: seen.append(s))
    assert len(log.losses) == 200 and seen == list(range(1, 201))
    assert toy.mse(model, task.x, task.y) < 1e-3 * before


def test_lora_param_count():
    assert toy.lora_param_count(320, 640, 4) == 4 * 960


def test_sd15_shapes_match_the_published_model_sizes():
    unet = toy.sd15_linear_shapes("unet")
    text = toy.sd15_linear_shapes("text-encoder")
    assert unet.total_params == 859_520_964  # SD-1.5 UNet
    assert text.total_params == 123_060_480  # CLIP ViT-L/14 text model
    names = [n for n, _, _ in unet.linears]
    assert any(n.endswith("attn2.to_k") for n in names)
    k = dict((n, (i, o)) for n, i, o in unet.linears)["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert k == (768, 320)
    with pytest.raises(ValueError, match="component='vae'"):
        toy.sd15_linear_shapes("vae")


def _tiny_selora(seed=0):
    from selora import SeLoRALinear

    torch.manual_seed(seed)
    layer = SeLoRALinear(torch.nn.Linear(5, 3).double(), rank=2)
    torch.nn.init.normal_(layer.lora_B)
    return layer


def test_score_once_matches_a_per_sample_loop_and_changes_nothing():
    layer = _tiny_selora()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    scores, K = toy.score_once(layer, x, y, generator=torch.Generator().manual_seed(0))
    naive = 0.0
    for i in range(6):
        layer.zero_grad()
        ((layer(x[i : i + 1]) - y[i : i + 1]) ** 2).mean().backward()
        naive += (layer.lora_A.grad**2).sum().item() + (layer.lora_B.grad**2).sum().item()
    d = scores[""]
    assert d.fi_orig == pytest.approx(naive / 6, rel=1e-9)
    assert d.fi_exp >= d.fi_orig and d.ratio == d.fi_exp / d.fi_orig and K[""].shape == (1, 5)
    assert layer.rank == 2 and torch.equal(layer.lora_A, A0) and torch.equal(layer.lora_B, B0)
    assert layer._capture is None


def test_planted_run_fixed_lora_keeps_ranks_and_counts_parameters():
    run = toy.planted_run([1, 2], kind="lora", rank=[1, 3], steps=80, width=8, n=64, interval=40)
    assert run.test_steps == [0, 40, 80]
    assert run.ranks == {"layer0": [1, 1, 1], "layer1": [3, 3, 3]}
    assert run.trainable == (1 + 3) * 16 and len(run.losses) == 80 and run.decisions == []


def test_planted_run_selora_grows_only_on_test_steps():
    run = toy.planted_run([3], steps=120, width=8, n=256, interval=40, threshold=1.01)
    assert [s for s, _ in run.decisions] == [40, 80, 120]
    ranks = run.ranks["layer0"]
    assert ranks[0] == 1 and ranks[-1] > 1
    assert all(b - a in (0, 1) for a, b in zip(ranks, ranks[1:]))
    with pytest.raises(ValueError, match="kind='dora'"):
        toy.planted_run([1], kind="dora")
    with pytest.raises(ValueError, match="expected 2 ranks, got 1"):
        toy.planted_run([1, 2], kind="lora", rank=[1])


def test_rms_matched_rows_scales_K_to_the_average_row_of_A():
    layer = _tiny_selora()
    with torch.no_grad():
        layer.lora_A.mul_(0.01)
    K = toy.rms_matched_rows(layer)(3, 5, torch.Generator().manual_seed(0))
    rms = (layer.lora_A.detach().float().norm() / 2**0.5).item()
    assert K.shape == (3, 5)
    assert torch.allclose(K.norm(dim=1), torch.full((3,), rms), rtol=1e-5)
