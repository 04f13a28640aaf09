"""The model card every export writes: base model, method, ranks, parameters, config, data terms, citations.

A card is a Hugging Face ``README.md`` (:class:`huggingface_hub.ModelCard`): YAML card data
(``base_model``, ``license``, ``tags``, ``library_name``, ``pipeline_tag``, ``base_model_relation`` and
a ``selora`` entry with the method, export format, total rank and parameter count) followed by a
markdown body with

- the base model (the run config's ``model``; ``sd-v1-5`` is written as the hub id
  ``stable-diffusion-v1-5/stable-diffusion-v1-5``) and its license,
- the method and its settings, the total rank and the ranks per kind of layer
  (:func:`selora.report.module_kind`) and per layer,
- the adapter (trainable) parameters against the frozen base parameters per component,
- how to load the export (per format),
- the training data with its terms and citations, the resolved training config (YAML), and the
  SeLoRA citation.

An export of an offline run (the shipped ``mini-sd`` base model or the generated
``montgomery-phantom`` data) says in its first lines that it is an offline demo model.

Where the card goes (:func:`card_path`): ``README.md`` inside the export folder (diffusers, PEFT,
merged); for the single-file kohya format ``<name>.md`` beside ``<name>.safetensors``, so that
exports collected in one folder (A1111's ``models/Lora``, ComfyUI's ``models/loras``) keep one
card each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from selora.config import OFFLINE_MODEL, TrainConfig, is_offline_demo
from selora.core.layers import lora_layers
from selora.data import DATASETS
from selora.formats import FORMATS
from selora.io import atomic_write_text
from selora.kohya import needs_diffusers_marker
from selora.methods import METHODS
from selora.models import SD15_MODEL_ID, base_model_id
from selora.params import count_parameters
from selora.pipeline import COMPONENTS
from selora.report import KIND_ORDER, module_kind

CARD_NAME = "README.md"  # huggingface_hub.constants.REPOCARD_NAME
SD15_LICENSE = "creativeml-openrail-m"  # SD v1.5's CreativeML Open RAIL-M; its use restrictions carry over
TAGS = (
    "stable-diffusion",
    "stable-diffusion-diffusers",
    "text-to-image",
    "lora",
    "selora",
    "medical-imaging",
    "chest-x-ray",
)
OFFLINE_TAG = "offline-demo"

SELORA_CITATION = """@article{mao2024selora,
  title   = {SeLoRA: Self-Expanding Low-Rank Adaptation of Latent Diffusion Model for Medical Image Synthesis},
  author  = {Mao, Yuchen and others},
  journal = {arXiv preprint arXiv:2408.07196},
  year    = {2024}
}"""


@dataclass(frozen=True)
class AdapterSummary:
    """The facts of an adapted model a card reports: ``{component.layer: rank}``, parameters, scalings."""

    ranks: dict[str, int]
    trainable: dict[str, int]  # adapter parameters per component and "total"
    base: dict[str, int]  # frozen base parameters per component and "total"
    scalings: tuple[float, ...]

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())


def summarize(pipe_or_models: Any) -> AdapterSummary:
    """:class:`AdapterSummary` of a pipeline or ``{"unet": ..., "text_encoder": ...}`` with selora adapters.

    Call it before merging (a merged model has no adapters left).
    """
    get = pipe_or_models.get if isinstance(pipe_or_models, Mapping) else lambda c: getattr(pipe_or_models, c, None)
    ranks: dict[str, int] = {}
    trainable = dict.fromkeys((*COMPONENTS, "total"), 0)
    base = dict.fromkeys((*COMPONENTS, "total"), 0)
    scalings: set[float] = set()
    for comp in COMPONENTS:
        model = get(comp)
        if not isinstance(model, nn.Module):
            continue
        for name, layer in lora_layers(model).items():
            ranks[f"{comp}.{name}"] = layer.rank
            trainable[comp] += layer.lora_A.numel() + layer.lora_B.numel()
            scalings.add(float(layer.scaling))
        base[comp] = count_parameters(model).base
    if not ranks:
        raise ValueError("model card: no LoRA/SeLoRA layer found (summarize before merging)")
    trainable["total"], base["total"] = sum(trainable[c] for c in COMPONENTS), sum(base[c] for c in COMPONENTS)
    return AdapterSummary(ranks, trainable, base, tuple(sorted(scalings)))


# ----------------------------------------------------------------------------- what the card says
def _license(model: str) -> dict[str, str]:
    if model == "sd-v1-5":
        return {"license": SD15_LICENSE}
    if model == "mini-sd":
        return {"license": "mit"}  # built and shipped by this project (MIT)
    return {"license": "other", "license_name": "base-model-license"}


def _base_text(model: str) -> str:
    if model == "sd-v1-5":
        return (
            f"[`{SD15_MODEL_ID}`](https://huggingface.co/{SD15_MODEL_ID}) (config `model: sd-v1-5`; the maintained "
            "mirror of the `runwayml/stable-diffusion-v1-5` weights the paper names), license CreativeML Open "
            "RAIL-M, whose use restrictions apply to this derivative as well"
        )
    if model == "mini-sd":
        return (
            "`mini-sd`, the toy Stable Diffusion shipped with selora for CPU-only runs "
            "(`selora/assets/mini-sd`, built by `scripts/build_mini_sd.py`; SD v1.5's module types at toy size, "
            "pretrained on synthetic shapes), MIT license"
        )
    return f"the local pipeline folder `{model}`; its license applies"


def _load_source(model: str) -> tuple[str, str]:
    """``(import lines, Python expression)`` of the base model in a usage snippet."""
    if model == "sd-v1-5":
        return "", json.dumps(SD15_MODEL_ID)
    if model == "mini-sd":
        return "from selora.models import MINI_SD_DIR  # the mini SD shipped with selora\n", "MINI_SD_DIR"
    return "", json.dumps(model)


def _example_prompt(cfg: TrainConfig) -> str:
    if cfg.sample_prompts:
        return cfg.sample_prompts[0]
    return DATASETS[cfg.dataset].example_prompt


def _method_text(cfg: TrainConfig, summary: AdapterSummary) -> str:
    return METHODS[cfg.method].card_text(cfg, ", ".join(f"{s:g}" for s in summary.scalings))


def _rank_tables(summary: AdapterSummary) -> str:
    ranks = summary.ranks
    parts = []
    for comp in COMPONENTS:
        mine = [r for n, r in ranks.items() if n.startswith(comp + ".")]
        if mine:
            parts.append(f"{comp} {sum(mine)} over {len(mine)} layer{'s' if len(mine) != 1 else ''}")
    per_comp = ", ".join(parts)
    values = np.array(list(ranks.values()))
    lines = [
        f"Total rank **{summary.total_rank}** over {len(ranks)} adapted layers ({per_comp}); per layer min "
        f"{values.min()}, median {np.median(values):g}, max {values.max()}.",
        "",
        "| kind of layer | layers | total rank | mean rank | min | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[str, list[int]] = {}
    for name, r in ranks.items():
        groups.setdefault(module_kind(name), []).append(r)
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    for kind in sorted(groups, key=lambda k: (order.get(k, len(order)), k)):
        g = groups[kind]
        lines.append(f"| {kind} | {len(g)} | {sum(g)} | {np.mean(g):.2f} | {min(g)} | {max(g)} |")
    lines += ["", "<details><summary>Rank of every layer</summary>", "", "| layer | rank |", "|---|---:|"]
    lines += [f"| `{name}` | {r} |" for name, r in ranks.items()]
    lines += ["", "</details>"]
    return "\n".join(lines)


def _param_table(summary: AdapterSummary) -> str:
    lines = [
        "| component | adapter (trainable) parameters | frozen base parameters | fraction |",
        "|---|---:|---:|---:|",
    ]
    for comp in (*COMPONENTS, "total"):
        n, b = summary.trainable[comp], summary.base[comp]
        if comp != "total" and not n:
            continue
        lines.append(f"| {comp} | {n:,} | {b:,} | {100 * n / b:.3f} % |" if b else f"| {comp} | {n:,} | {b:,} | |")
    return "\n".join(lines)


def _usage(fmt: str, cfg: TrainConfig, files: Sequence[str], summary: AdapterSummary) -> str:
    imports, base = _load_source(cfg.model)
    prompt = json.dumps(_example_prompt(cfg))
    if fmt == "diffusers":
        code = f"""{imports}from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({base})
