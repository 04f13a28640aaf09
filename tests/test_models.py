"""The shipped mini SD is a genuine diffusers folder: stock loading, offline, prompt-dependent output."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.models.attention import GEGLU
from safetensors.torch import load_file, save_file

import selora.models
from selora.config import load_config
from selora.models import (
    CLIP_TEXT_LEVEL,
    FP16_VARIANT_FILE,
    MINI_SD_DIR,
    SD15_MODEL_ID,
    load_pipeline,
    weights_variant,
    without_clip_text_level,
)
from selora.provenance import folder_sha256
from selora.results import load as load_published
from selora.tokenizer import clip_vocab_and_merges

OFFLINE_RESOLUTION = load_config("montgomery-offline").resolution  # what the mini SD is trained and sampled at
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_mini_sd.py"


def _refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


def block_network(mp: pytest.MonkeyPatch) -> None:
    """Hub offline, and any socket connection or DNS lookup fails the test."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    mp.setattr(socket, "getaddrinfo", _refuse)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    """The committed folder loaded with the stock diffusers call, network blocked."""
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        p = StableDiffusionPipeline.from_pretrained(MINI_SD_DIR)
    p.set_progress_bar_config(disable=True)
    return p


def draw(pipe: StableDiffusionPipeline, prompts: list[str], seed: int = 0, steps: int = 12) -> np.ndarray:
    """One image per prompt, (n, 64, 64, 3) in [0, 1], seeded per image."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens, output_type="np").images


def test_folder_is_a_small_diffusers_pipeline():
    index = json.loads((MINI_SD_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MINI_SD_DIR / part).is_dir(), part
    assert index["safety_checker"] == [None, None]
    files = [f for f in MINI_SD_DIR.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
    assert sorted(f.parent.name for f in weights) == ["text_encoder", "unet", "vae"]
    assert all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files) <= 20_000_000
    for config in MINI_SD_DIR.glob("*/config.json"):  # no machine path of the build (diffusers' _name_or_path)
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_stock_load_is_float32_and_draws_at_offline_resolution(pipe):
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    (img,) = draw(pipe, ["a large red circle in the center"], steps=4)
    assert img.shape == (OFFLINE_RESOLUTION, OFFLINE_RESOLUTION, 3)
    assert np.isfinite(img).all() and img.std() > 0.01


def bright_centroid_x(images: np.ndarray) -> np.ndarray:
    """x of the centre of mass of what is brighter than the dark background, in [0, 1]; (n, S, S, 3) -> (n,)."""
    w = np.clip(images.max(-1) - 0.25, 0, None) + 1e-6
    x = (np.arange(images.shape[2]) + 0.5) / images.shape[2]
    return (w * x).sum((1, 2)) / w.sum((1, 2))


def test_same_prompt_and_seed_is_identical_and_the_object_goes_where_the_prompt_says(pipe):
    a, b = (draw(pipe, ["a large white circle"], seed=3)[0] for _ in range(2))
    assert np.array_equal(a, b), "same prompt and seed must give the same image"
    seeds = (0, 1, 2)
    left, right = (
        np.concatenate([draw(pipe, [f"a large white circle {where}"], seed=s) for s in seeds])
        for where in ("on the left", "on the right")
    )
    x_left, x_right = bright_centroid_x(left), bright_centroid_x(right)
    assert (x_left < 0.45).all() and (x_right > 0.55).all(), (
        f"the circle does not follow 'on the left' / 'on the right': centroids {x_left} vs {x_right}"
    )


def test_tokenizer_and_text_encoder_agree(pipe):
    tok, te = pipe.tokenizer, pipe.text_encoder.config
    assert tok.get_vocab() == clip_vocab_and_merges()[0]  # the real CLIP vocabulary
    assert len(tok) == te.vocab_size == 49408
    assert tok.model_max_length == te.max_position_embeddings == 77
    assert (te.bos_token_id, te.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert pipe.unet.config.cross_attention_dim == te.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == OFFLINE_RESOLUTION


@pytest.mark.parametrize("part", ["text_encoder", "unet", "vae"])
def test_every_shipped_weight_loads_from_its_file_under_the_installed_libraries(pipe, part):
    """What the installed diffusers / transformers load is the file, tensor for tensor: every tensor of
    the file used, no parameter or buffer left at its random initialisation (transformers 4 loads a
    text-encoder file without CLIP's ``text_model.`` level as a random model, with only a log line)."""
    raw = without_clip_text_level(load_file(str(next((MINI_SD_DIR / part).glob("*.safetensors")))))
    loaded = without_clip_text_level(getattr(pipe, part).state_dict())
    loaded.pop("embeddings.position_ids", None)  # a constant buffer (arange), saved by no major
    assert loaded.keys() == raw.keys(), sorted(loaded.keys() ^ raw.keys())[:5]
    assert all(torch.equal(loaded[k], raw[k].to(loaded[k].dtype)) for k in raw), part


def test_the_text_encoder_file_names_clip_text_level():
    """transformers 4.x reads text-encoder weights only under ``text_model.``; 5 maps that naming too."""
    names = load_file(str(MINI_SD_DIR / "text_encoder" / "model.safetensors")).keys()
    assert names and all(n.startswith(CLIP_TEXT_LEVEL) for n in names), sorted(names)[:3]


def test_the_model_digest_is_the_published_one_and_ignores_clip_text_level(tmp_path):
    """The shipped folder hashes to the digest the published results record, and one text encoder
    hashes the same with or without CLIP's ``text_model.`` level in its file."""
    assert folder_sha256(MINI_SD_DIR) == load_published("table1").provenance["model"]["sha256"]
    copy = tmp_path / "mini-sd"
    shutil.copytree(MINI_SD_DIR, copy)
    te_file = copy / "text_encoder" / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(str(te_file)).items()}  # not the memory-mapped file rewritten below
    save_file(without_clip_text_level(state), str(te_file), {"format": "pt"})
    assert folder_sha256(copy) == folder_sha256(MINI_SD_DIR)
    save_file({**state, next(iter(state)): next(iter(state.values())) + 1}, str(te_file), {"format": "pt"})
    assert folder_sha256(copy) != folder_sha256(MINI_SD_DIR)


def test_unet_has_sd15_module_types(pipe):
    modules = dict(pipe.unet.named_modules())
    names = list(modules)
    for suffix in (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "time_emb_proj",
        "proj_in",
        "proj_out",
    ):
        hits = [n for n in names if n.endswith(suffix)]
        assert hits, suffix
        assert all(isinstance(modules[n], torch.nn.Linear) for n in hits), suffix
    assert any(isinstance(m, GEGLU) for m in modules.values())
    assert pipe.unet.config.use_linear_projection


def test_load_pipeline_offline_is_the_shipped_model_without_network(pipe, monkeypatch):
    block_network(monkeypatch)
    loaded = load_pipeline("mini-sd", device="cpu")
    assert loaded.safety_checker is None
    ours, stock = loaded.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(ours[k], stock[k]) for k in stock)


