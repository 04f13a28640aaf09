"""Checkpoints of a training run: adapters, optimizer, RNG and controller state.

Tensors go to safetensors, everything else to JSON; a checkpoint folder is written under a
temporary name (each file flushed to disk) and renamed into place, so a crash never leaves a
half-written one::

    <dir>/adapters.safetensors   {"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)}
                                 (+ a method's further factors, e.g. "<layer>.lora_E": (r, 1))
    <dir>/ranks.json             {"<layer>": r}
    <dir>/state.safetensors      optimizer moments, RNG states, controller K (flat keys)
    <dir>/state.json             step counters, optimizer param groups, LR scheduler, ...

With ``previous``, :func:`write_checkpoint` keeps two: once the new folder is complete, the one it
replaces becomes ``previous`` (the one before that is deleted). :func:`read_latest_checkpoint` reads
the newest one that loads completely, naming each file it had to pass over (a truncated or corrupt
file: :class:`CheckpointError`). A failed write (a full disk, ...) leaves what was there untouched
and raises :class:`CheckpointWriteError`. One process writes a run's checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selora.io import FILE_MODE, atomic_dir, atomic_write_text
from selora.layout import ADAPTERS, RANKS, STATE_JSON, STATE_TENSORS
from selora.methods import Adapters

NO_SPACE = "no space left on device"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back: a missing, truncated or corrupt file (the message names it)."""


class CheckpointWriteError(OSError):
    """A checkpoint (or another training output) could not be written; what was at its path is untouched.

    ``reason`` is the cause in words (``"no space left on device"``), ``target`` the path being written.
    """

    def __init__(self, message: str, reason: str = "", target: Path | None = None) -> None:
        super().__init__(message)
        self.reason, self.target = reason or message, target
        self.errno = errno.ENOSPC if reason == NO_SPACE else None


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


def write_failure(target: Path, err: BaseException) -> CheckpointWriteError | None:
    """The :class:`CheckpointWriteError` for ``err`` raised while writing ``target``, or None when
    ``err`` is not a failed write (safetensors reports ENOSPC as its own error, without errno)."""
    if isinstance(err, CheckpointWriteError):
        return err
    if not isinstance(err, (OSError, SafetensorError)):
        return None
    text = str(err)
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text or "os error 28" in text
    reason = NO_SPACE if full else (f"{err.strerror}" if isinstance(err, OSError) and err.strerror else text)
    return CheckpointWriteError(f"{reason} while writing {target}", reason, Path(target))


def _write_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """One file of a checkpoint folder being filled (:func:`selora.io.atomic_dir` flushes it to the disk)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, FILE_MODE)  # safetensors creates files 0600; outputs are meant to be shared


def _set_aside(previous: Path) -> Path | None:
    """Move ``previous`` to a hidden ``.<name>.del`` beside it (deleted once the new checkpoint is in place)."""
    if not previous.exists():
        return None
    trash = previous.with_name(f".{previous.name}.del")
    if trash.exists():  # left by a crash
        shutil.rmtree(trash)
    os.replace(previous, trash)
    return trash


def write_checkpoint(
    target: Path,
    adapters: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    tensors: Mapping[str, torch.Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
    previous: Path | None = None,
) -> Path:
    """Write a checkpoint folder atomically: fill a temp folder (flushed to disk), then swap it in for ``target``.

    With ``previous``, an existing ``target`` becomes ``previous`` just before the swap (the old
    ``previous`` is set aside first and deleted last), so every moment has a complete checkpoint at
    ``target`` or ``previous``. Without it, ``target`` is moved aside to ``<target>.old`` and
    deleted last (:func:`selora.io.atomic_dir`). A failed write raises :class:`CheckpointWriteError`
    (``target`` and ``previous`` untouched, the temp folder removed).
    """
    target = Path(target)
    trash = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            _write_tensors(adapters, tmp / ADAPTERS)
            (tmp / RANKS).write_text(json.dumps(dict(ranks), indent=1), encoding="utf-8")
            if tensors is not None:
                _write_tensors(tensors, tmp / STATE_TENSORS)
            if state is not None:
                (tmp / STATE_JSON).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if previous is not None and target.exists():
                trash = _set_aside(Path(previous))
                os.replace(target, previous)
    except Exception as err:
        failure = write_failure(target, err)
        if failure is None:
            raise
        raise failure from err
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return target


def checkpoint_candidates(target: Path, previous: Path | None = None) -> list[Path]:
    """Where a checkpoint may be, newest first: ``target``, ``<target>.old`` (a crash inside
    :func:`selora.io.atomic_dir`), ``previous``."""
    target = Path(target)
    found = [target, target.with_name(target.name + ".old")]
    return found + ([Path(previous)] if previous is not None else [])


def find_checkpoint(target: Path, previous: Path | None = None) -> Path | None:
    """The first of :func:`checkpoint_candidates` with its files present (not read), else None."""
    for candidate in checkpoint_candidates(target, previous):
        if (candidate / STATE_JSON).is_file() and (candidate / ADAPTERS).is_file():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt JSON ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt ({err})") from None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(adapter tensors, state tensors, state JSON)`` of a checkpoint folder, every file read
    completely (so ``ranks.json`` is checked too); :class:`CheckpointError` names a bad file."""
    folder = Path(folder)
    state = _read_json(folder / STATE_JSON)
    if not isinstance(state, dict) or not isinstance(_read_json(folder / RANKS), dict):
        raise CheckpointError(f"{folder}: {STATE_JSON} or {RANKS} is not a JSON object")
    return _read_tensors(folder / ADAPTERS), _read_tensors(folder / STATE_TENSORS), state


def read_latest_checkpoint(
    target: Path, previous: Path | None = None
) -> tuple[Path, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]], list[str]]:
    """``(folder, read_checkpoint(folder), problems)`` for the newest of :func:`checkpoint_candidates`
    that reads completely; ``problems``: one line per newer candidate passed over (a bad file, or
    ``target`` missing). :class:`CheckpointError` listing them when none is good."""
    problems = []
    for candidate in checkpoint_candidates(target, previous):
        if not candidate.exists():
            if candidate == Path(target):
                problems.append(f"{candidate}: missing")
            continue
        try:
            return candidate, read_checkpoint(candidate), problems
        except CheckpointError as err:
            problems.append(str(err))
    raise CheckpointError("; ".join(problems))
