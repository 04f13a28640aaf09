"""Export: SeLoRA adapters with mixed ranks load into STOCK diffusers / PEFT with the same outputs.

A tiny Stable Diffusion pipeline (random weights, cross-attention UNet with linear projections,
2-layer CLIP text encoder, character-level CLIP tokenizer) gets SeLoRA adapters in every linear
layer of the UNet and the text encoder with a scaling s = 0.5 (so a file without per-module alphas
would be rescaled on load), a short training run with the expansion controller, a few extra
expansions so that ranks are mixed, and random B. The exports are then loaded in a subprocess in
which ``import selora`` fails, and compared with the selora model on fixed inputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import textwrap
from pathlib import Path

import diffusers
import peft
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from helpers.stock import BLOCK_SELORA, run_stock
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

import selora
from selora.core.criteria import FIRatio
from selora.core.layers import LoRALinear, SeLoRALinear, lora_layers
from selora.export import (
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHT_NAME,
    FORMATS,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    load_selora,
    main,
    merge_into,
    read_export,
    save_diffusers_lora,
    save_merged,
    save_peft_adapter,
)
from selora.kohya import kohya_name, save_kohya_lora
from selora.tokenizer import BOS, EOS, bytes_to_unicode

SCALE = 0.5
ATOL, RTOL = 2e-5, 1e-4  # float32, different association order of s, A and B than selora's
PROMPTS = ["a round shadow on the left", "clear lungs"]


# ----------------------------------------------------------------------------- the tiny pipeline
def tiny_pipeline(folder: Path, cross_attention_dim: int = 32) -> StableDiffusionPipeline:
    """A random tiny SD pipeline with a character-level CLIP tokenizer, built from configs only."""
    torch.manual_seed(0)
    symbols = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(symbols + [s + "</w>" for s in symbols] + [BOS, EOS])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=24)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=cross_attention_dim,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=24,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixed_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([17, 640]),
        "context": torch.randn(2, 9, 32, generator=g),
        "input_ids": torch.randint(0, 514, (2, 11), generator=g),
    }


@torch.no_grad()
def outputs(
    unet: torch.nn.Module, text_encoder: torch.nn.Module, x: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {
        "unet": unet(x["sample"], x["timestep"], x["context"]).sample,
        "text_encoder": text_encoder(x["input_ids"]).last_hidden_state,
    }


def image(pipe: StableDiffusionPipeline) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    out = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, height=16, width=16, generator=g, output_type="pt")
    return out.images


def short_selora_run(pipe: StableDiffusionPipeline) -> None:
    """SeLoRA in every linear layer of UNet + text encoder, 8 AdamW steps with the controller, then
    a few deterministic extra expansions (mixed ranks guaranteed) and random B (outputs move)."""
    adapters = {}
    for comp in ("unet", "text_encoder"):
        injected = selora.inject(getattr(pipe, comp), "all-linear", scale=SCALE)
        adapters.update({f"{comp}.{n}": m for n, m in injected.items()})
    opt = torch.optim.AdamW(
        selora.trainable_parameters(pipe.unet) + selora.trainable_parameters(pipe.text_encoder), lr=1e-2
    )
    ctl = selora.ExpansionController(
        adapters, opt, FIRatio(1.05), interval=4, generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(5)
    grown = 0
    for _ in range(8):
        ids = torch.randint(0, 514, (4, 10), generator=g)
        latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        pred = pipe.unet(latents, t, pipe.text_encoder(ids).last_hidden_state).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        grown += sum(d.expanded for d in ctl.step())
        opt.zero_grad()
    ctl.close()
    assert grown > 0, "the short run expanded no layer"
    with torch.no_grad():
        for i, layer in enumerate(adapters.values()):
            if i % 3:
                layer.expand(i % 3, generator=g)
            layer.lora_B.normal_(0.0, 0.3, generator=g)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, selora pipeline, fixed inputs, selora outputs, export root)."""
    root = tmp_path_factory.mktemp("export")
    pipe = tiny_pipeline(root / "tokenizer-src")
    pipe.save_pretrained(root / "base", safe_serialization=True)
    x = fixed_inputs()
    base_out = outputs(pipe.unet, pipe.text_encoder, x)
    short_selora_run(pipe)
    ref = outputs(pipe.unet, pipe.text_encoder, x)
    ref["image"] = image(pipe)
    for k in ("unet", "text_encoder"):  # the adapters must matter far beyond the tolerance
        assert (ref[k] - base_out[k]).abs().max() > 100 * ATOL, f"adapters barely change the {k} output"
    save_file(x, str(root / "inputs.safetensors"))
    return root, pipe, x, ref