def test_profile_name_and_bad_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a profile name; the profile's model is 'mini-sd'"):
        load_pipeline("offline")
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))


def test_missing_offline_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(selora.models, "MINI_SD_DIR", tmp_path / "mini-sd")
    with pytest.raises(FileNotFoundError, match=r"mini-sd: not a diffusers pipeline folder .*build_mini_sd"):
        load_pipeline("mini-sd")


def _build_script():
    spec = importlib.util.spec_from_file_location("build_mini_sd", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--text-steps", "2", "--vae-steps", "2", "--decoder-steps", "2", "--images", "32", "--probe-seeds", "1"]


def _bytes(folder: Path, part: str) -> bytes:
    return next((folder / part).glob("*.safetensors")).read_bytes()


def test_build_script_is_reproducible_and_a_snapshot_equals_a_shorter_run(tmp_path, monkeypatch):
    """The UNet snapshot at step 2 of a 3-step run is the 2-step run's model, byte for byte, also when
    the VAE comes from the snapshot (--vae-from); the decoder-only stage 2 changes the decoder but
    not the encoder the UNet's latents came from."""
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    build = _build_script()
    two, three = tmp_path / "two", tmp_path / "three"
    assert build.main(["--out", str(two), "--unet-steps", "2", "--snapshot-every", "0", *TINY]) == 0
    assert build.main(["--out", str(three), "--unet-steps", "3", "--snapshot-every", "2", *TINY]) == 0
    snapshot = tmp_path / "cache" / "mini-sd-build" / "snapshot"
    assert _bytes(two, "unet") == _bytes(snapshot, "unet") != _bytes(three, "unet")
    assert _bytes(two, "text_encoder") == _bytes(snapshot, "text_encoder")
    assert all(n.startswith(CLIP_TEXT_LEVEL) for n in load_file(str(two / "text_encoder" / "model.safetensors")))
    assert _bytes(two, "vae") == _bytes(three, "vae") != _bytes(snapshot, "vae")  # stage 2 is deterministic
    reused = tmp_path / "reused"  # stage 1a taken from the snapshot instead of retrained: same model
    assert (
        build.main(
            ["--out", str(reused), "--unet-steps", "2", "--snapshot-every", "0", "--vae-from", str(snapshot), *TINY]
        )
        == 0
    )
    assert all(_bytes(reused, part) == _bytes(two, part) for part in ("unet", "text_encoder", "vae"))
    block_network(monkeypatch)
    refined = StableDiffusionPipeline.from_pretrained(three)
    stage1 = AutoencoderKL.from_pretrained(snapshot / "vae")
    changed = {n for n, t in refined.vae.state_dict().items() if not torch.equal(t, stage1.state_dict()[n])}
    assert changed and all(n.startswith(("decoder.", "post_quant_conv.")) for n in changed), changed
    log = json.loads((three / "training_log.json").read_text())
    assert log["unet_steps_done"] == 3 and len(log["loss_every_25_steps"]["unet_eps_mse"]) == 1
    assert log["decoder_refine"]["steps"] == 2
    assert set(log["probe"]) >= {"row_accuracy", "column_accuracy", "colour_accuracy"}
    assert (three / "samples.png").is_file() and (three / "loss_curve.png").is_file()
    assert refined.unet.config.cross_attention_dim == refined.text_encoder.config.hidden_size


def test_build_script_rejects_bad_arguments(tmp_path, capsys):
    build = _build_script()
    with pytest.raises(SystemExit) as err:
        build.main(["--unet-steps", "0", "--out", str(tmp_path)])
    assert err.value.code == 2 and "--unet-steps must be a positive integer, got 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        build.main(["--out", str(tmp_path / "file")])
    assert err.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err


def test_a_half_precision_load_reads_the_fp16_variant_files(tmp_path):
    """The hub's SD v1.5 ships fp16 weight files (half the download): a float16/bfloat16 load asks for
    them; a local folder is read from them when it has them, and float32 never is."""
    assert weights_variant(SD15_MODEL_ID, False, torch.float16) == "fp16"
    assert weights_variant(SD15_MODEL_ID, False, torch.bfloat16) == "fp16"
    assert weights_variant(SD15_MODEL_ID, False, torch.float32) is None
    folder = tmp_path / "with-variant"
    shutil.copytree(MINI_SD_DIR, folder)
    assert weights_variant(str(folder), True, torch.float16) is None  # no fp16 files yet
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    with torch.no_grad():
        pipe.unet.conv_in.weight.zero_()  # mark the variant's weights
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert (folder / FP16_VARIANT_FILE).is_file()
    for dtype in (torch.float16, torch.bfloat16):
        half = load_pipeline(str(folder), dtype=dtype, device="cpu")
        assert half.unet.dtype == dtype and half.unet.conv_in.weight.abs().sum() == 0, f"{dtype}: not the variant"
    full = load_pipeline(str(folder), dtype=torch.float32, device="cpu")
    assert full.unet.dtype == torch.float32 and full.unet.conv_in.weight.abs().sum() > 0, "float32 read the variant"


def test_importing_the_loader_prints_nothing():
    """No library notice reaches a chapter's output when it imports the loader (diffusers' import loads
    image processors that, without torchvision, make transformers print a fallback notice each)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import selora.models, selora.trainer"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr[-500:]


def test_a_local_load_shows_no_loading_bars_and_restores_the_libraries_settings(capsys):
    """Loading the shipped model takes seconds: no diffusers/transformers bar in a chapter's output,
    even with both libraries' bars switched on; each library's own setting is as before afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [lib.is_progress_bar_enabled() for lib in libraries]
    try:
        for lib in libraries:
            lib.enable_progress_bar()
        load_pipeline("mini-sd", device="cpu")
        err = capsys.readouterr().err
        assert "Loading" not in err and "it/s" not in err, err[-300:]
        assert all(lib.is_progress_bar_enabled() for lib in libraries), "a library's bars were left off"
    finally:
        for lib, was in zip(libraries, before):
            (lib.enable_progress_bar if was else lib.disable_progress_bar)()
