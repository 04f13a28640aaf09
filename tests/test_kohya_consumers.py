"""The kohya file against the key rules of the programs that load it (issue #28 §2).

Each consumer's rule is kept below as a FACT: the rule in words, where it is written (``repo@commit:path:line``),
and its executable form as data (prefix strings, module class names, regexes, the scale rule). The tests apply
these facts to the keys :func:`selora.kohya.save_kohya_lora` writes for SD v1.5's own module tree (full size,
built on the meta device by :mod:`selora.sd15`; the adapters alone hold real tensors), for the shipped presets
and for ``all-linear``. The consumers' code is not copied: a fact is data read by the small resolvers here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import selora
from selora.kohya import kohya_name, save_kohya_lora
from selora.modelcard import _kohya_notes
from selora.sd15 import sd15_text_encoder, sd15_unet

SD_SCRIPTS = "kohya-ss/sd-scripts@48d368fa5577"
COMFY = "comfyanonymous/ComfyUI@00728eb20fce"
A1111_NETWORKS = "AUTOMATIC1111/stable-diffusion-webui@873edba44bed:extensions-builtin/Lora/networks.py"
A1111_NETWORK = "AUTOMATIC1111/stable-diffusion-webui@f2844bd024ff:extensions-builtin/Lora/network.py"
A1111_LORA = "AUTOMATIC1111/stable-diffusion-webui@ea903819cb7e:extensions-builtin/Lora/network_lora.py"


@dataclass(frozen=True)
class Fact:
    consumer: str
    rule: str
    source: str
    data: Any


# ----------------------------------------------------------------------------- kohya-ss sd-scripts
SDS_PREFIX_UNET = Fact("sd-scripts", "UNet key prefix", f"{SD_SCRIPTS}:networks/lora.py:870", "lora_unet")
SDS_PREFIX_TE = Fact("sd-scripts", "text-encoder key prefix (SD 1.x)", f"{SD_SCRIPTS}:networks/lora.py:871", "lora_te")
SDS_UNET_TARGETS = Fact(
    "sd-scripts",
    "UNet modules searched for layers when a file is loaded (modules_dim set): UNET_TARGET_REPLACE_MODULE "
    "plus UNET_TARGET_REPLACE_MODULE_CONV2D_3X3",
    f"{SD_SCRIPTS}:networks/lora.py:867-868,1038-1040",
    frozenset({"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}),
)
SDS_TE_TARGETS = Fact(
    "sd-scripts",
    "text-encoder modules searched for layers (TEXT_ENCODER_TARGET_REPLACE_MODULE)",
    f"{SD_SCRIPTS}:networks/lora.py:869",
    frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}),
)
SDS_LEAVES = Fact(
    "sd-scripts",
    "a layer is a Linear or Conv2d child (class name) of a target module",
    f"{SD_SCRIPTS}:networks/lora.py:963-966",
    frozenset({"Linear", "Conv2d"}),
)
SDS_NAME = Fact(
    "sd-scripts",
    'lora_name = prefix + "." + name + "." + child_name, then every "." replaced by "_"',
    f"{SD_SCRIPTS}:networks/lora.py:970-971",
    (".", "_"),
)
SDS_NON_STRICT = Fact(
    "sd-scripts",
    "file keys with no LoRA module are dropped silently (load_state_dict(weights_sd, False))",
    f"{SD_SCRIPTS}:networks/lora.py:1079",
    False,
)
SDS_TIME_EMBEDDING = Fact(
    "sd-scripts",
    "its SD 1.x UNet keeps the time embedding in a TimestepEmbedding (linear_1/linear_2), outside every target "
    "class; the target classes carry diffusers' names",
    f"{SD_SCRIPTS}:library/original_unet.py:392-396,1414 (Transformer2DModel 869, ResnetBlock2D 436, "
    "Downsample2D 552, Upsample2D 1117)",
    "TimestepEmbedding",
)
SDS_TRANSFORMERS = Fact(
    "sd-scripts",
    "pins transformers 4.x, whose CLIPTextModel names its layers under text_model.",
    f"{SD_SCRIPTS}:requirements.txt:2",
    "transformers==4.54.1",
)

# ----------------------------------------------------------------------------- ComfyUI
COMFY_UNET = Fact(
    "ComfyUI",
    'UNet key = "lora_unet_" + (diffusers weight name of unet_to_diffusers without ".weight", "." -> "_")',
    f"{COMFY}:comfy/lora.py:222-227",
    ("lora_unet_", ".", "_"),
)
COMFY_TRANSFORMER_BLOCK = Fact(
    "ComfyUI",
    "unet_to_diffusers maps these linear weights of every transformer block (TRANSFORMER_BLOCKS)",
    f"{COMFY}:comfy/utils.py:131-151",
    frozenset(
        {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")} | {"ff.net.0.proj", "ff.net.2"}
    ),
)
COMFY_RESNET = Fact(
    "ComfyUI",
    "unet_to_diffusers maps a resnet's time_emb_proj to LDM emb_layers.1 (UNET_MAP_RESNET)",
    f"{COMFY}:comfy/utils.py:154-157",
    {"time_emb_proj": "emb_layers.1"},
)
COMFY_BASIC = Fact(
    "ComfyUI",
    "unet_to_diffusers maps time_embedding.linear_1/2 to LDM time_embed.0/2 (UNET_MAP_BASIC)",
    f"{COMFY}:comfy/utils.py:169,184,186",
    {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"},
)
COMFY_CLIP = Fact(
    "ComfyUI",
    'text-encoder key = "lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}" for b < 32 and the six '
    "CLIP layers of LORA_CLIP_MAP (clip_l.transformer.text_model.encoder.layers.{b}.{c})",
    f"{COMFY}:comfy/lora.py:4-11,166-179",
    (
        "lora_te_text_model_encoder_layers_",
        32,
        ("mlp.fc1", "mlp.fc2", *(f"self_attn.{p}_proj" for p in "kqv"), "self_attn.out_proj"),
    ),
)
COMFY_ALPHA = Fact(
    "ComfyUI",
    'reads "<key>.alpha", "<key>.lora_up.weight", "<key>.lora_down.weight"; the patch is scaled by alpha / '
    "lora_down.shape[0] (model_patcher.calculate_weight, lora branch); keys not used are logged "
    '"lora key not loaded"',
    f"{COMFY}:comfy/lora.py:21,24,31,160",
    ("alpha", "lora_up.weight", "lora_down.weight"),
)
COMFY_SCALE = Fact(
    "ComfyUI",
    "the lora patch is scaled by alpha / lora_down.shape[0] (comfy/model_patcher.py calculate_weight; line not "
    "pinned here), alpha read from <key>.alpha",
    f"{COMFY}:comfy/lora.py:18-21",
    "alpha / dim",
)

# ----------------------------------------------------------------------------- AUTOMATIC1111 webui
A1111_LAYER_NAMES = Fact(
    "A1111",
    'a layer is named by its module path with "." -> "_" (text encoder under cond_stage_model.wrapped, UNet '
    "under sd_model.model: transformer_text_model_..., diffusion_model_...)",
    f"{A1111_NETWORKS}:119-120,124-125",
    (".", "_"),
)
A1111_KEY_SPLIT = Fact(
    "A1111", "a file key is split at its first '.': module key, then the part", f"{A1111_NETWORKS}:148", "."
)
#: convert_diffusers_name_to_compvis: (kohya-key regex, LDM block of the groups) for the SD 1.x keys
A1111_CONVERT = Fact(
    "A1111",
    "kohya (diffusers) names -> LDM names: time_embedding_linear_k -> time_embed_{2k-2}; down_blocks_i "
    "attentions|resnets_j -> input_blocks_{1+3i+j}_{1|0}; mid_block -> middle_block_{1|2j}; up_blocks_i -> "
    "output_blocks_{3i+j}_{1|0}; te layers -> transformer_text_model_encoder_layers_n_rest",
    f"{A1111_NETWORKS}:63-76,84,93",
    (
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", "diffusion_model_time_embed_{2a-2}{b}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", "diffusion_model_input_blocks_{1+3a+c}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", "diffusion_model_middle_block"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", "diffusion_model_output_blocks_{3a+c}"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", "transformer_text_model_encoder_layers_{a}_{b}"),
    ),
)
A1111_RESNET_SUFFIX = Fact(
    "A1111",
    "suffix_conversion: a resnet's time_emb_proj is LDM emb_layers_1",
    f"{A1111_NETWORKS}:29-35",
    {"time_emb_proj": "emb_layers_1"},
)
A1111_SCALE = Fact(
    "A1111",
    'alpha = "<key>.alpha"; dim = lora_down.weight.shape[0]; scale = alpha / dim (1.0 without alpha)',
    f"{A1111_NETWORK}:119,128-132; {A1111_LORA}:11,32",
    "alpha / dim",
)
SDS_SCALE = Fact(
    "sd-scripts",
    "dim = lora_down.size()[0]; alpha 0 or None means alpha = dim; scale = alpha / dim",
    f"{SD_SCRIPTS}:networks/lora.py:71-72,832",
    "alpha / dim",
)

FACTS = [v for v in dict(globals()).values() if isinstance(v, Fact)]
SCALE_RULES = {"sd-scripts": SDS_SCALE, "A1111": A1111_SCALE, "ComfyUI": COMFY_SCALE}


# ----------------------------------------------------------------------------- resolvers driven by the facts
def consumer_text_names(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """The text encoder's modules under the consumers' transformers 4.x names (``text_model.`` level)."""
    names = dict(text_encoder.named_modules())
    if not any(n.startswith("text_model.") for n in names):  # transformers 5 dropped the level
        names = {("text_model." + n if n else n): m for n, m in names.items()}
    return names


def sd_scripts_layers(modules: dict[str, nn.Module], prefix: str, targets: frozenset[str]) -> dict[str, list[str]]:
    """{lora_name: [module paths]} by SDS_NAME over the children of ``targets`` (class names), leaves SDS_LEAVES."""
    dot, sep = SDS_NAME.data
    found: dict[str, list[str]] = {}
    for name, module in modules.items():
        if type(module).__name__ in targets:
            for child_name, child in module.named_modules():
                if child_name and type(child).__name__ in SDS_LEAVES.data:
                    key = (prefix + dot + name + dot + child_name).replace(dot, sep)
                    found.setdefault(key, []).append(f"{name}.{child_name}")
    return found


def comfy_unet_name(module: str) -> bool:
    """Whether ComfyUI's unet_to_diffusers names diffusers UNet module ``module`` (the facts' data)."""
    if module in COMFY_BASIC.data:
        return True
    block = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)"
    m = re.fullmatch(block + r"\.attentions\.\d+\.transformer_blocks\.\d+\.(.+)", module)
    if m:
        return m.group(2) in COMFY_TRANSFORMER_BLOCK.data
    m = re.fullmatch(block + r"\.resnets\.\d+\.(.+)", module)
    return bool(m) and m.group(2) in COMFY_RESNET.data


def a1111_convert(key: str) -> str | None:
    """The LDM layer name A1111 gives kohya module key ``key`` (A1111_CONVERT, A1111_RESNET_SUFFIX), or None."""
    hits = [(i, re.fullmatch(p, key)) for i, (p, _) in enumerate(A1111_CONVERT.data)]
    hits = [(i, m.groups()) for i, m in hits if m]
    if len(hits) != 1:
        return None
    ((i, g),) = hits
    if i == 0:
        return f"diffusion_model_time_embed_{int(g[0]) * 2 - 2}{g[1]}"
    if i in (1, 3):
        suffix = A1111_RESNET_SUFFIX.data.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        block = 1 + 3 * int(g[0]) + int(g[2]) if i == 1 else 3 * int(g[0]) + int(g[2])
        where = "input_blocks" if i == 1 else "output_blocks"
        return f"diffusion_model_{where}_{block}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if i == 2:
        suffix = A1111_RESNET_SUFFIX.data.get(g[2], g[2]) if g[0] == "resnets" else g[2]
        return f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else int(g[1]) * 2}_{suffix}"
    return f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"


def plain_sd15() -> tuple[nn.Module, nn.Module]:
    """SD v1.5's UNet and text encoder at full size, shapes only (meta device)."""
    with torch.device("meta"):
        return sd15_unet(), sd15_text_encoder()


