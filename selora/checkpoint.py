"""Checkpoints of a training run: adapters, optimizer, RNG and controller state.

Tensors go to safetensors, everything else to JSON; a checkpoint folder is written under a
temporary name and renamed into place, so a crash never leaves a half-written one::

    <dir>/adapters.safetensors   {"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}
                                 (+ a method's further factors, e.g. "<layer>.lora_E": (r, 1))
    <dir>/ranks.json             {"<layer>": r}
    <dir>/state.safetensors      optimizer moments, RNG states, controller K (flat keys)
    <dir>/state.json             step counters, optimizer param groups, LR scheduler, ...
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selora.io import atomic_dir, atomic_write_text
from selora.methods import Adapters

ADAPTERS = "adapters.safetensors"
RANKS = "ranks.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


# -- adapters -----------------------------------------------------------------------------------
def adapter_tensors(adapters: Adapters) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)[, "<layer>.lora_E": (r, 1)]}`` on the CPU."""
    return {
        f"{name}.{key}": p.detach().cpu().contiguous()
        for name, factors in adapters.factors().items()
        for key, p in factors.items()
    }


@torch.no_grad()
def load_adapter_tensors(adapters: Adapters, tensors: Mapping[str, torch.Tensor], where: str = "adapters") -> None:
    """Copy saved adapters into the layers of ``adapters`` (same names), in place.

    The method first makes its layers fit (SeLoRA: a layer below the saved rank is grown with zero
    rows, overwritten by the copy); parameters keep their identity otherwise, so an optimizer
    holding them stays valid. A ValueError names ``where`` when names or shapes differ.
    """
    adapters.prepare_load(tensors)
    expected = {f"{name}.{key}": p for name, factors in adapters.factors().items() for key, p in factors.items()}
    if set(tensors) != set(expected):
        extra, lacking = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ValueError(f"{where}: adapter tensors differ from the model (unknown {extra[:3]}, absent {lacking[:3]})")
    for key, p in expected.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(
                f"{where}: {key}: saved shape {tuple(tensors[key].shape)} does not fit the layer's {tuple(p.shape)}"
            )
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


# -- nested state ---------------------------------------------------------------------------------
def split_tensors(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """A nested state (dicts, lists, tensors, JSON scalars) as flat tensors ``{"<prefix>.<path>": t}``
    and a JSON skeleton in which each tensor is ``{"tensor": "<prefix>.<path>"}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"tensor": path}
        if isinstance(obj, Mapping):
            return {str(k): walk(v, f"{path}.{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        return obj

    return tensors, walk(state, prefix)


def join_tensors(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The nested state :func:`split_tensors` took apart."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"tensor"} and isinstance(skeleton["tensor"], str):
            return tensors[skeleton["tensor"]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


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


def set_rng_states(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], generators: Mapping[str, torch.Generator]
) -> None:
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