pipe.load_lora_weights("path/to/this/folder", weight_name="pytorch_lora_weights.safetensors")  # ranks, alphas: header
image = pipe({prompt}).images[0]"""
        note = "`pytorch_lora_weights.safetensors`: a diffusers LoRA file; its header carries each layer's rank."
    elif fmt == "peft":
        code = f"""{imports}from diffusers import UNet2DConditionModel
from peft import PeftModel
from transformers import CLIPTextModel

unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained({base}, subfolder="unet"), "folder/unet")
text_encoder = PeftModel.from_pretrained(
    CLIPTextModel.from_pretrained({base}, subfolder="text_encoder"), "folder/text_encoder"
)"""
        note = "One PEFT adapter per adapted component (`unet/`, `text_encoder/`), `rank_pattern`/`alpha_pattern` set."
    elif fmt == "merged":
        code = f"""from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")  # adapters folded into the weights
image = pipe({prompt}).images[0]"""
        note = "A complete diffusers pipeline folder with every adapter merged (W0 + s B A); no LoRA loader needed."
    elif fmt == "kohya":
        name = Path(files[0]).stem if files else "this-file"
        code = f"""{imports}from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({base})
pipe.load_lora_weights("path/to/this/folder", weight_name="{name}.safetensors")  # diffusers' kohya converter
image = pipe({prompt}).images[0]"""
        note = (
            f"`{name}.safetensors` in the kohya-ss / AUTOMATIC1111 / ComfyUI layout (`lora_unet_…`, `lora_te_…` "
            "keys, `lora_down`/`lora_up` and a per-module `alpha`). Copy it into A1111's `models/Lora` (prompt "
            f"`<lora:{name}:1>`) or ComfyUI's `models/loras` (LoraLoader); strength 1 reproduces the trained model. "
            "Every module carries the same alpha; a layer's scaling s and its rank are folded into `lora_up`, so "
            "any loader that scales a module by alpha / rank (kohya, A1111, ComfyUI, diffusers) computes s B A."
            + _kohya_notes(summary.ranks)
        )
    else:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return f"{note}\n\n```python\n{code}\n```"


def _kohya_notes(ranks: Mapping[str, int]) -> str:
    """What a kohya file of adapted layers ``ranks`` (``component.module``) holds beyond them, or skips where."""
    notes = ""
    if needs_diffusers_marker(n.removeprefix("text_encoder.") for n in ranks if n.startswith("text_encoder.")):
        notes += (
            " The file also holds a zero adapter (`lora_up` = 0, it adds nothing) on the first adapted text-encoder "
            "layer's `out_proj`: stock diffusers recognises a kohya text-encoder file only by such a key."
        )
    if any(n.startswith("unet.time_embedding.") for n in ranks):
        notes += (
            " The `lora_unet_time_embedding_linear_1/2` adapters are applied by A1111, ComfyUI and diffusers >= 0.39; "
            "kohya sd-scripts (its LoRA network targets transformer and resnet blocks) and older diffusers skip "
            "them without a word, and so do not reproduce this model."
        )
    return notes


def _banner(cfg: TrainConfig, fmt: str, offline: bool) -> list[str]:
    """The card's title and, for an offline demo, the warning that says so (markdown lines)."""
    title = "Offline demo: " if offline else ""
    title += f"SeLoRA export ({fmt}) of {base_model_id(cfg.model)} on {cfg.dataset}"
    parts = [f"# {title}", ""]
    if offline:
        why = []
        if cfg.model == OFFLINE_MODEL:
            why.append(f"on `{OFFLINE_MODEL}`, the toy Stable Diffusion selora ships for CPU-only runs")
        generated = DATASETS[cfg.dataset].generated
        if generated is not None:
            why.append(f"on {generated}, not on patient data")
        parts += [
            f"> **This is an offline demo model.** It was trained {' and '.join(why)}. It shows that the "
            "export works; it is not a model of real chest X-rays.",
            "",
        ]
    return parts


