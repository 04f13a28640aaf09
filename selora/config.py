"""Training configuration: the keys, their types and defaults, loading and validation.

A config is a YAML mapping of the keys in :data:`FIELDS`; ``--config`` takes a file path or the
name of a shipped config (``montgomery-offline``, ``montgomery-paper``, ``iuxray-paper`` in
``selora/configs/``). ``--set key=value`` overrides one key (the value is read as YAML:
``--set interval=10``, ``--set unet_targets=[to_q,to_k]``). Every problem (unknown key, wrong
type, value out of range, missing data root) is a one-line :class:`ConfigError` raised before any
work starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from selora.paths import PACKAGE_DIR

CONFIGS_DIR = PACKAGE_DIR / "configs"
#: ``model`` values that name a base model; anything else is a local diffusers pipeline folder.
MODELS = ("mini-sd", "sd-v1-5")
#: ``dataset`` values: the phantom Montgomery set (made on first use), the real one, IU X-ray.
DATASETS = ("montgomery-phantom", "montgomery", "iuxray")


class ConfigError(ValueError):
    """A bad configuration; the message names the file/option, the key and what was expected."""


@dataclass(frozen=True)
class Spec:
    """One key: accepted types, optional choices and lower bound, and a one-line description."""

    types: tuple[type, ...]
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    list_of_str: bool = False  # a list value must hold strings


_NUM = (int, float)
FIELDS: dict[str, Spec] = {
    # what to fine-tune on what
    "model": Spec((str,), "base model: mini-sd (shipped, offline), sd-v1-5 (hub) or a local pipeline folder"),
    "dataset": Spec((str,), "training data", choices=DATASETS),
    "data_root": Spec((str, type(None)), "folder holding the data set (null: phantom / download)"),
    "split_seed": Spec((int,), "seed of the train/test split", minimum=0),
    "eval_split": Spec((str,), "held-out split evaluated after each epoch", choices=("test", "validation")),
    "resolution": Spec((int,), "image side in pixels", minimum=8),
    # adapters
    "method": Spec((str,), "adapter method (see selora.train.METHODS)"),
    "unet_targets": Spec((str, list), "inject preset or module names for the UNet", list_of_str=True),
    "text_encoder_targets": Spec((str, list, type(None)), "preset/names for the text encoder (null: frozen)",
                                 list_of_str=True),
    "start_rank": Spec((int,), "SeLoRA initial rank", minimum=1),
    "lora_rank": Spec((int,), "LoRA rank", minimum=1),
    "max_rank": Spec((int, type(None)), "SeLoRA rank cap (null: min(in, out))", minimum=1),
    "lora_scale": Spec(_NUM, "adapter scaling, fixed"),
    "threshold": Spec(_NUM, "lambda: expand when FI_exp / FI_orig >= threshold (Eq. 5)"),
    "interval": Spec((int,), "t: test for expansion every t optimizer steps", minimum=1),
    # optimisation
    "lr": Spec(_NUM, "AdamW learning rate", minimum=0),
    "weight_decay": Spec(_NUM, "AdamW weight decay", minimum=0),
    "lr_scheduler": Spec((str,), "learning-rate schedule after warm-up", choices=("constant", "cosine")),
    "warmup_steps": Spec((int,), "linear warm-up steps", minimum=0),
    "batch_size": Spec((int,), "global batch size (split over processes)", minimum=1),
    "epochs": Spec((int,), "training epochs", minimum=1),
    "seed": Spec((int,), "seed of adapters, noise, data order and K", minimum=0),
    "prompt_dropout": Spec(_NUM, "probability of an empty prompt (classifier-free guidance)", minimum=0),
    "max_grad_norm": Spec(_NUM + (type(None),), "gradient clipping norm (null: off)", minimum=0),
    "mixed_precision": Spec((str,), "autocast dtype of the frozen models (GPU only)", choices=("no", "fp16", "bf16")),
    "gradient_checkpointing": Spec((bool,), "recompute activations in backward"),
    "num_workers": Spec((int,), "DataLoader workers for the one-off preprocessing pass", minimum=0),
    # bookkeeping
    "checkpoint_every": Spec((int,), "also checkpoint every N steps (0: at epoch ends only)", minimum=0),
    "eval_every": Spec((int,), "evaluate every N epochs", minimum=1),
    "num_samples": Spec((int,), "images in the sample grid at each evaluation (0: none)", minimum=0),
    "sample_prompts": Spec((list, type(None)), "prompts of the sample grid (null: from the held-out split)",
                           list_of_str=True),
    "sample_steps": Spec((int,), "denoising steps of the sample grid", minimum=1),
    "guidance_scale": Spec(_NUM, "classifier-free guidance of the sample grid", minimum=0),
    "max_bad_steps": Spec((int,), "stop after this many non-finite steps in a row", minimum=1),
    "debug_nan_steps": Spec((list,), "TEST HOOK: make the loss NaN on these batches (1-based count of batches drawn)"),
}

DEFAULTS: dict[str, Any] = {
    "model": "mini-sd",
    "dataset": "montgomery-phantom",
    "data_root": None,
    "split_seed": 0,
    "eval_split": "test",
    "resolution": 64,
    "method": "selora",
    "unet_targets": "paper-unet",
    "text_encoder_targets": "paper-text-encoder",
    "start_rank": 1,
    "lora_rank": 4,
    "max_rank": None,
    "lora_scale": 1.0,
    "threshold": 1.1,
    "interval": 40,
    "lr": 1.0e-4,
    "weight_decay": 0.0,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "batch_size": 8,
    "epochs": 100,
    "seed": 0,
    "prompt_dropout": 0.0,
    "max_grad_norm": 1.0,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "num_workers": 0,
    "checkpoint_every": 0,
    "eval_every": 1,
    "num_samples": 4,
    "sample_prompts": None,
    "sample_steps": 25,
    "guidance_scale": 7.5,
    "max_bad_steps": 5,
    "debug_nan_steps": [],
}

@dataclass
class TrainConfig:
    """A validated config: ``values`` (every key of :data:`FIELDS`) and where it came from."""

    values: dict[str, Any]
    source: str = "<defaults>"
    overrides: list[str] = field(default_factory=list)

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    def to_yaml(self) -> str:
        """The resolved config as YAML (every key), with its origin as a comment."""
        head = f"# resolved from {Path(self.source).name}" + (f" with --set {' '.join(self.overrides)}" if self.overrides else "")
        return head + "\n" + yaml.safe_dump(self.values, sort_keys=False)


def config_path(name_or_path: str | Path) -> Path:
    """A config file path: an existing path, or the name of a shipped config (``montgomery-offline``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"--config {name_or_path}: no such file and not a shipped config (one of: {names})")


