"""SeLoRA on PEFT models (selora/peft_lora.py): the expansion controller grows PEFT's own LoRA layers.

Tolerance: growth appends a zero column to B, so ``B A`` is mathematically unchanged, but the float32
matmul over r + 1 instead of r terms may round differently; outputs agree to ``ATOL`` (a few float32
ulps at the tiny models' output scale of ~1-10; the observed differences are ~3e-8 or exactly 0).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from helpers.stock import BLOCK_SELORA, run_stock
from helpers.tiny_models import tiny_unet
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel

import selora
from selora.core import growable
from selora.core.criteria import FIRatio
from selora.core.fisher import FISHER_STATS

ATOL = 1e-6


# ----------------------------------------------------------------------------- models and a training loop
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))


@torch.no_grad()
def plant(linear: nn.Linear, rank: int, seed: int) -> None:
    """Add a rank-``rank`` update to ``linear.weight``: the structure a rank-1 adapter cannot fit."""
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(linear.out_features, rank, generator=g), torch.randn(rank, linear.in_features, generator=g)
    linear.weight += U @ V / linear.in_features**0.5


def mlp_teacher() -> nn.Sequential:
    teacher = mlp()
    plant(teacher[0], 3, seed=1)
    return teacher


def adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def snapshot(ctl: selora.ExpansionController, opt: torch.optim.Optimizer) -> dict:
    """Per layer: rank, scaling, lora_alpha / r and the Adam moments of A and B."""
    out = {}
    for name, v in ctl.layers.items():
        moments = {p: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in (v.lora_A, v.lora_B)}
        ratio = v.module.lora_alpha[v.adapter] / v.module.r[v.adapter]
        out[name] = (v.rank, v.scaling, ratio, list(moments.values()))
    return out


def assert_growth_kept_everything(ctl, opt, before: dict, out_before, out_after) -> None:
    """Output, scaling and alpha / r unchanged; the old slice of every Adam moment kept, zeros beyond."""
    torch.testing.assert_close(out_after, out_before, atol=ATOL, rtol=0)
    for name, v in ctl.layers.items():
        rank, scaling, ratio, moments = before[name]
        assert v.scaling == scaling and v.module.lora_alpha[v.adapter] / v.module.r[v.adapter] == ratio
        assert v.module.r[v.adapter] == v.rank and v.module.lora_A[v.adapter].out_features == v.rank
        for p, old in zip((v.lora_A, v.lora_B), moments):
            for key, t in old.items():  # the old corner bit for bit, zeros for the new row / column
                new = opt.state[p][key]
                corner = new[: t.shape[0], : t.shape[1]]
                assert torch.equal(corner, t) and torch.count_nonzero(new) == torch.count_nonzero(t), (name, key)


@torch.no_grad()
def evaluate(model: nn.Module, x, forward) -> torch.Tensor:
    """The output in eval mode (no dropout), back in train mode afterwards."""
    out = forward(model.eval(), x)
    model.train()
    return out


def train(model, teacher, inputs, ctl, opt, steps: int, forward=lambda m, x: m(x)) -> int:
    """``steps`` Adam steps on the MSE to ``teacher``; checks every expansion; returns how many layers grew."""
    grown = 0
    for step in range(steps):
        x = inputs(step)
        with torch.no_grad():
            target = forward(teacher, x)
        loss = ((forward(model, x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        before, out_before = snapshot(ctl, opt), evaluate(model, x, forward)
        decisions = ctl.step()
        opt.zero_grad()
        if any(d.expanded for d in decisions):
            assert_growth_kept_everything(ctl, opt, before, out_before, evaluate(model, x, forward))
        grown += sum(d.expanded for d in decisions)
    return grown


def mlp_inputs(step: int) -> torch.Tensor:
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(100 + step))


# ----------------------------------------------------------------------------- a torch MLP
def test_mlp_grows_with_output_scaling_moments_and_patterns_kept():
    model = get_peft_model(mlp(), LoraConfig(r=1, lora_alpha=3, target_modules=["0", "2"]))
    opt = adam(model)
    ctl = selora.ExpansionController(model, opt, FIRatio(1.05), interval=3, generator=torch.Generator().manual_seed(0))
    assert set(ctl.layers) == {"base_model.model.0", "base_model.model.2"}
    assert train(model, mlp_teacher(), mlp_inputs, ctl, opt, steps=24) >= 2
    ranks = ctl.ranks()
    assert max(ranks.values()) > 1
    config = model.peft_config["default"]
    assert config.rank_pattern == {"^0": ranks["base_model.model.0"], "^2": ranks["base_model.model.2"]}
    assert config.alpha_pattern == {k: 3.0 * r for k, r in config.rank_pattern.items()}  # alpha / r = 3
    assert all(v.scaling == 3.0 for v in ctl.layers.values())
    ctl.close()  # disarmed: no hook is left on any module
    assert not any(m._forward_hooks for m in model.modules())


def test_resume_grows_a_fresh_peft_model_to_the_saved_ranks():
    def fresh():
        model = get_peft_model(mlp(), LoraConfig(r=1, lora_alpha=3, target_modules=["0", "2"]))
        opt = adam(model)
        return model, opt, selora.ExpansionController(model, opt, FIRatio(1.05), interval=3)

    model, opt, ctl = fresh()
    train(model, mlp_teacher(), mlp_inputs, ctl, opt, steps=9)
    model2, opt2, ctl2 = fresh()
    ctl2.load_state_dict(ctl.state_dict())  # before the model's and the optimizer's state, as documented
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert ctl2.ranks() == ctl.ranks() and max(ctl.ranks().values()) > 1
    assert model2.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    x = mlp_inputs(99)
    torch.testing.assert_close(evaluate(model2, x, nn.Module.__call__), evaluate(model, x, nn.Module.__call__))


def test_captured_fisher_is_the_exact_per_sample_fisher_with_dropout():
    """The armed hooks' statistics equal per-sample autograd gradients (with lora_dropout: same mask)."""
    model = get_peft_model(mlp(), LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], lora_dropout=0.5))
    nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)  # nonzero B: dA matters
    ctl = selora.ExpansionController(model, None, interval=1, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(5, 3, 8), torch.randn(5, 3, 6)  # 5 samples of 3 tokens

    torch.manual_seed(7)
    ((model(x) - y) ** 2).mean().backward()
    captured = {name: c.stats[:FISHER_STATS] for name, c in ctl.captures.items()}
    ks = {name: c.K for name, c in ctl.captures.items()}
    ctl.close()
    for name, v in ctl.layers.items():  # brute force: expand by the same K (B_new = 0), same dropout mask
        v.expand(1, K=ks[name])
    torch.manual_seed(7)
    losses = ((model(x) - y) ** 2).mean(dim=(1, 2))  # L_i
    for name, v in ctl.layers.items():
        sq_orig = sq_new = 0.0
        for loss_i in losses:
            dA, dB = torch.autograd.grad(loss_i, [v.lora_A, v.lora_B], retain_graph=True)
            sq_orig += dA[:-1].pow(2).sum() + dB[:, :-1].pow(2).sum()
            sq_new += dB[:, -1].pow(2).sum()
        assert torch.count_nonzero(dA[-1]) == 0  # B_new = 0: the new row of A has no gradient
        want = torch.stack([sq_orig, sq_new, torch.tensor(5.0)])
        torch.testing.assert_close(captured[name], want, rtol=1e-5, atol=0)


def test_decisions_are_taken_on_the_reduced_statistics():
    """Under DDP the controller's ``reduce`` (an all-reduce) sums every process's statistics before the
    decisions, for PEFT layers as for SeLoRA layers: a reduce that drops the candidates' column stops growth."""

    def decide(reduce) -> list[bool]:
        model = get_peft_model(mlp(), LoraConfig(r=1, target_modules=["0", "2"]))
        ctl = selora.ExpansionController(model, None, FIRatio(1.01), interval=1, reduce=reduce)
        x = mlp_inputs(0)
        ((model(x) - mlp_teacher()(x)) ** 2).mean().backward()
        return [d.expanded for d in ctl.step()]

    calls = []
    assert decide(lambda t: calls.append(t.shape) or t) == [True, True] and calls == [(2, FISHER_STATS)]
    assert decide(lambda t: t * torch.tensor([1.0, 0.0, 1.0])) == [False, False]


def test_the_controller_finds_layers_through_the_registered_finders(monkeypatch):
    layer = selora.SeLoRALinear(nn.Linear(4, 3))
    monkeypatch.setattr(growable, "FINDERS", [lambda model: {"found": layer}])
    assert selora.ExpansionController(nn.Linear(2, 2), None).layers == {"found": layer}
    with pytest.raises(TypeError, match="not growable layers"):  # a fixed-rank LoRALinear cannot grow
        selora.ExpansionController({"fixed": selora.LoRALinear(nn.Linear(4, 3))}, None)


def test_import_selora_registers_the_finder_without_importing_peft():
    code = "import sys, selora; assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert selora.peft_lora_layers in growable.FINDERS


# ----------------------------------------------------------------------------- refusals
class QuantizedLoraLinear(peft.tuners.lora.layer.Linear):
    """Stands in for PEFT's LoRA layers over quantized bases (their own classes, e.g. torchao's subclass)."""


def several_active(model):
    model.add_adapter("other", LoraConfig(r=1, target_modules=["0"]))
    model.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize(
    "config, change, message",
    [
        (dict(use_dora=True), None, "use_dora=True"),
        (dict(use_rslora=True), None, "use_rslora=True"),
        (dict(lora_bias=True), None, "lora_bias=True"),
        ({}, lambda m: m.merge_adapter(), "merged adapter weights"),
        ({}, several_active, "several active adapters"),
        (
            {},
            lambda m: setattr(m.base_model.model[0], "__class__", QuantizedLoraLinear),
            "layer type QuantizedLoraLinear",
        ),
    ],
)
def test_unsupported_options_are_refused_naming_module_and_option(config, change, message):
    model = get_peft_model(mlp(), LoraConfig(r=1, target_modules=["0"], **config))
    if change is not None:
        change(model)
    with pytest.raises(ValueError, match=rf"module 'base_model\.model\.0': {message}.* not supported"):
        selora.ExpansionController(model, None)


def test_conv_lora_layers_are_refused():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), LoraConfig(r=1, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"module 'base_model\.model\.0': layer type Conv2d .* not supported"):
        selora.ExpansionController(model, None)