def model_card(cfg: TrainConfig, summary: AdapterSummary, fmt: str, files: Sequence[str] = ()) -> ModelCard:
    """The :class:`huggingface_hub.ModelCard` of an export in format ``fmt`` of a run trained with ``cfg``.

    ``files``: the exported files, as the card should name them (relative to the card).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    offline = is_offline_demo(cfg)
    credit = DATASETS[cfg.dataset]
    tags = [*TAGS] + ([OFFLINE_TAG] if offline else [])
    data = ModelCardData(
        base_model=base_model_id(cfg.model),
        library_name="peft" if fmt == "peft" else "diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        base_model_relation="finetune" if fmt == "merged" else "adapter",
        selora={
            "method": cfg.method,
            "format": fmt,
            "dataset": cfg.dataset,
            "offline_demo": offline,
            "layers": len(summary.ranks),
            "total_rank": summary.total_rank,
            "trainable_parameters": summary.trainable["total"],
        },
        **_license(cfg.model),
    )
    parts = _banner(cfg, fmt, offline) + [
        "> Not for clinical use: images generated with this model must not be used for diagnosis.",
        "",
        f"Adapters trained with the `selora` package (SeLoRA, arXiv 2408.07196; method `{cfg.method}`), exported "
        f"as `{fmt}`" + (f": {', '.join(f'`{f}`' for f in files)}." if files else "."),
        "",
        "## Model",
        "",
        f"- **Base model:** {_base_text(cfg.model)}.",
        f"- **Method:** {_method_text(cfg, summary)}",
        f"- **Adapted components:** {', '.join(c for c in COMPONENTS if summary.trainable[c])} "
        f"(UNet targets `{cfg.unet_targets}`, text-encoder targets `{cfg.text_encoder_targets}`).",
        f"- **Training data:** {credit.title}.",
        "",
        "## Ranks",
        "",
        _rank_tables(summary),
        "",
        "## Trainable parameters",
        "",
        _param_table(summary),
        "",
        "## How to use",
        "",
        _usage(fmt, cfg, files, summary),
        "",
        "## Training data and its terms",
        "",
        f"**{credit.title}.** {credit.terms}",
        "",
    ]
    if credit.citations:
        parts += ["```bibtex", "\n\n".join(credit.citations), "```", ""]
    parts += [
        "## Training configuration",
        "",
        "The resolved config of the run (`config.yaml`; `python -m selora.train --config` reads it back):",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
        "## Citation",
        "",
        "SeLoRA (Mao et al. 2024, arXiv 2408.07196):",
        "",
        "```bibtex",
        SELORA_CITATION,
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def card_path(written: str | Path, fmt: str) -> Path:
    """Where the card of an export goes: ``<folder>/README.md``, or ``<name>.md`` beside a kohya file."""
    written = Path(written)
    return written.with_suffix(".md") if fmt == "kohya" else written / CARD_NAME


def write_model_card(
    path: str | Path, cfg: TrainConfig, summary: AdapterSummary, fmt: str, files: Sequence[str] = ()
) -> Path:
    """Write :func:`model_card` to ``path`` atomically; returns ``path``."""
    card = model_card(cfg, summary, fmt, files)
    return atomic_write_text(path, str(card))