def _check_value(key: str, value: Any, where: str) -> Any:
    """``value`` if it fits ``FIELDS[key]`` (ints accepted for floats), else a ConfigError."""
    spec = FIELDS[key]
    expected = " or ".join("null" if t is type(None) else t.__name__ for t in spec.types)
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok:
        raise ConfigError(f"{where}: key {key!r}: expected {expected}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: key {key!r}: expected a finite number, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{where}: key {key!r}: expected one of {', '.join(map(str, spec.choices))}, got {value!r}")
    if spec.minimum is not None and isinstance(value, (int, float)) and value < spec.minimum:
        raise ConfigError(f"{where}: key {key!r}: expected a value >= {spec.minimum:g}, got {value!r}")
    if isinstance(value, list):
        if spec.list_of_str and not (value and all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"{where}: key {key!r}: expected a non-empty list of strings, got {value!r}")
        if key == "debug_nan_steps" and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            raise ConfigError(f"{where}: key {key!r}: expected a list of batch numbers >= 1, got {value!r}")
    return float(value) if float in spec.types and isinstance(value, int) and not isinstance(value, bool) else value


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, YAML-parsed value); numbers like ``1e-4`` are read as floats."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item}: expected key=value")
    if key not in FIELDS:
        raise ConfigError(f"--set {item}: unknown key {key!r}; expected one of {', '.join(FIELDS)}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and float in FIELDS[key].types:
        try:
            value = float(value)  # PyYAML reads "1e-4" as a string
        except ValueError:
            pass
    return key, value


def validate(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Type- and range-check every key and the cross-key rules; returns the normalised values."""
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(FIELDS)}")
    out = {k: _check_value(k, values[k], where) for k in FIELDS}
    from selora.train import METHODS  # the registry lives with the trainer

    if out["method"] not in METHODS:
        raise ConfigError(f"{where}: key 'method': expected one of {', '.join(METHODS)}, got {out['method']!r}")
    if out["prompt_dropout"] > 1:
        raise ConfigError(f"{where}: key 'prompt_dropout': expected a probability in [0, 1], got {out['prompt_dropout']!r}")
    if out["model"] not in MODELS and not (Path(out["model"]) / "model_index.json").is_file():
        raise ConfigError(
            f"{where}: key 'model': expected {' or '.join(MODELS)} or a diffusers pipeline folder "
            f"(with model_index.json), got {out['model']!r}"
        )
    root = out["data_root"]
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"{where}: key 'data_root': no such folder {root!r}")
    if root is None and out["dataset"] == "iuxray":
        raise ConfigError(f"{where}: key 'data_root': IU X-ray has no downloader; set it to the folder holding the set")
    if out["dataset"] == "iuxray" and out["eval_split"] != "validation":
        raise ConfigError(f"{where}: key 'eval_split': IU X-ray selects the best epoch on 'validation'")
    if out["dataset"] != "iuxray" and out["eval_split"] != "test":
        raise ConfigError(f"{where}: key 'eval_split': Montgomery has no validation split (paper: 80/20); use 'test'")
    return out


def load_config(
    name_or_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a config (file, shipped name, or ``base`` values), apply ``--set`` overrides, validate.

    Keys missing from the file take :data:`DEFAULTS`. Raises :class:`ConfigError`.
    """
    values = dict(DEFAULTS)
    source = "<defaults>"
    if name_or_path is not None:
        path = config_path(name_or_path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        unknown = [k for k in loaded if k not in FIELDS]
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(FIELDS)}")
        values.update(loaded)
    if base is not None:
        values.update(base)
    for item in overrides:
        key, value = parse_override(item)
        _check_value(key, value, f"--set {item}")
        values[key] = value
    where = source if not overrides else f"{source} (with --set {' '.join(overrides)})"
    return TrainConfig(validate(values, where), source, list(overrides))


__all__ = [
    "CONFIGS_DIR",
    "ConfigError",
    "DATASETS",
    "DEFAULTS",
    "FIELDS",
    "MODELS",
    "TrainConfig",
    "config_path",
    "load_config",
    "parse_override",
    "validate",
]
