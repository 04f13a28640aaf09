"""The kohya-ss / AUTOMATIC1111 / ComfyUI LoRA file: one ``.safetensors`` with ``lora_unet_…`` /
``lora_te_…`` keys and a per-module ``alpha`` (what most Stable Diffusion users load)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from selora.io import atomic_save_safetensors
from selora.models import base_model_id
from selora.pipeline import adapted_layers, components

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}  # lora_te1_/te2_ are SDXL's
KOHYA_NETWORK_MODULE = "networks.lora"  # kohya-ss sd-scripts' module of this layout (ss_network_module)
KOHYA_ALPHAS = ("shared", "per-module")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: CLIP module names whose kohya keys let stock diffusers infer a text-encoder dict's type (:func:`diffusers_marker`).
DIFFUSERS_TE_MARKERS = (".out_proj", ".fc1", ".fc2")


def kohya_name(component: str, module: str) -> str:
    """The kohya / A1111 / ComfyUI name of adapted ``module`` of ``component`` (SD 1.x).

    The diffusers / CLIP module path with ``_`` for ``.``: ``lora_unet_down_blocks_1_attentions_0_``
    ``transformer_blocks_0_attn1_to_q``, ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. CLIP's
    ``text_model.`` level, gone from the module names since transformers 5, is always written.
    """
    if component not in KOHYA_PREFIXES:
        raise ValueError(f"kohya: no key prefix for component {component!r} (expected {', '.join(KOHYA_PREFIXES)})")
    if component == "text_encoder":
        module = module.removeprefix("text_model.")
    return KOHYA_PREFIXES[component] + module.replace(".", "_")


def save_kohya_lora(
    pipe_or_models: Any,
    file: str | Path,
    dtype: torch.dtype | None = None,
    alphas: str = "shared",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one ``.safetensors`` file in the kohya-ss / AUTOMATIC1111 / ComfyUI LoRA layout.

    Per adapted module (:func:`kohya_name`): ``<name>.lora_down.weight`` ``(r_i, in)`` = A,
    ``<name>.lora_up.weight`` ``(out, r_i)`` and ``<name>.alpha`` (a float32 scalar). These loaders,
    and diffusers' ``load_lora_weights``, scale a module by ``alpha_i / r_i`` (r_i from the tensor).

    ``alphas="shared"`` (default): one ``alpha`` for every module, the most common ``s_i r_i``, and
    ``lora_up = (s_i r_i / alpha) B``, so ``(alpha / r_i) lora_up lora_down = s_i B A`` in every loader.
    Stock diffusers (0.42) needs this: its kohya converter mis-keys the per-module alphas of attention
    projections (UNet ``to_q``/``to_k``/``to_v``/``to_out``, CLIP ``self_attn`` and, under transformers 5,
    all text-encoder modules) and gives them the most common alpha, so differing alphas load wrong.
    ``alphas="per-module"``: ``alpha_i = s_i r_i`` and ``lora_up = B`` (``alpha_i / r_i = s_i``, the rule
    of kohya's dynamic ``resize_lora``); exact in kohya / A1111 / ComfyUI, NOT in stock diffusers.

    ``dtype``: storage dtype of ``lora_down``/``lora_up`` (``torch.float16`` halves the file; alphas stay
    float32). Header metadata: ``ss_network_module`` = ``networks.lora``, ``ss_network_dim`` (the rank,
    or ``Dynamic`` when ranks differ, as kohya writes for mixed ranks), ``ss_network_alpha`` (likewise),
    plus ``metadata`` (strings). Returns the file.
    """
    if alphas not in KOHYA_ALPHAS:
        raise ValueError(f"alphas: expected one of {', '.join(KOHYA_ALPHAS)}, got {alphas!r}")
    file = Path(file)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: a kohya LoRA file must end in .safetensors")
    layers = {
        (comp, name): layer for comp, found in adapted_layers(pipe_or_models).items() for name, layer in found.items()
    }
    products = {key: float(layer.scaling) * layer.rank for key, layer in layers.items()}
    nonzero = [p for p in products.values() if p != 0.0]
    if not nonzero:
        raise ValueError("kohya: every adapter has scaling 0; there is nothing to export")
    shared = Counter(nonzero).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    written_alphas: set[float] = set()
    for (comp, name), layer in layers.items():
        key = kohya_name(comp, name)
        if f"{key}.alpha" in tensors:
            raise ValueError(f"kohya: modules of {comp} collide on the key {key} (dots and underscores)")
        product = products[(comp, name)]
        alpha = product if alphas == "per-module" and product != 0.0 else shared  # loaders read alpha 0 as "none"
        factor = product / alpha
        A, B = layer.lora_A.detach().to("cpu"), layer.lora_B.detach().to("cpu")
        up = B if factor == 1.0 else (B.double() * factor).to(B.dtype)
        tensors[f"{key}.lora_down.weight"] = A.to(dtype=dtype or A.dtype).contiguous().clone()
        tensors[f"{key}.lora_up.weight"] = up.to(dtype=dtype or B.dtype).contiguous().clone()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        written_alphas.add(alpha)
    ranks = {layer.rank for layer in layers.values()}
    header = {
        "format": "pt",
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(float(next(iter(written_alphas)))) if len(written_alphas) == 1 else "Dynamic",
    }
    for k, v in (metadata or {}).items():
        if not isinstance(v, str):
            raise TypeError(f"metadata {k!r}: safetensors header values are strings, got {type(v).__name__}")
        header[k] = v
    tensors.update(diffusers_marker(pipe_or_models, layers, shared, dtype))
    file.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_safetensors(tensors, file, header)


