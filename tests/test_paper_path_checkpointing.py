"""Item 4: gradient checkpointing must leave every adapter (text encoder and UNet) with a gradient.

transformers 4.x (allowed by the ``>=4.44`` pin, what Colab may ship) makes
``gradient_checkpointing_enable()`` REENTRANT by default and registers no input-grad hook: the
frozen embedding output then carries no gradient into the checkpointed encoder layers, so the
text-encoder adapters get none (36/36 None, every SeLoRA ratio NaN, nothing expands). The tests
run both on the installed transformers and on an emulation of 4.x's ``gradient_checkpointing_enable``;
forcing the reentrant mode without the input hook shows that the checks catch missing gradients.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import RES
from helpers.tiny_runs import tiny_config
from transformers import PreTrainedModel

import selora.trainer
from selora.models import load_pipeline
from selora.pipeline import add_adapters, enable_checkpointing
from selora.rundir import read_records
from selora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("assets_cache")


def transformers_4x_gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
    """What ``PreTrainedModel.gradient_checkpointing_enable`` does in transformers 4.35-4.57."""
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {"use_reentrant": True}
    func = functools.partial(torch.utils.checkpoint.checkpoint, **gradient_checkpointing_kwargs)
    self._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    if getattr(self, "_hf_peft_config_loaded", False):
        self.enable_input_require_grads()


@pytest.fixture(params=["installed", "transformers-4.x"])
def transformers_api(request, monkeypatch):
    """The installed transformers, or 4.x's checkpointing API (no ``activation_checkpointing_enable``)."""
    if request.param == "transformers-4.x":
        if hasattr(PreTrainedModel, "activation_checkpointing_enable"):
            monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
        monkeypatch.setattr(
            PreTrainedModel, "gradient_checkpointing_enable", transformers_4x_gradient_checkpointing_enable
        )
    return request.param


def force_reentrant_without_input_grads(model) -> None:
    """The failure mode of transformers 4.x: the text encoder checkpointed REENTRANT with no hook making
    the embedding output require grad; the UNet checkpointed as diffusers does it (non-reentrant)."""
    enable_checkpointing(model, use_reentrant=True)
    model.text_encoder.disable_input_require_grads()
    model.unet.enable_gradient_checkpointing()  # diffusers' own default: non-reentrant


def adapter_gradients(assets, enable, method: str = "lora") -> dict[str, torch.Tensor | None]:
    """``{trainable parameter: its gradient}`` after one checkpointed forward/backward."""
    pipe = load_pipeline(str(assets["model"]), torch.float32, "cpu")
    model = add_adapters(pipe, tiny_config(assets, method=method), total_steps=10)
    enable(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a chest x-ray"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    pred = model(torch.randn(2, 4, RES // 2, RES // 2, generator=g), torch.tensor([10, 500]), ids)
    F.mse_loss(pred, torch.randn(pred.shape, generator=g)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def missing(grads: dict[str, torch.Tensor | None]) -> list[str]:
    """Parameters without a finite gradient."""
    return [n for n, g in grads.items() if g is None or not bool(torch.isfinite(g).all())]


def test_every_adapter_gets_a_gradient_with_checkpointing(assets, transformers_api):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*checkpointing", FutureWarning)  # no deprecated checkpointing call
        grads = adapter_gradients(assets, enable_checkpointing)
    te = [n for n in grads if n.startswith("text_encoder.")]
    unet = [n for n in grads if n.startswith("unet.")]
    assert te and unet
    assert missing(grads) == []
    lora_B = [n for n in te if n.endswith("lora_B")]
    assert lora_B and all(grads[n].abs().sum() > 0 for n in lora_B)  # a real signal, not just zeros


def test_reentrant_checkpointing_without_input_grads_is_detected(assets):
    """The checks above can fail: forced reentrant mode leaves the text-encoder adapters without gradient."""
    grads = adapter_gradients(assets, force_reentrant_without_input_grads)
    lost = missing(grads)
    assert lost and all(n.startswith("text_encoder.") for n in lost)
    assert {n for n in grads if n.startswith("text_encoder.")} <= set(lost)


def test_reentrant_checkpointing_with_input_grads_works(assets):
    """enable_input_require_grads() is what rescues a reentrant checkpoint (transformers' own path)."""
    assert missing(adapter_gradients(assets, functools.partial(enable_checkpointing, use_reentrant=True))) == []


def ratios_after_one_test(assets, tmp_path) -> dict[str, float]:
    cfg = tiny_config(assets, epochs=1, num_samples=0, interval=2, gradient_checkpointing=True)
    Trainer(cfg, tmp_path / "run", max_steps=2, progress=False).run()
    history = read_records(tmp_path / "run")["ranks"]
    assert len(history) == 2, "no expansion test at step 2"
    return history[1]["ratios"]


def test_checkpointed_trainer_test_step_has_finite_ratios(assets, tmp_path, transformers_api):
    ratios = ratios_after_one_test(assets, tmp_path)
    assert any(k.startswith("text_encoder.") for k in ratios) and any(k.startswith("unet.") for k in ratios)
    assert [k for k, v in ratios.items() if not math.isfinite(v)] == []


def test_checkpointed_trainer_in_the_failure_mode_has_nan_ratios(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(selora.trainer, "enable_checkpointing", force_reentrant_without_input_grads)
    ratios = ratios_after_one_test(assets, tmp_path)
    bad = [k for k, v in ratios.items() if not math.isfinite(v)]
    assert bad and all(k.startswith("text_encoder.") for k in bad)
