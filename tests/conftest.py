"""Shared test settings (one torch thread per test process: two cores are shared) and shared fixtures."""

import os

os.environ.setdefault("SELORA_PROFILE", "offline")  # before selora is imported

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_tiny_pipeline

from selora.config import load_config
from selora.data.phantom import make_phantom_set
from selora.models import load_pipeline
from selora.pipeline import add_adapters

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny pipeline folder, a 48x60 phantom Montgomery set and a shared cache folder, built once per
    session; ``SELORA_CACHE`` points at that cache while they are built and is restored afterwards."""
    base = tmp_path_factory.getbasetemp() / "train-assets"
    cache = base / "cache"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SELORA_CACHE", str(cache))  # the tokenizer files land here too
        if not (base / "phantom" / "MontgomerySet").is_dir():
            make_phantom_set(base / "phantom", seed=0, size=(48, 60))
        if not (base / "tiny-sd" / "model_index.json").is_file():
            make_tiny_pipeline(base / "tiny-sd")
    return {"model": base / "tiny-sd", "data": base / "phantom", "cache": cache}


@pytest.fixture
def assets_cache(assets, monkeypatch) -> Path:
    """``SELORA_CACHE`` set to the assets' cache for one test; a module that trains on the ``assets``
    uses it for every test (``pytestmark = pytest.mark.usefixtures("assets_cache")``)."""
    monkeypatch.setenv("SELORA_CACHE", str(assets["cache"]))
    return assets["cache"]


@pytest.fixture(scope="module")
def mini_model():
    """The shipped mini SD with SeLoRA adapters on every linear layer of both models (every kind of layer)."""
    cfg = load_config("montgomery-offline", ["unet_targets=all-linear", "text_encoder_targets=all-linear"])
    pipe = load_pipeline("mini-sd", device="cpu")
    return add_adapters(pipe, cfg, total_steps=1)
