"""Checkpoints of a training run: adapters, optimizer, RNG and controller state.

Tensors go to safetensors, everything else to JSON; a checkpoint folder is written under a
temporary name and renamed into place, so a crash never leaves a half-written one::

    <dir>/adapters.safetensors   {"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}
                                 (+ "<layer>.lora_E": (r, 1) for PEFT AdaLoRA layers)
    <dir>/ranks.json             {"<layer>": r}
    <dir>/state.safetensors      optimizer moments, RNG states, controller K (flat keys)
    <dir>/state.json             step counters, optimizer param groups, LR scheduler, ...
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selora.io import atomic_dir, atomic_write_text
from selora.layers import LoRALinear, SeLoRALinear, lora_layers

ADAPTERS = "adapters.safetensors"
RANKS = "ranks.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
#: PEFT AdaLoRA allocator statistics kept in a checkpoint (per adapter parameter).
ADALORA_STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


# -- adapters -----------------------------------------------------------------------------------
def adalora_factors(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """``{layer: {"lora_A": (r, in), "lora_B": (out, r), "lora_E": (r, 1)}}`` of every PEFT AdaLoRA layer.

    PEFT keeps one entry per adapter name in ``ParameterDict``s; the package's AdaLoRA baseline
    uses one adapter (:data:`selora.baselines.adalora.ADAPTER`). The whole allocated ``init_r``
    tensors are kept (pruned triplets are zeros in E), so they load back into the same layers.
    """
    out = {}
    for name, module in model.named_modules():
        E = getattr(module, "lora_E", None)
        if isinstance(E, nn.ParameterDict):
            from selora.baselines.adalora import ADAPTER

            out[name] = {"lora_A": module.lora_A[ADAPTER], "lora_B": module.lora_B[ADAPTER], "lora_E": E[ADAPTER]}
    return out


def adapter_factors(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """``{layer: {factor name: parameter}}`` of every adapter: the package's LoRA/SeLoRA/DyLoRA
    layers (``lora_A``, ``lora_B``) and PEFT AdaLoRA layers (also ``lora_E``), in model order."""
    out = {name: {"lora_A": layer.lora_A, "lora_B": layer.lora_B} for name, layer in lora_layers(model).items()}
    out.update(adalora_factors(model))
    return out


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)[, "<layer>.lora_E": (r, 1)]}`` on the CPU."""
    return {f"{name}.{key}": p.detach().cpu().contiguous()
            for name, factors in adapter_factors(model).items() for key, p in factors.items()}


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str = "adapters") -> None:
    """Copy saved adapters into ``model``'s adapter layers (same names), in place.

    A SeLoRA layer below the saved rank is first grown to it (zero rows; overwritten by the copy);
    parameters keep their identity otherwise, so an optimizer holding them stays valid. Works for
    every adapter :func:`adapter_factors` finds (AdaLoRA's ``lora_E`` included).
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        rank = tensors[f"{name}.lora_A"].shape[0] if f"{name}.lora_A" in tensors else 0
        if isinstance(layer, SeLoRALinear) and rank > layer.rank:
            layer.expand(rank - layer.rank, K=layer.lora_A.new_zeros(rank - layer.rank, layer.in_features))
    expected = {f"{name}.{key}": p for name, factors in adapter_factors(model).items() for key, p in factors.items()}
    if set(tensors) != set(expected):
        extra, lacking = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ValueError(f"{where}: adapter tensors differ from the model (unknown {extra[:3]}, absent {lacking[:3]})")
    for key, p in expected.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(f"{where}: {key}: saved shape {tuple(tensors[key].shape)} does not fit the layer's "
                             f"{tuple(p.shape)}")
    for key, p in expected.items():
        p.copy_(tensors[key])


def read_adapters(path: Path | str) -> dict[str, torch.Tensor]:
    """Adapter tensors from a safetensors file (a one-line error if it is missing or not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter file")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors adapter file ({err})") from None


def merge_adapters(model: nn.Module) -> int:
    """Replace every adapter layer of ``model`` by its merged ``nn.Linear`` (W0 + s B A; AdaLoRA:
    PEFT's ``merge``, W0 + s B (A ⊙ E) / r); returns the count."""
    layers = lora_layers(model, LoRALinear)
    merged = {id(layer): layer.merge() for layer in layers.values()}
    for name in adalora_factors(model):
        layer = model.get_submodule(name)
        layer.merge()  # in place into its base layer
        merged[id(layer)] = layer.get_base_layer()
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if id(child) in merged:
                setattr(parent, child_name, merged[id(child)])
    return len(merged)


# -- optimizer and RNG states -------------------------------------------------------------------
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ``{"optimizer.<i>.<key>": t}`` and JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Load what :func:`optimizer_to_files` wrote (the parameters must already have the saved shapes)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]})


def rng_states(generators: Mapping[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global torch (CPU, CUDA), numpy and python RNG states plus named generators' states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, gen in generators.items():
        tensors[f"rng.gen.{name}"] = gen.get_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": json.loads(json.dumps(random.getstate())),
    }
    return tensors, meta


def adalora_state_to_files(tuner) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdaLoRA's allocator state (PEFT ``AdaLoraModel``): the smoothed sensitivities as tensors
    ``{"adalora.<stat>.<param>": t}`` and the latest ``rank_pattern`` as JSON."""
    from selora.baselines.adalora import ADAPTER

    alloc = tuner.rankallocator
    tensors = {f"adalora.{stat}.{n}": t.detach().cpu().contiguous()
               for stat in ADALORA_STATS for n, t in getattr(alloc, stat).items()}
    return tensors, {"rank_pattern": tuner.peft_config[ADAPTER].rank_pattern}


def adalora_state_from_files(tuner, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`adalora_state_to_files` wrote into a freshly built ``AdaLoraModel``."""
    from selora.baselines.adalora import ADAPTER

    alloc = tuner.rankallocator
    alloc.reset_ipt()
    device = next(tuner.model.parameters()).device
    for key, value in tensors.items():
        if key.startswith("adalora."):
            _, stat, name = key.split(".", 2)
            getattr(alloc, stat)[name] = value.to(device)
    tuner.peft_config[ADAPTER].rank_pattern = meta["rank_pattern"]


def set_rng_states(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.gen.{name}"])
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- atomic folders -----------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def write_checkpoint(
    target: Path,
    adapters: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    tensors: Mapping[str, torch.Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: fill a temp folder, then swap it in for ``target``.

    The previous ``target`` (if any) is moved aside to ``<target>.old`` first and deleted last
    (:func:`selora.io.atomic_dir`); :func:`find_checkpoint` falls back to it if a crash hit
    between the two renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        save_file(dict(adapters), str(tmp / ADAPTERS))
        (tmp / RANKS).write_text(json.dumps(dict(ranks), indent=1), encoding="utf-8")
        if tensors is not None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        if state is not None:
            (tmp / STATE_JSON).write_text(json.dumps(state, indent=1), encoding="utf-8")
    return target


def find_checkpoint(target: Path) -> Path | None:
    """``target`` if it is a complete checkpoint, else ``<target>.old`` if that is, else None."""
    for candidate in (Path(target), Path(target).with_name(Path(target).name + ".old")):
        if (candidate / STATE_JSON).is_file() and (candidate / ADAPTERS).is_file():
            return candidate
    return None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(adapter tensors, state tensors, state JSON)`` of a checkpoint folder."""
    folder = Path(folder)
    state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    return read_adapters(folder / ADAPTERS), load_file(str(folder / STATE_TENSORS)), state
