"""The paper path's CPU dress rehearsal: SD v1.5's module structure, end to end, in seconds.

:func:`selora.sd15.build_sd15_structure` stands in for the hub's SD v1.5 (its exact module
structure at narrow widths, random weights, the hub's folder layout with the safety checker's
folder absent). With ``SELORA_PROFILE=paper`` the test trains with the ``montgomery-paper`` config
(on the phantom set, 32 px), samples, exports (diffusers LoRA and merged), loads the export in stock
diffusers with ``import selora`` blocked, and evaluates through the real FID and CLIP-score code
paths, with stand-in feature networks where the weights cannot be downloaded here.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.stock import BLOCK_SELORA, run_stock
from helpers.tiny_models import make_tiny_clip
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from selora import metrics
from selora.data.phantom import make_phantom_set
from selora.models import load_pipeline
from selora.sd15 import build_sd15_structure

RES = 32  # training / sampling resolution: a 4 x 4 latent through SD's 4-block VAE
TEXT_WIDTH = 48

#: A stock-library process: ``import selora`` fails there (the export must not need it).
STOCK = BLOCK_SELORA + textwrap.dedent(
    r"""
    try:
        import selora  # noqa: F401
        raise SystemExit("selora is importable in the stock process")
    except ModuleNotFoundError:
        pass

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    base, lora_dir, merged, inputs, result = sys.argv[1:]
    x = load_file(inputs)
    out = {}

    def load(folder):
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def run(tag, pipe):
        out[f"unet_{tag}"] = pipe.unet(x["sample"], x["timestep"], x["context"]).sample
        out[f"text_encoder_{tag}"] = pipe.text_encoder(x["input_ids"]).last_hidden_state

    pipe = load(base)
    pipe.load_lora_weights(lora_dir, weight_name="pytorch_lora_weights.safetensors")
    run("lora", pipe)
    g = torch.Generator().manual_seed(0)
    out["image"] = pipe(["a chest x-ray"], num_inference_steps=2, height=32, width=32,
                        generator=g, output_type="pt").images
    run("merged", load(merged))
    leaked = sorted(m for m in sys.modules if m == "selora" or m.startswith("selora."))
    assert not leaked, f"selora modules were imported: {leaked}"
    save_file({k: v.contiguous() for k, v in out.items()}, result)
    """
)


class StandInInception(nn.Module):
    """A fixed random network in Inception-v3's place: ``(n, 3, 299, 299)`` in [0, 1] -> ``(n, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, metrics.INCEPTION_SIZE, metrics.INCEPTION_SIZE) and x.dtype == torch.float32
        return self.net(x)


@pytest.fixture
def paper_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may download; a hub call fails at once
    return tmp_path


def check_sd15_module_names(pipe) -> None:
    """The module names and types the paper path targets exist as in SD v1.5."""
    unet, text = pipe.unet, pipe.text_encoder
    cfg = unet.config
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg.layers_per_block == 2 and not cfg.use_linear_projection and cfg.cross_attention_dim == TEXT_WIDTH
    names = dict(unet.named_modules())
    blocks = [n for n in names if n.endswith("transformer_blocks.0")]
    assert len(blocks) == 16, blocks  # 3 x 2 down, 1 mid, 3 x 3 up, as in SD v1.5
    for b in blocks:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                assert isinstance(names[f"{b}.{attn}.{proj}"], nn.Linear), f"{b}.{attn}.{proj}"
        assert isinstance(names[f"{b}.ff.net.0.proj"], nn.Linear) and isinstance(names[f"{b}.ff.net.2"], nn.Linear)
        attn_block = b.rsplit(".transformer_blocks", 1)[0]
        assert isinstance(names[f"{attn_block}.proj_in"], nn.Conv2d), "SD v1.5 has conv proj_in"
        assert isinstance(names[f"{attn_block}.proj_out"], nn.Conv2d), "SD v1.5 has conv proj_out"
    resnets = [n for n in names if n.endswith("time_emb_proj")]
    assert len(resnets) == 2 * 4 + 2 + 3 * 4 and all(isinstance(names[n], nn.Linear) for n in resnets)
    tnames = dict(text.named_modules())
    # transformers 5 dropped the text_model. level from the module names (not from the hub's weights)
    layers = [n for n in tnames if re.fullmatch(r"(text_model\.)?encoder\.layers\.\d+", n)]
    assert len(layers) == 12 and text.config.vocab_size == 49408 and text.config.max_position_embeddings == 77
    for layer in layers:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2"):
            proj = f"self_attn.{proj}" if proj.endswith("_proj") else proj
            assert isinstance(tnames[f"{layer}.{proj}"], nn.Linear), f"{layer}.{proj}"
    assert len(pipe.vae.config.down_block_types) == 4 and pipe.tokenizer.model_max_length == 77


def test_sd15_structure_folder_is_laid_out_like_the_hub(paper_env):
    folder = build_sd15_structure(paper_env / "sd15", text_width=TEXT_WIDTH)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert not (folder / "safety_checker").exists() and "requires_safety_checker" not in index
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in ("skip_prk_steps", "set_alpha_to_one", "steps_offset", "clip_sample")} == {
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
    }
    assert sched["trained_betas"] is None and sched["beta_schedule"] == "scaled_linear"
    pipe = load_pipeline(str(folder), device="cpu")
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "PNDMScheduler"
    check_sd15_module_names(pipe)