# ----------------------------------------------------------------------------- stock loaders, no selora
STOCK = BLOCK_SELORA + textwrap.dedent(
    r"""
    try:
        import selora  # noqa: F401
        raise SystemExit("selora is importable in the stock process")
    except ModuleNotFoundError:
        pass

    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    base, diffusers_export, peft_export, inputs, result = sys.argv[1:]
    x = load_file(inputs)
    out = {}

    @torch.no_grad()
    def run(tag, unet, text_encoder):
        out[f"unet_{tag}"] = unet(x["sample"], x["timestep"], x["context"]).sample
        out[f"text_encoder_{tag}"] = text_encoder(x["input_ids"]).last_hidden_state

    # diffusers format: the standard pipeline call
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(diffusers_export, weight_name="pytorch_lora_weights.safetensors")
    run("unfused", pipe.unet, pipe.text_encoder)
    g = torch.Generator().manual_seed(7)
    out["image"] = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                        generator=g, output_type="pt").images
    pipe.fuse_lora()
    run("fused", pipe.unet, pipe.text_encoder)
    pipe.unfuse_lora()
    run("unfused_again", pipe.unet, pipe.text_encoder)

    # PEFT format: PeftModel around freshly loaded base models
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    base_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet = PeftModel.from_pretrained(base_unet, peft_export + "/unet")
    te = PeftModel.from_pretrained(CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
                                   peft_export + "/text_encoder")
    run("peft_unmerged", unet, te)
    run("peft_merged", unet.merge_and_unload(), te.merge_and_unload())

    leaked = sorted(m for m in sys.modules if m == "selora" or m.startswith("selora."))
    assert not leaked, f"selora modules were imported: {leaked}"
    save_file({k: v.contiguous() for k, v in out.items()}, result)
    """
).replace("PROMPTS", repr(PROMPTS))


@pytest.fixture(scope="module")
def stock(trained):
    """Both exports loaded by stock diffusers / PEFT in ONE subprocess where selora cannot be imported."""
    root, pipe, _, _ = trained
    save_diffusers_lora(pipe, root / "diffusers")
    for comp in ("unet", "text_encoder"):
        save_peft_adapter(getattr(pipe, comp), root / "peft" / comp)
    result = root / "stock.safetensors"
    run_stock(
        root / "stock.py",
        STOCK,
        [root / "base", root / "diffusers", root / "peft", root / "inputs.safetensors", result],
    )
    return load_file(str(result))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{what}: max abs error {err:.3g}"


def test_stock_diffusers_reproduces_selora_outputs_unfused_and_fused(trained, stock):
    root, _, _, ref = trained
    assert (root / "diffusers" / DIFFUSERS_WEIGHT_NAME).stat().st_mode & 0o777 == 0o644, "export left private"
    for tag in ("unfused", "fused", "unfused_again"):
        for comp in ("unet", "text_encoder"):
            assert_close(stock[f"{comp}_{tag}"], ref[comp], f"diffusers {tag} {comp}")
    assert_close(stock["image"], ref["image"], "diffusers pipeline image")


def test_stock_peft_reproduces_selora_outputs_unmerged_and_merged(trained, stock):
    root, _, _, ref = trained
    for comp in ("unet", "text_encoder"):
        config = json.loads((root / "peft" / comp / PEFT_CONFIG_NAME).read_text())
        assert config["peft_type"] == "LORA" and config["rank_pattern"] and config["alpha_pattern"]
    for tag in ("peft_unmerged", "peft_merged"):
        for comp in ("unet", "text_encoder"):
            assert_close(stock[f"{comp}_{tag}"], ref[comp], f"{tag} {comp}")


def test_exported_tensors_have_each_layers_rank(trained, tmp_path):
    _, pipe, _, _ = trained
    file = save_diffusers_lora(pipe, tmp_path)
    save_peft_adapter(pipe.unet, tmp_path / "peft")
    diffusers_tensors = load_file(str(file))
    peft_tensors = load_file(str(tmp_path / "peft" / PEFT_WEIGHT_NAME))
    want = {}
    for comp in ("unet", "text_encoder"):
        for name, layer in lora_layers(getattr(pipe, comp)).items():
            want[f"{comp}.{name}"] = layer
    assert len({layer.rank for layer in want.values()}) >= 3, "the fixture should have mixed ranks"
    assert set(diffusers_tensors) == {f"{n}.lora_{p}.weight" for n in want for p in "AB"}
    for name, layer in want.items():
        r = layer.rank
        assert diffusers_tensors[f"{name}.lora_A.weight"].shape == (r, layer.in_features), name
        assert diffusers_tensors[f"{name}.lora_B.weight"].shape == (layer.out_features, r), name
        assert torch.equal(diffusers_tensors[f"{name}.lora_B.weight"], layer.lora_B.detach()), name
        if name.startswith("unet."):
            key = "base_model.model." + name.removeprefix("unet.")
            assert peft_tensors[f"{key}.lora_A.weight"].shape == (r, layer.in_features), name