# ----------------------------------------------------------------------------- SD v1.5, full size, exported
def export_sd15(folder, unet_targets: str, text_targets: str, **kw):
    """SD v1.5 (meta device) with adapters of mixed ranks and scalings in real tensors, exported by
    save_kohya_lora; returns (the file's tensors, {kohya key: (component, module path, adapter)})."""
    unet, text = plain_sd15()
    g = torch.Generator().manual_seed(0)
    layers = {}
    for comp, model, targets in (("unet", unet, unet_targets), ("text_encoder", text, text_targets)):
        for i, (name, layer) in enumerate(selora.inject(model, targets, kind="lora", rank=1).items()):
            r = 1 + i % 3
            layer.lora_A = nn.Parameter(torch.randn(r, layer.in_features, generator=g))
            layer.lora_B = nn.Parameter(torch.randn(layer.out_features, r, generator=g))
            layer.scaling = (0.5, 0.25, 1.0)[i % 5 % 3]
            layers[kohya_name(comp, name)] = (comp, name, layer)
    file = save_kohya_lora({"unet": unet, "text_encoder": text}, folder / "sd15.safetensors", **kw)
    return load_file(str(file)), layers


@pytest.fixture(scope="module")
def all_linear(tmp_path_factory):
    return export_sd15(tmp_path_factory.mktemp("all-linear"), "all-linear", "all-linear")


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    return export_sd15(tmp_path_factory.mktemp("paper"), "paper-unet", "paper-text-encoder")