def test_a_snapshot_without_the_safety_checker_folders_loads(paper_env):
    """model_index.json names a safety checker and a feature extractor whose folders are absent (a
    partial snapshot): the pipeline loads without both, as the trainer needs no safety checker."""
    folder = build_sd15_structure(paper_env / "sd15-bare", text_width=TEXT_WIDTH, feature_extractor=False)
    assert not (folder / "feature_extractor").exists() and not (folder / "safety_checker").exists()
    pipe = load_pipeline(str(folder), device="cpu")
    assert pipe.safety_checker is None and pipe.feature_extractor is None


@pytest.mark.slow
def test_paper_path_dress_rehearsal(paper_env, capsys):
    from selora.export import main as export_main
    from selora.rundir import load_run
    from selora.sample import main as sample_main
    from selora.train import main as train_main

    tmp = paper_env
    model = build_sd15_structure(tmp / "sd15", text_width=TEXT_WIDTH)
    data = tmp / "phantom"
    make_phantom_set(data, seed=0, size=(48, 60))
    run = tmp / "run"

    # train: the paper config, 32 px, one epoch, expansion tested every 2 steps (lambda = 1.1)
    sets = {
        "model": model,
        "dataset": "montgomery-phantom",
        "data_root": data,
        "resolution": RES,
        "epochs": 1,
        "batch_size": 4,
        "interval": 2,
        "num_samples": 0,
        "lr": 1e-2,
        "mixed_precision": "no",  # fp16 autocast is for the GPU
        "num_workers": 0,
    }
    args = ["--config", "montgomery-paper", "--out", str(run), "--no-progress"]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert train_main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "profile=paper" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["step"] > 2
    ranks = json.loads((run / "ranks.json").read_text())
    assert max(ranks.values()) > 1, "no layer expanded"
    assert any(k.startswith("text_encoder.") for k in ranks) and any(k.startswith("unet.") for k in ranks)
    assert not any(k.endswith((".proj_in", ".proj_out")) for k in ranks), "conv projections got linear adapters"
    adapters = load_file(str(run / "adapters.safetensors"))
    assert {k: v.shape[0] for k, v in adapters.items() if k.endswith("lora_A")} == {
        f"{k}.lora_A": r for k, r in ranks.items()
    }

    # sample: 4 held-out prompts, 2 steps
    samples = tmp / "samples"
    sample_args = ["--run", str(run), "--split", "test", "--limit", "4", "--steps", "2", "--out", str(samples)]
    assert sample_main([*sample_args, "--no-progress"]) == 0
    prompts = json.loads((samples / "prompts.json").read_text())
    images = [Image.open(samples / f"{i:03d}.png") for i in range(4)]
    assert len(prompts) == 4 and all(im.size == (RES, RES) for im in images) and (samples / "grid.png").is_file()

    # export: diffusers LoRA and merged; load both with stock diffusers, selora blocked
    lora_dir, merged = tmp / "export-diffusers", tmp / "export-merged"
    assert export_main(["--run", str(run), "--format", "diffusers", "--out", str(lora_dir)]) == 0
    assert export_main(["--run", str(run), "--format", "merged", "--out", str(merged)]) == 0
    g = torch.Generator().manual_seed(0)
    _, pipe = load_run(run, device=torch.device("cpu"))
    ids = pipe.tokenizer(["a chest x-ray"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = {
        "sample": torch.randn(1, 4, RES // 8, RES // 8, generator=g),
        "timestep": torch.tensor([500]),
        "context": torch.randn(1, 77, TEXT_WIDTH, generator=g),
        "input_ids": ids,
    }
    with torch.no_grad():
        ours = {
            "unet": pipe.unet(x["sample"], x["timestep"], x["context"]).sample,
            "text_encoder": pipe.text_encoder(x["input_ids"]).last_hidden_state,
        }
    save_file(x, str(tmp / "inputs.safetensors"))
    run_stock(tmp / "stock.py", STOCK, [model, lora_dir, merged, tmp / "inputs.safetensors", tmp / "stock.safetensors"])
    stock = load_file(str(tmp / "stock.safetensors"))
    for part in ("unet", "text_encoder"):
        ref = ours[part]
        for tag in ("lora", "merged"):
            got = stock[f"{part}_{tag}"]
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, f"{part} via the {tag} export differs from selora's: {err:.2e} relative"
        assert not torch.allclose(ours[part], load_base_output(model, x, part)), f"{part}: adapters change nothing"
    assert stock["image"].shape == (1, 3, RES, RES) and torch.isfinite(stock["image"]).all()

    # evaluate through the real FID and CLIP-score code paths, stand-in feature networks
    fake = metrics.images_from_pil(images)
    reals = sorted((data / "MontgomerySet" / "CXR_png").glob("*.png"))[:6]
    real = metrics.images_from_pil([Image.open(p).convert("L").resize((RES, RES), Image.BILINEAR) for p in reals])
    fid = metrics.inception_fid(real, fake, feature=StandInInception())
    score = metrics.clip_score(fake, prompts, model_and_processor=make_tiny_clip(pipe.tokenizer))
    assert np.isfinite(fid) and fid >= 0 and np.isfinite(score) and score >= 0, (fid, score)
    assert metrics.inception_fid(real, real, feature=StandInInception()) == pytest.approx(0.0, abs=1e-3)


def load_base_output(model: Path, x: dict[str, torch.Tensor], part: str) -> torch.Tensor:
    """The base model's output for ``part`` on the same inputs (no adapters)."""
    pipe = load_pipeline(str(model), device="cpu")
    with torch.no_grad():
        if part == "unet":
            return pipe.unet(x["sample"], x["timestep"], x["context"]).sample
        return pipe.text_encoder(x["input_ids"]).last_hidden_state
