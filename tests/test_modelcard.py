"""Model cards: what a card says for each base model / data set, and that huggingface_hub reads it back.

The cards of real exports (every format, from a run directory) are tested in ``test_export.py``;
here the card is built from the shipped configs and a hand-made :class:`AdapterSummary`.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard

import selora
from selora.config import is_offline_demo, load_config
from selora.formats import FORMATS
from selora.modelcard import (
    SD15_LICENSE,
    AdapterSummary,
    card_path,
    model_card,
    summarize,
    write_model_card,
)
from selora.models import SD15_MODEL_ID

RANKS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 3,
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 1,
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": 6,
    "text_encoder.encoder.layers.0.self_attn.q_proj": 2,
}
SUMMARY = AdapterSummary(
    ranks=RANKS,
    trainable={"unet": 12_345, "text_encoder": 678, "total": 13_023},
    base={"unet": 859_520_964, "text_encoder": 123_060_480, "total": 982_581_444},
    scalings=(1.0,),
)


def test_paper_montgomery_card_names_sd15_method_ranks_terms_and_citations(tmp_path):
    cfg = load_config("montgomery-paper")
    path = write_model_card(tmp_path / "README.md", cfg, SUMMARY, "diffusers", ["pytorch_lora_weights.safetensors"])
    card = ModelCard.load(path)
    assert card.data.base_model == SD15_MODEL_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == SD15_LICENSE and card.data.library_name == "diffusers"
    assert {"stable-diffusion", "lora", "selora", "medical-imaging"} <= set(card.data.tags)
    assert "offline-demo" not in card.data.tags and not card.data.selora["offline_demo"]
    assert card.data.selora["total_rank"] == 12 and card.data.selora["trainable_parameters"] == 13_023
    text = card.text
    assert "offline demo" not in text.lower()
    assert "SeLoRA (self-expanding LoRA" in text and "λ = 1.1" in text and "every 40 optimizer steps" in text
    assert "Total rank **12** over 4 adapted layers (unet 10 over 3 layers, text_encoder 2 over 1 layer)" in text
    for kind, line in {
        "attn1 q": "| attn1 q | 1 | 3 |",
        "attn2 v": "| attn2 v | 1 | 6 |",
        "text q": "| text q | 1 | 2 |",
    }.items():
        assert line in text, kind
    assert "| unet | 12,345 | 859,520,964 | 0.001 % |" in text and "| total | 13,023 |" in text
    assert "U.S. National Library of Medicine" in text and "forbid redistributing" in text
    assert "Two public chest X-ray datasets for computer-aided screening of pulmonary diseases" in text
    assert "pages   = {475--477}" in text and "Quantitative Imaging in Medicine and Surgery" in text
    assert "Lung segmentation in chest radiographs using anatomical atlases with nonrigid registration" in text
    assert "pages   = {577--590}" in text and "IEEE Transactions on Medical Imaging" in text
    assert "arXiv:2408.07196" in text and "Self-Expanding Low-Rank Adaptation" in text
    assert "model: sd-v1-5" in text and "dataset: montgomery" in text and "resolution: 224" in text
    assert cfg.to_yaml().rstrip() in text
    assert f'from_pretrained("{SD15_MODEL_ID}")' in text


def test_iuxray_card_cites_demner_fushman(tmp_path):
    cfg = load_config("iuxray-paper", overrides=[f"data_root={tmp_path}"])
    card = model_card(cfg, SUMMARY, "peft")
    assert card.data.library_name == "peft"
    assert "Preparing a collection of radiology examinations for distribution and retrieval" in card.text
    assert "Journal of the American Medical Informatics Association" in card.text and "2016" in card.text
    assert "Jaeger" not in card.text


def test_offline_run_card_says_it_is_an_offline_demo(tmp_path):
    cfg = load_config("montgomery-offline")
    assert cfg.model == "mini-sd" and cfg.dataset == "montgomery-phantom" and is_offline_demo(cfg)
    card = model_card(cfg, SUMMARY, "kohya", ["demo.safetensors"])
    assert card.text.lstrip().startswith("# Offline demo:")
    assert "**This is an offline demo model.**" in card.text and "mini-sd" in card.text
    assert "generated phantom radiographs" in card.text and "no patient data" in card.text
    assert "offline-demo" in card.data.tags and card.data.selora["offline_demo"] is True
    assert card.data.base_model == "mini-sd" and card.data.license == "mit"
    assert "<lora:demo:1>" in card.text and "from selora.models import MINI_SD_DIR" in card.text
    # the real data on the offline model is still a demo (the base model is a toy)
    assert is_offline_demo(load_config(base={"model": "mini-sd", "dataset": "montgomery"}))
    assert not is_offline_demo(load_config(base={"model": "sd-v1-5", "dataset": "montgomery"}))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_has_a_card_that_loads(tmp_path, fmt):
    cfg = load_config("montgomery-paper")
    written = tmp_path / ("adapter.safetensors" if fmt == "kohya" else "export")
    path = card_path(written, fmt)
    assert path == (tmp_path / "adapter.md" if fmt == "kohya" else tmp_path / "export" / "README.md")
    path.parent.mkdir(exist_ok=True)
    write_model_card(path, cfg, SUMMARY, fmt)
    card = ModelCard.load(path)
    assert card.data.base_model == SD15_MODEL_ID and card.data.selora["format"] == fmt
    assert card.data.base_model_relation == ("finetune" if fmt == "merged" else "adapter")
    with pytest.raises(ValueError, match="format: expected one of"):
        model_card(cfg, SUMMARY, "ckpt")


def test_summarize_counts_adapter_parameters_ranks_and_base():
    torch.manual_seed(0)
    unet = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    text_encoder = torch.nn.Sequential(torch.nn.Linear(3, 3))
    layers = selora.inject(unet, ["0", "2"], scale=0.5)
    selora.inject(text_encoder, ["0"], rank=2, scale=0.5)
    layers["0"].expand(2)
    summary = summarize({"unet": unet, "text_encoder": text_encoder})
    assert summary.ranks == {"unet.0": 3, "unet.2": 1, "text_encoder.0": 2}
    assert summary.total_rank == 6 and summary.scalings == (0.5,)
    assert summary.trainable == {"unet": 3 * (6 + 5) + 1 * (5 + 4), "text_encoder": 2 * 6, "total": 42 + 12}
    assert summary.base == {"unet": 6 * 5 + 5 + 5 * 4 + 4, "text_encoder": 12, "total": 59 + 12}
    with pytest.raises(ValueError, match="no LoRA/SeLoRA layer"):
        summarize({"unet": torch.nn.Linear(2, 2)})
