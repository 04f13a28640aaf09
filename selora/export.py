"""Take SeLoRA adapters out of selora: diffusers LoRA, PEFT adapter, merged weights, kohya file, and back.

Every adapted layer may end training with its own rank r_i, while its scaling s is fixed (never
alpha / r, see :mod:`selora.core.layers`). diffusers and PEFT compute the LoRA scaling per module as
``lora_alpha / r``. A file without explicit alphas is silently rescaled on load: diffusers 0.42
gives every module ``alpha = r`` (scaling 1, wrong for s != 1); earlier releases gave every module
the alpha of the most common rank (scaling r / r_i). So every export writes, per module,

    r_i = rank of the layer,   lora_alpha_i = s_i * r_i   (so that lora_alpha_i / r_i = s_i, Eq. 1)

as a PEFT ``LoraConfig`` (``r``/``lora_alpha`` = the most common values, ``rank_pattern`` /
``alpha_pattern`` for the others):

- diffusers: ``pytorch_lora_weights.safetensors`` with keys ``unet.<module>.lora_A.weight`` /
  ``text_encoder.<module>.lora_B.weight`` and the config of each component under the safetensors
  header key ``lora_adapter_metadata`` (diffusers' ``LORA_ADAPTER_METADATA_KEY``; entries
  ``unet.r``, ``unet.rank_pattern``, ...), which ``StableDiffusionPipeline.load_lora_weights``
  turns into the ``LoraConfig`` as is.
- PEFT: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_A.weight``), for ``PeftModel.from_pretrained(model, folder)``.

- kohya: one ``.safetensors`` file in the kohya-ss / AUTOMATIC1111 / ComfyUI layout (see
  :func:`selora.kohya.save_kohya_lora`): keys ``lora_unet_<module with _ for .>.lora_down.weight`` ``(r_i, in)``,
  ``.lora_up.weight`` ``(out, r_i)`` and ``.alpha`` (a scalar), ``lora_te_text_model_...`` for the
  text encoder. These loaders scale a module by ``alpha_i / r_i`` with ``r_i = lora_down.shape[0]``.
  Stock diffusers' kohya converter (0.42) loses per-module alphas of attention projections
  (``to_q``..., ``self_attn.q_proj``...) when they differ, so the default writes ONE alpha for every
  module (the most common ``s_i r_i``) and folds ``s_i r_i / alpha`` into ``lora_up``: every loader
  then computes ``s_i B_i A_i``.

Both the diffusers and the PEFT layout store ``lora_A`` as ``(r, in_features)`` and ``lora_B`` as
``(out_features, r)``, the layout of :class:`selora.LoRALinear`, so export is a rename.

The command line exports a training run and writes a model card beside every export
(:mod:`selora.modelcard`: ``README.md`` in the export folder, ``<name>.md`` beside a kohya file)::

    python -m selora.export --run RUN --format diffusers|peft|merged|kohya --out DIR_OR_FILE [--dtype float16]

``--out`` of the kohya format: a ``.safetensors`` file, or a folder that gets ``<run name>.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from selora.core.inject import KINDS, replace_modules
from selora.core.layers import LoRALinear, lora_layers
from selora.dtypes import DTYPES
from selora.formats import FORMATS
from selora.io import atomic_dir, atomic_save_safetensors, atomic_write_text
from selora.kohya import PICKLE_SUFFIXES, kohya_file, kohya_metadata, save_kohya_lora
from selora.pipeline import COMPONENTS, adapted_layers, components

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
STORAGE_DTYPES = ("float32", "float16")  # --dtype choices (selora.dtypes.DTYPES names)

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # {module: (lora_A (r, in), lora_B (out, r), s)}


# ----------------------------------------------------------------------------- models and configs
def lora_config_kwargs(model: nn.Module) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments that give every adapter of ``model`` its rank r_i and scaling s_i.

    PEFT scales a module by ``lora_alpha / r``, so ``lora_alpha_i = s_i * r_i`` (Eq. 1 with a fixed
    s). ``r`` and ``lora_alpha`` are the most common values; the other modules go into
    ``rank_pattern`` / ``alpha_pattern`` under their qualified names. PEFT matches such a name as a
    dotted suffix of a module name (which also tolerates a prefix such as CLIP's old
    ``text_model.``). If an adapted name is the dotted suffix of another module's name (``fc`` and
    ``block.fc``), suffix matching would mix them up: then every key is anchored (``^name``) and
    ``target_modules`` is a regex of the exact names.
    """
    layers = lora_layers(model)
    suffixes = {m[i + 1 :] for m, _ in model.named_modules() for i, c in enumerate(m) if c == "."}
    exact = any(n in suffixes for n in layers)
    key = {n: "^" + n if exact else n for n in layers}
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.scaling * layer.rank for name, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {key[n]: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {key[n]: v for n, v in alphas.items() if v != alpha},
        "target_modules": "|".join(re.escape(n) for n in layers) if exact else sorted(layers),
        "lora_dropout": 0.0,
        "bias": "none",
    }