def test_without_alpha_metadata_diffusers_would_rescale(trained, tmp_path):
    """The metadata is what makes the load exact: strip it and stock diffusers changes the output."""
    root, pipe, x, ref = trained
    tensors = load_file(str(save_diffusers_lora(pipe, tmp_path / "with")))
    (tmp_path / "without").mkdir()
    save_file(tensors, str(tmp_path / "without" / DIFFUSERS_WEIGHT_NAME), metadata={"format": "pt"})
    plain = load_base(root / "base")
    plain.load_lora_weights(tmp_path / "without", weight_name=DIFFUSERS_WEIGHT_NAME)
    got = outputs(plain.unet, plain.text_encoder, x)
    assert not torch.allclose(got["unet"], ref["unet"], atol=100 * ATOL), "metadata-free file loaded exactly"


def test_load_selora_restores_layers_ranks_and_outputs(trained):
    root, pipe, x, ref = trained
    save_diffusers_lora(pipe, root / "diffusers-load")
    fresh = load_base(root / "base")
    rng = torch.get_rng_state()
    loaded = load_selora(fresh, root / "diffusers-load")
    assert torch.equal(torch.get_rng_state(), rng), "loading consumed the global RNG"
    assert all(isinstance(m, SeLoRALinear) for m in loaded.values())
    for comp in ("unet", "text_encoder"):
        assert selora.ranks(getattr(fresh, comp)) == selora.ranks(getattr(pipe, comp))
        assert {m.scaling for m in lora_layers(getattr(fresh, comp)).values()} == {SCALE}
    got = outputs(fresh.unet, fresh.text_encoder, x)
    for comp in ("unet", "text_encoder"):
        assert torch.equal(got[comp], ref[comp]), f"load_selora changed the {comp} output"
    # training can continue: only adapters are trainable, and a layer can grow again
    n_adapter = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(fresh.unet).values())
    assert selora.num_trainable(fresh.unet) == n_adapter
    layer = next(iter(lora_layers(fresh.unet).values()))
    rank = layer.rank
    layer.expand(1)
    assert layer.rank == rank + 1


def test_load_selora_from_peft_folder_into_one_model(trained):
    root, pipe, x, ref = trained
    save_peft_adapter(pipe.text_encoder, root / "peft-load")
    fresh = load_base(root / "base").text_encoder
    load_selora(fresh, root / "peft-load", kind="lora")
    assert selora.ranks(fresh) == selora.ranks(pipe.text_encoder)
    assert all(type(m) is LoRALinear for m in lora_layers(fresh).values())
    got = fresh(x["input_ids"]).last_hidden_state
    assert torch.equal(got, ref["text_encoder"])


def test_merge_equals_unmerged_and_saves_a_plain_pipeline(trained, tmp_path):
    _root, pipe, x, ref = trained
    merged = merge_into(copy.deepcopy(pipe))
    assert not lora_layers(merged.unet) and not lora_layers(merged.text_encoder)
    got = outputs(merged.unet, merged.text_encoder, x)
    for comp in ("unet", "text_encoder"):
        assert_close(got[comp], ref[comp], f"merged {comp}")
    save_merged(copy.deepcopy(pipe), tmp_path / "merged")
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755, "merged folder left private"
    assert not list((tmp_path / "merged").rglob("*.bin")), "merged weights must be safetensors"
    reloaded = load_base(tmp_path / "merged")
    got = outputs(reloaded.unet, reloaded.text_encoder, x)
    for comp in ("unet", "text_encoder"):
        assert_close(got[comp], ref[comp], f"reloaded merged {comp}")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_merged(copy.deepcopy(pipe), tmp_path / "merged")