def module_keys(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(A1111_KEY_SPLIT.data, 1)[0] for k in tensors}


def test_facts_are_data_with_a_citation():
    assert len(FACTS) >= 20
    for fact in FACTS:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{12}:\S+:\d+.*", fact.source), fact.source
        assert fact.consumer in ("sd-scripts", "ComfyUI", "A1111") and fact.rule and fact.data is not None


@pytest.mark.parametrize("preset", ["all_linear", "paper"])
def test_sd_scripts_finds_exactly_one_module_per_key_but_the_time_embedding(preset, request):
    tensors, layers = request.getfixturevalue(preset)
    unet, text = plain_sd15()
    found = sd_scripts_layers(dict(unet.named_modules()), SDS_PREFIX_UNET.data, SDS_UNET_TARGETS.data)
    found |= sd_scripts_layers(consumer_text_names(text), SDS_PREFIX_TE.data, SDS_TE_TARGETS.data)
    keys = module_keys(tensors)
    assert keys >= set(layers) and len(keys) == len(layers) + (preset == "paper")  # + the diffusers marker
    skipped = keys - set(found)
    for key in keys - skipped:
        assert len(found[key]) == 1, (key, found[key])
        if key in layers:
            comp, name, _ = layers[key]
            assert found[key][0].removeprefix("text_model.") == name, key
    want = {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"}
    assert skipped == (want if preset == "all_linear" else set())  # SDS_NON_STRICT: dropped without a word
    assert type(unet.time_embedding).__name__ == SDS_TIME_EMBEDDING.data
    assert SDS_TIME_EMBEDDING.data not in SDS_UNET_TARGETS.data


@pytest.mark.parametrize("preset", ["all_linear", "paper"])
def test_comfyui_and_a1111_map_every_key_to_one_layer(preset, request):
    tensors, layers = request.getfixturevalue(preset)
    unet, text = plain_sd15()
    prefix, dot, sep = COMFY_UNET.data
    unet_names: dict[str, list[str]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear):
            unet_names.setdefault(prefix + name.replace(dot, sep), []).append(name)
    clip_prefix, layers_max, clip = COMFY_CLIP.data
    clip_keys = {f"{clip_prefix}{b}_{c.replace('.', '_')}" for b in range(layers_max) for c in clip}
    text_names = {("lora_te_" + n.replace(*A1111_LAYER_NAMES.data)) for n in consumer_text_names(text)}
    a1111 = {}
    for key in module_keys(tensors):
        if key.startswith(prefix):
            assert len(unet_names.get(key, [])) == 1, f"{key}: not exactly one UNet layer"
            assert comfy_unet_name(unet_names[key][0]), f"ComfyUI has no name for {key}"
        else:
            assert key in clip_keys and key in text_names, f"no text-encoder layer for {key}"
        a1111[key] = a1111_convert(key)
        assert a1111[key] is not None, f"A1111 converts no name for {key}"
    assert len(set(a1111.values())) == len(a1111), "A1111 maps two keys to one layer"
    for key, ldm in a1111.items():  # where both consumers name the LDM layer, they agree
        for diffusers, comfy in {**COMFY_BASIC.data, **COMFY_RESNET.data}.items():
            if key.endswith(diffusers.replace(".", "_")):
                assert ldm.endswith(comfy.replace(".", "_")), (key, ldm, comfy)


def test_every_consumers_scale_rule_reproduces_each_layers_scaling(all_linear, paper, tmp_path):
    """scale(alpha, dim) lora_up lora_down is s B A, dim = lora_down rows; shared and per-module alphas."""
    per_module = export_sd15(tmp_path, "paper-unet", "paper-text-encoder", alphas="per-module")
    for tensors, layers in (all_linear, paper, per_module):
        for key, (_, _, layer) in layers.items():
            down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
            alpha, dim = tensors[f"{key}.alpha"].item(), down.shape[0]
            assert dim == layer.rank, key
            for consumer, fact in SCALE_RULES.items():
                scale = eval(fact.data, {}, {"alpha": alpha, "dim": dim})  # the rule as written in the fact
                want = layer.scaling * layer.lora_B.detach()
                assert torch.allclose(scale * up, want, rtol=1e-5, atol=0), (consumer, key)


def test_the_model_card_says_sd_scripts_skips_the_time_embedding(all_linear, paper):
    for (_, layers), want in ((all_linear, True), (paper, False)):
        ranks = {f"{comp}.{name}": layer.rank for comp, name, layer in layers.values()}
        notes = _kohya_notes(ranks)
        assert ("kohya sd-scripts" in notes and "skip" in notes and "time_embedding" in notes) == want