def _scaling(config: Mapping[str, Any], name: str, rank: int) -> float:
    """s = lora_alpha / r of module ``name`` under a LoraConfig-like dict (PEFT's pattern rule)."""

    def lookup(pattern: Mapping[str, Any], default: Any) -> Any:
        for key, value in pattern.items():  # first match wins, as in peft.utils.other.get_pattern_key
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    r = lookup(config.get("rank_pattern") or {}, config.get("r", rank))
    alpha = lookup(config.get("alpha_pattern") or {}, config.get("lora_alpha", r))
    if r != rank:
        raise ValueError(f"module {name}: the config says rank {r} but lora_B has {rank} columns")
    return float(alpha) / float(r)


def _tensors(layers: Mapping[str, LoRALinear], prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{prefix + name + ".lora_A.weight": A (r, in), ... ".lora_B.weight": B (out, r)}`` on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for part, p in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            t = p.detach().to("cpu", dtype=dtype or p.dtype).contiguous().clone()
            out[f"{prefix}{name}.{part}.weight"] = t
    return out


# ----------------------------------------------------------------------------- writing
def save_diffusers_lora(pipe_or_models: Any, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``StableDiffusionPipeline.load_lora_weights``.

    ``pipe_or_models``: a pipeline or ``{"unet": ..., "text_encoder": ...}`` with selora adapters.
    Keys ``<component>.<module>.lora_A.weight`` ``(r_i, in)`` and ``.lora_B.weight`` ``(out, r_i)``;
    the header's ``lora_adapter_metadata`` holds each component's LoraConfig (per-module ranks and
    ``lora_alpha_i = s_i * r_i``), so stock diffusers reproduces the selora outputs. ``dtype``: storage
    dtype (``torch.float16`` halves the file); default the adapters' own. Returns the file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    models = components(pipe_or_models)
    for comp, layers in adapted_layers(pipe_or_models).items():
        tensors.update(_tensors(layers, comp + ".", dtype))
        config.update({f"{comp}.{k}": v for k, v in lora_config_kwargs(models[comp]).items()})
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return atomic_save_safetensors(tensors, out_dir / DIFFUSERS_WEIGHT_NAME, metadata)


def save_peft_adapter(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``.

    ``model``: one model (a UNet, a text encoder, any module) with selora adapters. The config carries
    ``rank_pattern`` / ``alpha_pattern`` so each module keeps its rank and scaling. ``dtype`` as in
    :func:`save_diffusers_lora`. Returns ``out_dir``.
    """
    from peft import LoraConfig

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: no LoRA/SeLoRA layer in the model (inject adapters first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(**lora_config_kwargs(model)).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    atomic_save_safetensors(_tensors(layers, PEFT_PREFIX, dtype), out_dir / PEFT_WEIGHT_NAME, {"format": "pt"})
    atomic_write_text(out_dir / PEFT_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return out_dir


# ----------------------------------------------------------------------------- reading
def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; anything else is refused."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path}: refused, expected a safetensors file (pickled weights are never loaded): {err}"
        ) from err


def _split(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` from ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            raise ValueError(f"{path}: unexpected tensor {key!r}; expected <module>.lora_A.weight / .lora_B.weight")
    for name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: module {name} has {sorted(pair)} but needs both lora_A and lora_B")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{path}: module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                "are not (r, in) and (out, r)"
            )
    return {name: (pair["lora_A"], pair["lora_B"]) for name, pair in pairs.items()}


def read_export(path: str | Path) -> dict[str, Adapters]:
    """``{component: {module: (A (r, in), B (out, r), scaling)}}`` from an export.

    ``path``: a PEFT folder (component ``""``), a folder holding ``pytorch_lora_weights.safetensors``,
    or a diffusers LoRA ``.safetensors`` file (components ``"unet"``, ``"text_encoder"``). A diffusers
    file without ``lora_adapter_metadata`` gets diffusers' own convention, scaling 1.
    """
    path = Path(path)
    if path.is_dir() and (path / PEFT_CONFIG_NAME).is_file():
        try:
            config = json.loads((path / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / PEFT_CONFIG_NAME}: not valid JSON ({err})") from err
        tensors, _ = _read_safetensors(path / PEFT_WEIGHT_NAME)
        tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
        grouped, configs = {"": tensors}, {"": config}
    else:
        file = path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path
        if path.is_dir() and not file.is_file():
            others = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if others:
                raise ValueError(f"{path}: refused {others[0]}: only safetensors weights are loaded, never pickles")
            raise FileNotFoundError(f"{path}: holds neither {DIFFUSERS_WEIGHT_NAME} nor {PEFT_CONFIG_NAME}")
        tensors, header = _read_safetensors(file)
        try:
            flat = json.loads(header.get(DIFFUSERS_METADATA_KEY) or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: header {DIFFUSERS_METADATA_KEY} is not valid JSON ({err})") from err
        grouped, configs = {}, {}
        for key, t in tensors.items():
            comp, _, rest = key.partition(".")
            grouped.setdefault(comp, {})[rest] = t
        for comp in grouped:
            configs[comp] = {k.removeprefix(comp + "."): v for k, v in flat.items() if k.startswith(comp + ".")}
        path = file
    out: dict[str, Adapters] = {}
    for comp, ts in grouped.items():
        out[comp] = {
            name: (A, B, _scaling(configs[comp], name, A.shape[0])) for name, (A, B) in _split(ts, path).items()
        }
    return out


def _check(model: nn.Module, adapters: Adapters, source: str) -> dict[str, nn.Linear]:
    """The base ``nn.Linear`` of every adapted module; the first missing/mismatching module is an error."""
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    bases: dict[str, nn.Linear] = {}
    for name in sorted(adapters, key=lambda n: (n not in order, order.get(n, 0), n)):  # model order
        A, B, _ = adapters[name]
        module = modules.get(name)
        base = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(base, nn.Linear):
            found = "nothing" if module is None else type(module).__name__
            raise ValueError(f"{source}: module {name} is not a linear layer of this model (found {found})")
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
            raise ValueError(
                f"{source}: module {name} does not match this model: the file has lora_A {tuple(A.shape)} and "
                f"lora_B {tuple(B.shape)}, the layer is ({base.out_features}, {base.in_features}) "
                "(was the adapter made for another base model?)"
            )
        bases[name] = base
    return bases


def load_selora(
    pipe_or_model: Any, path: str | Path, kind: str = "selora", component: str | None = None
) -> dict[str, LoRALinear]:
    """Load an export back into selora layers at the saved ranks and scalings (to inspect or train on).

    ``pipe_or_model``: a pipeline / ``{"unet": ..., "text_encoder": ...}`` (each component gets its
    part of a diffusers file) or one model (then ``component`` picks the part of a diffusers file
    that holds several). ``path``: see :func:`read_export`. Adapted modules may be plain
    ``nn.Linear`` (wrapped) or existing adapters (replaced). Everything is checked before anything
    changes. The model is frozen except the loaded adapters. Returns ``{name: layer}`` (names
    prefixed ``"<component>."`` for a pipeline).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    found = read_export(path)
    if isinstance(pipe_or_model, nn.Module):
        if component is None:
            if len(found) != 1:
                raise ValueError(f"{path}: holds adapters for {sorted(found)}; pass component= to choose one")
            component = next(iter(found))
        if component not in found:
            raise ValueError(f"{path}: no adapters for component {component!r} (found {sorted(found)})")
        targets = {component: (pipe_or_model, found[component], "")}
    elif "" in found:
        raise ValueError(f"{path}: a PEFT adapter holds one model; pass that model, not a pipeline")
    else:
        models = components(pipe_or_model)
        unknown = sorted(set(found) - set(models))
        if unknown:
            raise ValueError(f"{path}: adapters for {unknown} but the pipeline has only {sorted(models)}")
        targets = {c: (models[c], found[c], c + ".") for c in COMPONENTS if c in found}
    checked = {c: _check(model, adapters, f"{path} [{c or 'model'}]") for c, (model, adapters, _) in targets.items()}
    loaded: dict[str, LoRALinear] = {}
    for c, (model, adapters, prefix) in targets.items():
        model.requires_grad_(False)
        new: dict[int, nn.Module] = {}
        modules = dict(model.named_modules())
        for name, (A, B, scaling) in adapters.items():
            base = checked[c][name]
            # the initial rows are overwritten; a private generator leaves the global RNG untouched
            layer = KINDS[kind](base, rank=A.shape[0], scale=scaling, generator=torch.Generator())
            w = base.weight
            layer.lora_A = nn.Parameter(A.to(dtype=w.dtype, device=w.device).clone())
            layer.lora_B = nn.Parameter(B.to(dtype=w.dtype, device=w.device).clone())
            new[id(modules[name])] = layer
            loaded[prefix + name] = layer
        replace_modules(model, new)
    return loaded


# ----------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_into(pipe_or_model: Any) -> Any:
    """Fold every adapter into its base weight in place: ``W0 + s B A`` (Eq. 1); returns the argument.

    Afterwards the model(s) hold plain ``nn.Linear`` layers again (same outputs, no selora modules),
    so ``save_pretrained`` writes an ordinary diffusers / transformers folder.
    """
    models = [pipe_or_model] if isinstance(pipe_or_model, nn.Module) else list(components(pipe_or_model).values())
    merged = 0
    for model in models:
        layers = lora_layers(model)
        replace_modules(model, {id(layer): layer.merge() for layer in layers.values()})
        merged += len(layers)
    if not merged:
        raise ValueError("merge_into: no LoRA/SeLoRA layer found to merge")
    return pipe_or_model


def save_merged(pipe_or_model: Any, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge the adapters (:func:`merge_into`, in place) and ``save_pretrained`` a safetensors folder.

    The folder is written next to ``out_dir`` and moved into place at the end; an existing
    non-empty ``out_dir`` is an error. ``dtype``: cast the merged model(s) to it before saving
    (``torch.float16`` halves the folder); default the model's own.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder; choose a new --out")
    merge_into(pipe_or_model)
    if dtype is not None:
        pipe_or_model.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        pipe_or_model.save_pretrained(tmp, safe_serialization=True)
    return out_dir


# ----------------------------------------------------------------------------- a training run
def export_run(
    run: str | Path, fmt: str, out: str | Path, adapters: str = "best", dtype: torch.dtype | None = None
) -> tuple[Path, Path]:
    """Export the adapters of a training run in ``fmt`` (:data:`FORMATS`) and write its model card.

    ``out``: the export folder (diffusers, peft, merged) or, for kohya, a ``.safetensors`` file or a
    folder (:func:`kohya_file`). ``adapters``: ``best`` or ``last``. ``dtype``: storage dtype (see the
    writers). The card (:mod:`selora.modelcard`) names the base model, method, ranks, parameters,
    config and the data's terms. Returns ``(what was written, the card)``.
    """
    from selora.modelcard import card_path, summarize, write_model_card
    from selora.rundir import load_run  # the reader of a training run directory

    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    target = kohya_file(run, out) if fmt == "kohya" else out
    if fmt == "merged" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; choose a new --out")
    cfg, pipe = load_run(run, adapters=adapters, device=torch.device("cpu"))
    summary = summarize(pipe)  # before a merge removes the adapters
    if fmt == "diffusers":
        written = save_diffusers_lora(pipe, out, dtype)
        files = [written.name]
    elif fmt == "peft":
        files = []
        for comp, model in components(pipe).items():
            if lora_layers(model):
                save_peft_adapter(model, out / comp, dtype)
                files += [f"{comp}/{PEFT_CONFIG_NAME}", f"{comp}/{PEFT_WEIGHT_NAME}"]
        written = out
    elif fmt == "merged":
        written = save_merged(pipe, out, dtype)
        files = sorted(p.name for p in written.iterdir())
    else:
        written = save_kohya_lora(pipe, target, dtype, metadata=kohya_metadata(cfg))
        files = [written.name]
    card = write_model_card(card_path(written if fmt == "kohya" else out, fmt), cfg, summary, fmt, files)
    return written, card


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would also print the usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m selora.export --run DIR --format diffusers|peft|merged|kohya --out DIR_OR_FILE``."""
    parser = _Parser(prog="python -m selora.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a training run directory (selora.train --out)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder; for kohya a .safetensors file or a folder (then <run name>.safetensors)",
    )
    parser.add_argument(
        "--adapters",
        choices=("best", "last"),
        default="best",
        help="the run's best adapters (lowest eval loss; default) or its last ones",
    )
    parser.add_argument(
        "--dtype", choices=STORAGE_DTYPES, default=None, help="storage dtype (default: the weights' own, float32)"
    )
    args = parser.parse_args(argv)
    from selora.models import no_loading_bars  # diffusers: loaded only when a run is exported

    try:
        dtype = DTYPES[args.dtype] if args.dtype else None
        with no_loading_bars():  # keep stderr to the one line that matters
            written, card = export_run(args.run, args.format, args.out, adapters=args.adapters, dtype=dtype)
    except (ValueError, TypeError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(err).split())}\n")
    print(f"wrote {written} and its model card {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
