"""Which layers did the paper adapt? Count LoRA r = 4 on every candidate target set at SD v1.5's widths.

The paper's text says "every linear layer"; its Sec. 4 parameter counts for LoRA r = 4 (0.803 M in
the UNet, 0.216 M in the text encoder, :data:`selora.book.paper.TRAINABLE_IU_XRAY`) decide between the
readings. SD v1.5's UNet and CLIP text encoder are built at full width on the meta device (shapes
only, no memory, seconds) with the module structure of :mod:`selora.sd15`.
"""

from __future__ import annotations

import pytest
import torch

from selora.book import paper
from selora.config import TrainConfig, config_path, load_config, read_config_file
from selora.core.inject import select_linear
from selora.models import load_pipeline
from selora.params import lora_count
from selora.report import module_kind
from selora.sd15 import SD15_BLOCK_OUT, SD15_TEXT_WIDTH, build_sd15_modules

#: Candidate readings of "the layers the paper adapted" (presets by name, the rest as module-name regexes).
UNET_CANDIDATES = {
    "all-linear": "all-linear",
    "paper-unet": "paper-unet",
    "authors-unet": "authors-unet",
    "attention q/k/v": [r"(.*\.)?attn[12]\.(to_q|to_k|to_v)"],
    "cross-attention q/k/v/out": [r"(.*\.)?attn2\.(to_q|to_k|to_v|to_out\.0)"],
    "attention + feed-forward": [r"(.*\.)?attn[12]\.(to_q|to_k|to_v|to_out\.0)", "ff.net.0.proj", "ff.net.2"],
}
TEXT_CANDIDATES = {
    "all-linear": "all-linear",
    "paper-text-encoder": "paper-text-encoder",
    "attention q/k/v/out": [r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)"],
    "attention q/k": [r"(.*\.)?self_attn\.(q_proj|k_proj)"],
    "mlp fc1/fc2": ["mlp.fc1", "mlp.fc2"],
}


@pytest.fixture(scope="module")
def sd15_shapes():
    with torch.device("meta"):
        unet, _, text_encoder = build_sd15_modules(SD15_BLOCK_OUT[0], SD15_TEXT_WIDTH)
    return unet, text_encoder


def _counts(model, candidates):
    return {name: lora_count(model, targets, rank=4) / 1e6 for name, targets in candidates.items()}


@pytest.mark.parametrize(
    ("part", "candidates", "preset"),
    [(0, UNET_CANDIDATES, "paper-unet"), (1, TEXT_CANDIDATES, "paper-text-encoder")],
)
def test_the_paper_preset_is_the_target_set_that_reproduces_the_papers_count(sd15_shapes, part, candidates, preset):
    component = ("unet", "text_encoder")[part]
    reported = paper.TRAINABLE_IU_XRAY["lora"][component]
    counts = _counts(sd15_shapes[part], candidates)
    error = {name: abs(n - reported) / reported for name, n in counts.items()}
    closest = min(error, key=error.get)
    assert closest == preset, (
        f"{component}: {closest} ({counts[closest]:.3f} M) is closer to {reported} M than {preset}"
    )
    assert error[preset] < 0.03, f"{component}: {preset} gives {counts[preset]:.3f} M, reported {reported} M"
    assert error["all-linear"] > 1.0, f"{component}: every linear layer ({counts['all-linear']:.3f} M) fits too"


def test_the_paper_configs_adapt_the_paper_presets():
    for cfg in (TrainConfig(), load_config("montgomery-paper")):
        assert (cfg.unet_targets, cfg.text_encoder_targets) == ("paper-unet", "paper-text-encoder")
    iuxray = read_config_file(config_path("iuxray-paper"))  # needs a data_root to validate: read the file
    assert not {"unet_targets", "text_encoder_targets"} & set(iuxray), "iuxray-paper overrides the paper's targets"


def _adapted_kinds(unet, text_encoder, cfg) -> set[str]:
    """The roles (:func:`selora.report.module_kind`) of the layers ``cfg``'s targets select in both models."""
    unet_names = select_linear(unet, cfg.unet_targets)
    text_names = select_linear(text_encoder, cfg.text_encoder_targets)
    return {module_kind(n) for n in unet_names} | {module_kind(f"text_encoder.{n}") for n in text_names}


def test_the_offline_profile_adapts_the_layer_kinds_the_paper_profile_adapts_in_sd15(sd15_shapes):
    pipe = load_pipeline("mini-sd")
    offline = _adapted_kinds(pipe.unet, pipe.text_encoder, load_config("montgomery-offline"))
    paper_kinds = _adapted_kinds(*sd15_shapes, load_config("montgomery-paper"))
    assert offline == paper_kinds, f"offline adapts {sorted(offline)}, the paper profile {sorted(paper_kinds)}"
    every_linear = _adapted_kinds(
        pipe.unet, pipe.text_encoder, TrainConfig(unet_targets="all-linear", text_encoder_targets="all-linear")
    )
    assert "proj in/out" in every_linear - offline, "the mini SD's linear proj_in/out stay unadapted"