def needs_diffusers_marker(names: Iterable[str]) -> bool:
    """Whether adapted text-encoder modules ``names`` (CLIP module paths) lack every key by which stock diffusers
    recognises a kohya text-encoder dict (:func:`diffusers_marker`): adapters on q/k/v only, as the paper's preset."""
    names = list(names)
    return bool(names) and not any(n.endswith(DIFFUSERS_TE_MARKERS) for n in names)


def diffusers_marker(
    pipe_or_models: Any, layers: Mapping[tuple[str, str], Any], alpha: float, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """A zero adapter (``lora_up`` = 0: it adds exactly nothing) on the ``out_proj`` beside the first adapted
    text-encoder module, when :func:`needs_diffusers_marker`; else nothing.

    diffusers (0.34-0.42, ``lora_base._load_lora_into_text_encoder`` -> ``state_dict_utils.
    convert_state_dict_to_diffusers``) infers a converted text-encoder dict's type from a ``to_out_lora``
    (``self_attn.out_proj``) or ``lora_linear_layer`` (``mlp``) key and raises "Could not automatically infer
    state dict type" without one. The marker is an ordinary kohya module: A1111, ComfyUI and sd-scripts load it.
    """
    te_names = [name for comp, name in layers if comp == "text_encoder"]
    if not needs_diffusers_marker(te_names):
        return {}
    first = layers[("text_encoder", te_names[0])]
    name = te_names[0].rsplit(".", 1)[0] + ".out_proj"
    out_proj = components(pipe_or_models)["text_encoder"].get_submodule(name)
    key, like = kohya_name("text_encoder", name), first.lora_A.detach()
    return {
        f"{key}.lora_down.weight": torch.zeros(first.rank, out_proj.in_features, dtype=dtype or like.dtype),
        f"{key}.lora_up.weight": torch.zeros(out_proj.out_features, first.rank, dtype=dtype or like.dtype),
        f"{key}.alpha": torch.tensor(alpha, dtype=torch.float32),
    }


def kohya_file(run: str | Path, out: str | Path) -> Path:
    """The kohya file for ``--out``: ``out`` if it ends in ``.safetensors``, else ``out/<run name>.safetensors``."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out
    if out.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{out}: the kohya export is a .safetensors file (never a pickle); or pass a folder")
    return out / f"{Path(run).resolve().name or 'selora'}.safetensors"


def kohya_metadata(cfg: Any) -> dict[str, str]:
    """The kohya ``ss_*`` header entries a run's config states exactly."""
    meta = {
        "ss_sd_model_name": base_model_id(cfg.model),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_learning_rate": str(cfg.lr),
        "ss_seed": str(cfg.seed),
        "ss_training_comment": f"{cfg.method} adapters trained with selora (SeLoRA, arXiv 2408.07196) on {cfg.dataset}",
    }
    if cfg.model == "sd-v1-5":
        meta["ss_base_model_version"] = "sd_v1"
    return meta