# ----------------------------------------------------------------------------- bad input
def test_adapter_from_another_base_model_names_the_first_mismatching_module(trained, tmp_path):
    _root, pipe, _, _ = trained
    save_diffusers_lora(pipe, tmp_path)
    other = tiny_pipeline(tmp_path / "tok", cross_attention_dim=16)  # a different text width
    # first adapted module, in model order, whose shape differs (computed here from the models)
    saved = {n: (m.in_features, m.out_features) for n, m in lora_layers(pipe.unet).items()}
    linear = {n: m for n, m in other.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    first = next(n for n in linear if n in saved and saved[n] != (linear[n].in_features, linear[n].out_features))
    before = {n: p.clone() for n, p in other.unet.state_dict().items()}
    with pytest.raises(ValueError, match=rf"module {first.replace('.', '[.]')} does not match"):
        load_selora(other, tmp_path)
    assert not lora_layers(other.unet) and not lora_layers(other.text_encoder), "a failed load changed the model"
    assert all(torch.equal(p, before[n]) for n, p in other.unet.state_dict().items())


def test_non_safetensors_files_are_refused(trained, tmp_path):
    _, pipe, _, _ = trained
    pickled = tmp_path / "pickled" / DIFFUSERS_WEIGHT_NAME
    pickled.parent.mkdir()
    torch.save({"unet.x.lora_A.weight": torch.zeros(1, 2)}, pickled)
    with pytest.raises(ValueError, match="refused, expected a safetensors file"):
        read_export(pickled.parent)
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    torch.save({}, bin_only / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="refused"):
        load_selora(pipe.unet, bin_only)


def test_metadata_written_is_what_diffusers_reads(trained, tmp_path):
    """The header key and per-component entries are the ones diffusers' loader looks up."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE

    assert (DIFFUSERS_METADATA_KEY, DIFFUSERS_WEIGHT_NAME) == (LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE)
    _, pipe, _, _ = trained
    file = save_diffusers_lora(pipe, tmp_path)
    with safe_open(str(file), framework="pt") as fh:
        meta = json.loads(fh.metadata()[DIFFUSERS_METADATA_KEY])
    for comp in ("unet", "text_encoder"):
        layers = lora_layers(getattr(pipe, comp))
        r, alpha = meta[f"{comp}.r"], meta[f"{comp}.lora_alpha"]
        for name, layer in layers.items():
            assert meta[f"{comp}.rank_pattern"].get(name, r) == layer.rank, name
            assert meta[f"{comp}.alpha_pattern"].get(name, alpha) / layer.rank == pytest.approx(SCALE), name


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(tmp_path / "missing"), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err, err
    assert not (tmp_path / "out").exists()


def fake_run(
    run: Path, pipe: StableDiffusionPipeline, base: Path, targets: tuple[str, str] = ("all-linear",) * 2
) -> Path:
    """A run directory as selora.train leaves it (config.yaml + best/ adapters), written with the
    trainer's own writers, for the base pipeline folder ``base``; ``targets``: (UNet, text encoder)."""
    from selora.checkpoint import adapter_tensors, write_checkpoint
    from selora.config import load_config
    from selora.methods import Adapters
    from selora.pipeline import DiffusionModel

    run.mkdir(parents=True)
    cfg = load_config(
        base={
            "model": str(base),
            "lora_scale": SCALE,
            "unet_targets": targets[0],
            "text_encoder_targets": targets[1],
        }
    )
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    model = DiffusionModel(pipe.unet, pipe.text_encoder)
    tensors = adapter_tensors(Adapters(model, lora_layers(model)))
    write_checkpoint(run / "best", tensors, selora.ranks(model), state={"eval_loss": 0.0})
    return run


def test_cli_exports_a_training_run_in_every_format(trained, tmp_path, capsys):
    root, pipe, x, ref = trained
    run = fake_run(tmp_path / "run", pipe, root / "base")
    assert FORMATS == ("diffusers", "peft", "merged", "kohya")
    bars = [diffusers_logging, transformers_logging]
    for fmt in FORMATS:
        assert main(["--run", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert capsys.readouterr().out.startswith("wrote ")
        assert all(lib.is_progress_bar_enabled() for lib in bars), "main() left the loading bars off"
    assert (tmp_path / "kohya" / "run.safetensors").is_file(), "a kohya --out folder gets <run name>.safetensors"
    want = load_file(str(save_diffusers_lora(pipe, tmp_path / "direct")))
    got = load_file(str(tmp_path / "diffusers" / DIFFUSERS_WEIGHT_NAME))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for comp in ("unet", "text_encoder"):
        fresh = getattr(load_base(root / "base"), comp)
        load_selora(fresh, tmp_path / "peft" / comp)
        assert selora.ranks(fresh) == selora.ranks(getattr(pipe, comp))
    merged = load_base(tmp_path / "merged")
    got = outputs(merged.unet, merged.text_encoder, x)
    for comp in ("unet", "text_encoder"):
        assert_close(got[comp], ref[comp], f"CLI merged {comp}")


def test_cli_run_for_another_base_model_exits_2_naming_the_module(trained, tmp_path, capsys):
    _, pipe, _, _ = trained
    other = tiny_pipeline(tmp_path / "tok", cross_attention_dim=16)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    run = fake_run(tmp_path / "run", pipe, tmp_path / "other")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attn2.to_k" in err, err
    assert not (tmp_path / "out").exists()


class Nested(torch.nn.Module):
    """Module names where one is the dotted suffix of another (``fc`` / ``sub.fc``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 5)
        self.sub = torch.nn.Module()
        self.sub.fc = torch.nn.Linear(5, 4)
        self.sub.out = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub.out(torch.tanh(self.sub.fc(torch.tanh(self.fc(x)))))


@pytest.mark.parametrize("targets", [["^fc$", "sub.out"], ["^fc$", "sub.fc", "sub.out"]])
def test_peft_export_keeps_nested_names_apart(tmp_path, targets):
    """``fc`` (rank 3) must not hand its rank/alpha to ``sub.fc`` (rank 1) or catch it as a target."""
    from peft import PeftModel

    torch.manual_seed(0)
    model = Nested()
    fresh, again = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    layers = selora.inject(model, targets, scale=0.25, generator=g)
    with torch.no_grad():
        layers["fc"].expand(2, generator=g)
        for layer in layers.values():
            layer.lora_B.normal_(generator=g)
    x = torch.randn(7, 6, generator=g)
    with torch.no_grad():
        want = model(x)
    save_peft_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert_close(peft_model(x), want, "PEFT nested")
    load_selora(again, tmp_path)
    assert selora.ranks(again) == selora.ranks(model)
    with torch.no_grad():
        assert torch.equal(again(x), want)


def test_half_precision_export_stores_fp16_and_loads_into_the_base_dtype(trained, tmp_path):
    root, pipe, x, ref = trained
    file = save_diffusers_lora(pipe, tmp_path, dtype=torch.float16)
    tensors = load_file(str(file))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    layer = lora_layers(pipe.unet)["time_embedding.linear_1"]
    assert torch.equal(tensors["unet.time_embedding.linear_1.lora_B.weight"], layer.lora_B.detach().half())
    fresh = load_base(root / "base")
    load_selora(fresh, tmp_path)
    assert {p.dtype for p in selora.trainable_parameters(fresh.unet)} == {torch.float32}
    got = outputs(fresh.unet, fresh.text_encoder, x)
    for comp in ("unet", "text_encoder"):  # fp16 rounding of A and B, nothing more
        assert not torch.equal(got[comp], ref[comp])
        assert torch.allclose(got[comp], ref[comp], atol=1e-2, rtol=0), comp


# ----------------------------------------------------------------------------- kohya / A1111 / ComfyUI file
KOHYA_STOCK = BLOCK_SELORA + textwrap.dedent(
    r"""
    import json
    from pathlib import Path

    import torch
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    base, kohya, merged, inputs, result, layers_json = sys.argv[1:]
    x = load_file(inputs)
    out = {}

    @torch.no_grad()
    def run(tag, pipe):
        out[f"unet_{tag}"] = pipe.unet(x["sample"], x["timestep"], x["context"]).sample
        out[f"text_encoder_{tag}"] = pipe.text_encoder(x["input_ids"]).last_hidden_state

    def load(folder):
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    run("merged", load(merged))                  # the merged export, as stock diffusers reads it
    pipe = load(base)
    kohya = Path(kohya)                          # diffusers' own kohya-format converter
    pipe.load_lora_weights(kohya.parent, weight_name=kohya.name)
    layers = {}
    for comp in ("unet", "text_encoder"):
        for name, module in getattr(pipe, comp).named_modules():
            if isinstance(module, LoraLayer):
                (adapter,) = module.r
                layers[f"{comp}.{name}"] = [module.r[adapter], module.scaling[adapter]]
    run("kohya", pipe)
    pipe.fuse_lora()
    run("kohya_fused", pipe)

    leaked = sorted(m for m in sys.modules if m == "selora" or m.startswith("selora."))
    assert not leaked, f"selora modules were imported: {leaked}"
    save_file({k: v.contiguous() for k, v in out.items()}, result)
    with open(layers_json, "w") as fh:
        json.dump(layers, fh)
    """
)
KOHYA_RTOL = 1e-5  # max |difference| / max |output|, float32
#: diffusers reads a kohya file's lora_unet_time_embedding_linear_1/2 (all-linear runs) from 0.39 on; older
#: releases drop them without a word (the card says so), so their UNet outputs are not the model's
TIME_EMBEDDING_READ = Version(diffusers.__version__) >= Version("0.39")
KOHYA_EXACT = ("unet", "text_encoder") if TIME_EMBEDDING_READ else ("text_encoder",)


@pytest.fixture(scope="module")
def kohya_stock(trained):
    """A forged run exported by the CLI as kohya + merged, both read by stock diffusers (no selora)."""
    root, pipe, _, _ = trained
    run = fake_run(root / "kohya-run", pipe, root / "base")
    assert main(["--run", str(run), "--format", "kohya", "--out", str(root / "kohya" / "adapter.safetensors")]) == 0
    assert main(["--run", str(run), "--format", "merged", "--out", str(root / "merged-cli")]) == 0
    result, layers = root / "kohya_stock.safetensors", root / "kohya_layers.json"
    args = [root / "base", root / "kohya" / "adapter.safetensors", root / "merged-cli"]
    run_stock(root / "kohya_stock.py", KOHYA_STOCK, [*args, root / "inputs.safetensors", result, layers])
    return root / "kohya" / "adapter.safetensors", load_file(str(result)), json.loads(layers.read_text())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_stock_diffusers_kohya_loader_matches_the_merged_export(trained, kohya_stock):
    _, _, _, ref = trained
    _, out, _ = kohya_stock
    for comp in ("unet", "text_encoder"):
        assert_close(out[f"{comp}_merged"], ref[comp], f"stock merged {comp}")
    for comp in KOHYA_EXACT:
        for tag in ("kohya", "kohya_fused"):
            err = relative_error(out[f"{comp}_{tag}"], out[f"{comp}_merged"])
            assert err < KOHYA_RTOL, f"{tag} {comp}: relative error {err:.3g} against the merged export"
            assert_close(out[f"{comp}_{tag}"], ref[comp], f"{tag} {comp} against selora")


def test_stock_diffusers_kohya_loader_gives_every_layer_its_rank_and_scaling(trained, kohya_stock):
    """diffusers builds one LoRA layer per adapted module, at its rank r_i, scaled by alpha / r_i."""
    _, pipe, _, _ = trained
    file, _, loaded = kohya_stock
    tensors = load_file(str(file))
    (alpha,) = {t.item() for k, t in tensors.items() if k.endswith(".alpha")}
    want = {f"{c}.{n}": layer for c in ("unet", "text_encoder") for n, layer in lora_layers(getattr(pipe, c)).items()}
    assert len({layer.rank for layer in want.values()}) >= 3, "the fixture should have mixed ranks"
    dropped = set() if TIME_EMBEDDING_READ else {n for n in want if n.startswith("unet.time_embedding.")}
    assert set(loaded) == set(want) - dropped
    for name, (r, scaling) in loaded.items():
        assert r == want[name].rank, name
        assert scaling == pytest.approx(alpha / r), name


def test_kohya_file_layout_alphas_and_header(trained, tmp_path):
    _, pipe, _, _ = trained
    file = save_kohya_lora(pipe, tmp_path / "a.safetensors")
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as fh:
        header = fh.metadata()
    layers = {(c, n): layer for c in ("unet", "text_encoder") for n, layer in lora_layers(getattr(pipe, c)).items()}
    keys = {kohya_name(c, n): layer for (c, n), layer in layers.items()}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_time_embedding_linear_1" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in keys
    assert set(tensors) == {f"{k}.{part}" for k in keys for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    products = [layer.scaling * layer.rank for layer in keys.values()]
    shared = max(set(products), key=products.count)  # the most common s_i r_i
    for key, layer in keys.items():
        r = layer.rank
        down, up, alpha = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"], tensors[f"{key}.alpha"]
        assert down.shape == (r, layer.in_features) and up.shape == (layer.out_features, r), key
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == shared, key
        assert torch.equal(down, layer.lora_A.detach()), key
        # what kohya, A1111, ComfyUI and diffusers compute: (alpha / r) up down = s B A
        assert torch.allclose(alpha / r * up, layer.scaling * layer.lora_B.detach(), rtol=1e-6, atol=0), key
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "Dynamic"  # mixed ranks: no single dim (kohya's own spelling)
    assert float(header["ss_network_alpha"]) == shared


def test_per_module_alphas_are_kohyas_rule_but_stock_diffusers_misloads_them(trained, tmp_path):
    """alphas="per-module" writes alpha_i = s_i r_i (kohya's resize rule, exact in A1111 / ComfyUI); stock
    diffusers drops the alphas of attention projections, which is why "shared" is the default."""
    root, pipe, x, ref = trained
    file = save_kohya_lora(pipe, tmp_path / "per-module.safetensors", alphas="per-module")
    tensors = load_file(str(file))
    for c in ("unet", "text_encoder"):
        for n, layer in lora_layers(getattr(pipe, c)).items():
            key = kohya_name(c, n)
            assert tensors[f"{key}.alpha"].item() / layer.rank == pytest.approx(layer.scaling), key
            assert torch.equal(tensors[f"{key}.lora_up.weight"], layer.lora_B.detach()), key
    plain = load_base(root / "base")
    # peft 0.21 warns about the alphas it cannot place; older releases drop them silently
    warns = pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match")
    with warns if Version(peft.__version__) >= Version("0.21") else contextlib.nullcontext():
        plain.load_lora_weights(file.parent, weight_name=file.name)
    got = outputs(plain.unet, plain.text_encoder, x)
    for comp in ("unet", "text_encoder"):
        assert not torch.allclose(got[comp], ref[comp], atol=100 * ATOL), f"per-module alphas loaded exactly ({comp})"


def test_kohya_half_precision_and_bad_input(trained, tmp_path):
    root, pipe, x, ref = trained
    file = save_kohya_lora(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    tensors = load_file(str(file))
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    fresh = load_base(root / "base")
    fresh.load_lora_weights(file.parent, weight_name=file.name)
    got = outputs(fresh.unet, fresh.text_encoder, x)
    for comp in KOHYA_EXACT:  # fp16 rounding of A and B, nothing more
        assert not torch.equal(got[comp], ref[comp])
        assert torch.allclose(got[comp], ref[comp], atol=1e-2, rtol=0), comp
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_kohya_lora(pipe, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="alphas: expected one of"):
        save_kohya_lora(pipe, tmp_path / "b.safetensors", alphas="kohya")
    with pytest.raises(ValueError, match="no LoRA/SeLoRA layer"):
        save_kohya_lora(load_base(root / "base"), tmp_path / "c.safetensors")


def test_cli_kohya_bad_out_exits_2_with_one_line(trained, tmp_path, capsys):
    root, pipe, _, _ = trained
    run = fake_run(tmp_path / "run", pipe, root / "base")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(run), "--format", "kohya", "--out", str(tmp_path / "adapter.ckpt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".safetensors" in err, err
    assert not (tmp_path / "adapter.ckpt").exists()


# ----------------------------------------------------------------------------- model cards
def test_every_export_writes_a_model_card(trained, kohya_stock, tmp_path, capsys):
    from huggingface_hub import ModelCard

    root, pipe, _, _ = trained
    kohya_file, _, _ = kohya_stock
    run = fake_run(tmp_path / "run", pipe, root / "base")
    cards = {"kohya": kohya_file.with_suffix(".md"), "merged": root / "merged-cli" / "README.md"}
    for fmt in ("diffusers", "peft"):
        assert main(["--run", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        cards[fmt] = tmp_path / fmt / "README.md"
    assert set(cards) == set(FORMATS)
    assert f"model card {cards['peft']}" in capsys.readouterr().out
    ranks = {f"{c}.{n}": m.rank for c in ("unet", "text_encoder") for n, m in lora_layers(getattr(pipe, c)).items()}
    layers = [m for c in ("unet", "text_encoder") for m in lora_layers(getattr(pipe, c)).values()]
    trainable = sum(m.lora_A.numel() + m.lora_B.numel() for m in layers)
    for fmt, path in cards.items():
        assert path.is_file(), f"{fmt}: no model card at {path}"
        assert path.stat().st_mode & 0o777 == 0o644, f"{fmt}: card left private"
        card = ModelCard.load(path)
        assert card.data.base_model == str(root / "base"), fmt
        assert card.data.selora["format"] == fmt and card.data.selora["method"] == "selora", fmt
        assert card.data.selora["total_rank"] == sum(ranks.values()), fmt
        assert card.data.selora["trainable_parameters"] == trainable, fmt
        assert {"lora", "selora", "stable-diffusion", "medical-imaging", "offline-demo"} <= set(card.data.tags), fmt
        text = card.text
        assert "offline demo model" in text, fmt  # a phantom-data run says so
        assert f"Total rank **{sum(ranks.values())}**" in text, fmt
        assert "| attn1 q |" in text and "| text q |" in text, f"{fmt}: no per-kind ranks"
        assert all(f"| `{name}` | {r} |" in text for name, r in ranks.items()), f"{fmt}: per-layer ranks"
        assert f"{trainable:,}" in text, fmt
        assert "no patient data" in text and "arXiv 2408.07196" in text, fmt
        assert "lora_scale: 0.5" in text and "unet_targets: all-linear" in text, f"{fmt}: no training config"
        assert card.data.library_name == ("peft" if fmt == "peft" else "diffusers"), fmt
    assert "lora_te_" in ModelCard.load(cards["kohya"]).text


# ----------------------------------------------------------------------------- the shipped presets, kohya
PAPER_TARGETS = ("paper-unet", "paper-text-encoder")  # the shipped configs: attention q/k/v/out, CLIP q/k/v
#: The model card's usage snippet, then the outputs on the fixed inputs (selora blocked, hub offline).
CARD_RUN = BLOCK_SELORA + textwrap.dedent(
    r"""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    inputs, result = sys.argv[1:]
    CARD_CODE
    x = load_file(inputs)
    with torch.no_grad():
        out = {"unet": pipe.unet(x["sample"], x["timestep"], x["context"]).sample,
               "text_encoder": pipe.text_encoder(x["input_ids"]).last_hidden_state}
    save_file({k: v.contiguous() for k, v in out.items()}, result)
    """
)


@pytest.fixture(scope="module")
def paper_kohya(trained, tmp_path_factory):
    """A run with the shipped presets on the tiny base (mixed ranks, random B), exported by the CLI as
    kohya; returns (the file, its model card, the selora outputs)."""
    root, _, x, _ = trained
    pipe = load_base(root / "base")
    layers = [
        m
        for c, t in zip(("unet", "text_encoder"), PAPER_TARGETS)
        for m in selora.inject(getattr(pipe, c), t, scale=SCALE).values()
    ]
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i % 3:
                layer.expand(i % 3, generator=g)
            layer.lora_B.normal_(0.0, 0.3, generator=g)
    out = tmp_path_factory.mktemp("paper-kohya")
    run = fake_run(out / "run", pipe, root / "base", PAPER_TARGETS)
    file = out / "kohya" / "adapter.safetensors"
    assert main(["--run", str(run), "--format", "kohya", "--out", str(file)]) == 0
    return file, file.with_suffix(".md"), outputs(pipe.unet, pipe.text_encoder, x)


def test_kohya_file_of_the_shipped_presets_carries_a_zero_marker_for_stock_diffusers(paper_kohya):
    """CLIP q/k/v only: stock diffusers (0.34-0.42) cannot tell the text-encoder dict's type ("Could not
    automatically infer state dict type") without an out_proj or mlp key, so the file holds one zero adapter."""
    file, _, _ = paper_kohya
    tensors = load_file(str(file))
    te = {k.rsplit(".", 2)[0] for k in tensors if k.startswith("lora_te_")}
    extra = {k for k in te if not k.endswith(("_q_proj", "_k_proj", "_v_proj"))}
    assert extra == {"lora_te_text_model_encoder_layers_0_self_attn_out_proj"}, extra
    (marker,) = extra
    assert not tensors[f"{marker}.lora_up.weight"].any() and not tensors[f"{marker}.lora_down.weight"].any()
    assert tensors[f"{marker}.alpha"].item() == tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    rank = tensors[f"{marker}.lora_down.weight"].shape[0]  # the first adapted module's (CLIP's k_proj)
    assert tensors[f"{marker}.lora_down.weight"].shape == (rank, 32)
    assert tensors[f"{marker}.lora_up.weight"].shape == (32, rank)


def test_the_kohya_cards_instructions_reproduce_the_shipped_presets_in_stock_diffusers(paper_kohya, trained):
    """The card's own snippet, run as written (folder filled in) with selora blocked and the hub offline,
    loads the file in stock diffusers with selora's outputs."""
    root = trained[0]
    file, card, ref = paper_kohya
    code = card.read_text(encoding="utf-8").split("```python\n", 1)[1].split("\n```", 1)[0]
    assert 'weight_name="adapter.safetensors"' in code and "zero adapter" in card.read_text(encoding="utf-8")
    code = code.replace("path/to/this/folder", str(file.parent))
    source = CARD_RUN.replace("CARD_CODE", code)
    result = file.parent / "card-run.safetensors"
    run_stock(file.parent / "card_run.py", source, [root / "inputs.safetensors", result])
    got = load_file(str(result))
    for comp in ("unet", "text_encoder"):
        assert_close(got[comp], ref[comp], f"card snippet, {comp}")