# ----------------------------------------------------------------------------- stock loaders, no selora
STOCK_PEFT = BLOCK_SELORA + textwrap.dedent(
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import BertModel

    base, adapter, inputs, result = sys.argv[1:]
    model = PeftModel.from_pretrained(BertModel.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        out = model(input_ids=load_file(inputs)["input_ids"]).last_hidden_state
    assert not [m for m in sys.modules if m.split(".")[0] == "selora"], "selora was imported"
    save_file({"out": out.contiguous()}, result)
    """
)

STOCK_DIFFUSERS = BLOCK_SELORA + textwrap.dedent(
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    base, adapter, inputs, result = sys.argv[1:]
    unet = UNet2DConditionModel.from_pretrained(base).eval()
    unet.load_lora_adapter(adapter, weight_name="pytorch_lora_weights.safetensors", prefix=None)
    x = load_file(inputs)
    with torch.no_grad():
        out = unet(x["sample"], x["timestep"], encoder_hidden_states=x["context"]).sample
    assert not [m for m in sys.modules if m.split(".")[0] == "selora"], "selora was imported"
    save_file({"out": out.contiguous()}, result)
    """
)


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg)


def bert_inputs(step: int) -> torch.Tensor:
    return torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(200 + step))


def bert_out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


def test_transformers_model_grows_and_reloads_in_stock_peft(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    teacher = copy.deepcopy(base)
    plant(teacher.encoder.layer[0].attention.self.query, 3, seed=2)
    config = LoraConfig(r=1, lora_alpha=2, target_modules=["query", "value"], lora_dropout=0.1)
    model = get_peft_model(base, config)
    opt = adam(model)
    ctl = selora.ExpansionController(model, opt, FIRatio(1.05), interval=2, generator=torch.Generator().manual_seed(0))
    assert train(model, teacher, bert_inputs, ctl, opt, steps=12, forward=bert_out) >= 2
    model.save_pretrained(tmp_path / "adapter")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = {name.removeprefix("base_model.model."): r for name, r in ctl.ranks().items()}
    assert max(ranks.values()) > 1
    assert saved["rank_pattern"] == {"^" + n.replace(".", r"\."): r for n, r in ranks.items()}
    assert saved["alpha_pattern"] == {k: 2.0 * r for k, r in saved["rank_pattern"].items()}
    ids = bert_inputs(99)
    save_file({"input_ids": ids}, str(tmp_path / "inputs.safetensors"))
    model.eval()
    with torch.no_grad():
        want = bert_out(model, ids)
        assert (want - bert_out(teacher, ids)).abs().max() > 0
        with model.disable_adapter():
            assert (want - bert_out(model, ids)).abs().max() > 100 * ATOL  # the adapters matter
    args = [tmp_path / "base", tmp_path / "adapter", tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"]
    run_stock(tmp_path / "stock.py", STOCK_PEFT, args)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- a diffusers UNet
def unet_inputs(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "context": torch.randn(2, 5, 16, generator=g)}


def unet_out(unet: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(x["sample"], torch.tensor([10, 500]), encoder_hidden_states=x["context"]).sample


def test_diffusers_unet_grows_and_reloads_with_load_lora_adapter(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "base")
    teacher = copy.deepcopy(unet)
    for block in (teacher.down_blocks[0], teacher.up_blocks[1]):
        plant(block.attentions[0].transformer_blocks[0].attn2.to_v, 3, seed=3)
    with torch.no_grad():
        base_out = unet_out(unet, unet_inputs(99))
    unet.add_adapter(LoraConfig(r=1, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = adam(unet)
    ctl = selora.ExpansionController(unet, opt, FIRatio(1.05), interval=2, generator=torch.Generator().manual_seed(0))
    assert len(ctl.layers) == 32  # 4 targets x 2 attentions x 4 transformer blocks (down, mid, 2 up)
    assert train(unet, teacher, unet_inputs, ctl, opt, steps=8, forward=unet_out) >= 2
    assert max(ctl.ranks().values()) > 1
    assert all(v.scaling == 4.0 for v in ctl.layers.values())
    unet.save_lora_adapter(tmp_path / "lora")  # the config goes into the file's metadata

    x = unet_inputs(99) | {"timestep": torch.tensor([10, 500])}
    save_file(x, str(tmp_path / "inputs.safetensors"))
    unet.eval()
    with torch.no_grad():
        want = unet_out(unet, x)
    assert (want - base_out).abs().max() > 100 * ATOL  # the adapters matter far beyond the tolerance
    args = [tmp_path / "base", tmp_path / "lora", tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"]
    run_stock(tmp_path / "stock.py", STOCK_DIFFUSERS, args)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], want, atol=ATOL, rtol=0)


STOCK_PIPELINE = BLOCK_SELORA + textwrap.dedent(
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    base, adapter, inputs, result = sys.argv[1:]
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(adapter, weight_name="pytorch_lora_weights.safetensors")
    x = load_file(inputs)
    with torch.no_grad():
        out = pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["context"]).sample
    latents = pipe(
        "a chest radiograph", num_inference_steps=2, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert not [m for m in sys.modules if m.split(".")[0] == "selora"], "selora was imported"
    save_file({"out": out.contiguous(), "latents": latents.contiguous()}, result)
    """
)


def test_a_grown_pipeline_unet_reloads_with_the_pipelines_load_lora_weights(assets, tmp_path):
    """The route of diffusers' own LoRA training script: ``save_lora_weights`` with the UNet's PEFT
    state dict and its config as metadata, then ``pipe.load_lora_weights`` in a process without selora:
    the UNet's outputs and a two-step sampling chain's latents agree with the grown model's."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(assets["model"])
    unet = pipe.unet
    teacher = copy.deepcopy(unet)
    plant(teacher.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v, 3, seed=4)
    unet.add_adapter(LoraConfig(r=1, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = adam(unet)
    ctl = selora.ExpansionController(unet, opt, FIRatio(1.05), interval=2, generator=torch.Generator().manual_seed(0))
    assert train(unet, teacher, unet_inputs, ctl, opt, steps=8, forward=unet_out) >= 2
    assert len(set(ctl.ranks().values())) > 1  # per-module ranks: the metadata must carry them
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )

    x = unet_inputs(99) | {"timestep": torch.tensor([10, 500])}
    save_file(x, str(tmp_path / "inputs.safetensors"))
    unet.eval()
    with torch.no_grad():
        want = unet_out(unet, x)
        latents = pipe(
            "a chest radiograph",
            num_inference_steps=2,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
        unet.disable_adapters()
        assert (want - unet_out(unet, x)).abs().max() > 100 * ATOL  # the adapters matter
    args = [assets["model"], tmp_path / "lora", tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"]
    run_stock(tmp_path / "stock.py", STOCK_PIPELINE, args)
    got = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(got["out"], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got["latents"], latents, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- two processes (torchrun, gloo)
DDP_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, sys.argv[2])  # the tests folder: the same model, teacher and inputs as above
    from test_peft_lora import adam, mlp, mlp_inputs, mlp_teacher
    import selora
    from selora.core.criteria import FIRatio

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    def all_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    model, teacher = get_peft_model(mlp(), LoraConfig(r=1, target_modules=["0", "2"])), mlp_teacher()
    opt = adam(model)
    ctl = selora.ExpansionController(
        model, opt, FIRatio(1.05), interval=2, generator=torch.Generator().manual_seed(0),
        reduce=all_sum if world > 1 else None,
    )
    forward = DistributedDataParallel(model) if world > 1 else model
    grown = []
    for step in range(12):
        x = mlp_inputs(step).chunk(world)[rank]  # this process's share of the global batch of 32
        ((forward(x) - teacher(x)) ** 2).mean().backward()
        opt.step()
        decisions = ctl.step()
        opt.zero_grad()
        grown += [d.name for d in decisions if d.expanded]
        if world > 1 and any(d.expanded for d in decisions):
            forward = DistributedDataParallel(model)  # new Parameter objects: DDP must register them
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    save_file(tensors, os.path.join(sys.argv[1], f"world{world}-rank{rank}.safetensors"))
    with open(os.path.join(sys.argv[1], f"world{world}-rank{rank}.json"), "w") as fh:
        json.dump({"ranks": ctl.ranks(), "grown": grown}, fh)
    """
)


def test_two_processes_grow_a_peft_model_like_one_process(tmp_path):
    """torchrun, two gloo processes, each with half of every batch, DDP around the PEFT model and the
    controller's ``reduce`` an all-reduce: both processes take the same decisions at the same steps and
    end with the same adapters as one process on the whole batch. Weights agree to 1e-5: DDP averages
    the two halves' gradients, which rounds differently from one mean over 32 samples (observed ~1e-7)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    tests = str(Path(__file__).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")} | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(driver), str(tmp_path), tests], env=env, check=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, str(driver), str(tmp_path), tests], env=env, check=True, timeout=300)

    one = json.loads((tmp_path / "world1-rank0.json").read_text())
    assert one["grown"] and max(one["ranks"].values()) > 1
    want = load_file(str(tmp_path / "world1-rank0.safetensors"))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"world2-rank{rank}.json").read_text()) == one
        got = load_file(str(tmp_path / f"world2-rank{rank}.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- a transformers Trainer
def test_trainer_callback_grows_a_peft_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Regression(nn.Module):
        """A PEFT model returning the loss, as a Trainer expects."""

        def __init__(self) -> None:
            super().__init__()
            self.net = get_peft_model(mlp(), LoraConfig(r=1, target_modules=["0", "2"]))
            self.teacher = mlp_teacher().requires_grad_(False)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": ((self.net(x) - self.teacher(x)) ** 2).mean()}

    data = [{"x": row} for row in mlp_inputs(0).repeat(4, 1)]
    callback = selora.SeLoRACallback(criterion=FIRatio(1.0), interval=3)  # lambda = 1: every test grows
    args = TrainingArguments(
        tmp_path, max_steps=9, per_device_train_batch_size=16, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    model = Regression()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [len(d) for d in callback.decisions] == [2, 2, 2]
    assert callback.controller.ranks() == {"net.base_model.model.0": 4, "net.base_model.model.2": 4}
    assert not callback.controller.armed
