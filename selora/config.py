"""Training configuration: :class:`TrainConfig`, one typed declaration per key, loading and validation.

A config is a YAML mapping of some of the keys of :class:`TrainConfig`; keys it leaves out take the
declared defaults. ``--config`` takes a file path or the name of a shipped config
(``montgomery-offline``, ``montgomery-paper``, ``iuxray-paper`` in ``selora/configs/``, each listing
only what differs from the defaults). ``--set key=value`` overrides one key; the value is read as
YAML (``--set interval=10``, ``--set unet_targets=[to_q,to_k]``). File and ``--set`` values are
coerced to the declared type: a ``str`` key takes the text as written (``--set mixed_precision=no``
is ``"no"``, not YAML's ``False``), a ``float`` key takes ints and ``1e-4``. Every problem (unknown
key, uncoercible value, value out of range, missing data root, a method that cannot train with the
settings) is a one-line :class:`ConfigError` raised before any work starts.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from selora.core.criteria import CRITERIA, LAMBDA, FIRatio
from selora.core.expansion import INTERVAL
from selora.data.registry import DATASETS
from selora.dtypes import AUTOCAST
from selora.methods import METHODS
from selora.paths import PACKAGE_DIR

CONFIGS_DIR = PACKAGE_DIR / "configs"
#: The base model shipped for offline (CPU-only) runs.
OFFLINE_MODEL = "mini-sd"
#: ``model`` values that name a base model; anything else is a local diffusers pipeline folder.
MODELS = (OFFLINE_MODEL, "sd-v1-5")

_NULL_TAG = "tag:yaml.org,2002:null"


class ConfigError(ValueError):
    """A bad configuration; the message names the file/option, the key and what was expected."""


def option(default: Any, help: str, choices: Sequence[Any] | None = None, minimum: float | None = None) -> Any:
    """The declaration of one config key: its default, one-line help, allowed values and lower bound.

    ``minimum`` bounds a number. A list default is copied per config.
    """
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "minimum": minimum}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """A validated training config: one attribute per key, plus where it came from.

    Build one with :func:`load_config`, change one with ``dataclasses.replace(cfg, key=value)``;
    both coerce and validate every key (:class:`ConfigError`). ``source`` and ``overrides`` are
    not keys and do not take part in ``==``.
    """

    # what to fine-tune on what
    model: str = option("mini-sd", "base model: mini-sd (shipped, offline), sd-v1-5 (hub) or a local pipeline folder")
    dataset: str = option("montgomery-phantom", "training data (see selora.data.DATASETS)", choices=tuple(DATASETS))
    data_root: str | None = option(None, "folder holding the data set (null: phantom / download)")
    split_seed: int = option(0, "seed of the train/test split", minimum=0)
    eval_split: str = option("test", "held-out split evaluated after each epoch", choices=("test", "validation"))
    validation_fraction: float = option(
        0.0,
        "Montgomery: share of the training scans held out for eval_split=validation (0: the paper's 80/20)",
        minimum=0,
    )
    resolution: int = option(64, "image side in pixels", minimum=8)
    # adapters
    method: str = option("selora", "adapter method (see selora.methods.METHODS)", choices=tuple(METHODS))
    unet_targets: str | list[str] = option("paper-unet", "inject preset or module names for the UNet")
    text_encoder_targets: str | list[str] | None = option(
        "paper-text-encoder", "preset/names for the text encoder (null: frozen)"
    )
    start_rank: int = option(1, "SeLoRA initial rank", minimum=1)
    lora_rank: int = option(4, "LoRA rank", minimum=1)
    max_rank: int | None = option(None, "SeLoRA rank cap (null: min(in, out))", minimum=1)
    lora_scale: float = option(1.0, "adapter scaling, fixed")
    threshold: float = option(LAMBDA, "lambda: expand when FI_exp / FI_orig >= threshold (Eq. 5)")
    interval: int = option(INTERVAL, "t: test for expansion every t optimizer steps", minimum=1)
    criterion: str = option(
        FIRatio.name,
        "SeLoRA expansion test: fi-ratio (the paper's Eq. 5) or signal (book ch. 9)",
        choices=tuple(CRITERIA),
    )
    signal_alpha: float = option(0.001, "signal test: false-expansion rate per layer and test on pure noise", minimum=0)
    signal_window: int = option(
        10, "signal test: capture the last N steps of each interval (1: the test step only)", minimum=1
    )
    # optimisation
    lr: float = option(1.0e-4, "AdamW learning rate", minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    lr_scheduler: str = option("constant", "learning-rate schedule after warm-up", choices=("constant", "cosine"))
    warmup_steps: int = option(0, "linear warm-up steps", minimum=0)
    batch_size: int = option(8, "global batch size (split over processes)", minimum=1)
    epochs: int = option(100, "training epochs", minimum=1)
    seed: int = option(0, "seed of adapters, noise, data order and K", minimum=0)
    prompt_dropout: float = option(0.0, "probability of an empty prompt (classifier-free guidance)", minimum=0)
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (null: off)", minimum=0)
    mixed_precision: str = option("no", "autocast dtype of the frozen models (GPU only)", choices=tuple(AUTOCAST))
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    num_workers: int = option(0, "DataLoader workers for the one-off preprocessing pass", minimum=0)
    # bookkeeping
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: at epoch ends only)", minimum=0)
    eval_every: int = option(1, "evaluate every N epochs", minimum=1)
    num_samples: int = option(4, "images in the sample grid at each evaluation (0: none)", minimum=0)
    sample_prompts: list[str] | None = option(None, "prompts of the sample grid (null: from the held-out split)")
    sample_steps: int = option(25, "denoising steps of the sample grid", minimum=1)
    guidance_scale: float = option(7.5, "classifier-free guidance of the sample grid", minimum=0)
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row", minimum=1)
    # provenance (not keys)
    source: str = field(default="<defaults>", compare=False)
    overrides: list[str] = field(default_factory=list, compare=False)

    def __post_init__(self) -> None:
        where = self.source if not self.overrides else f"{self.source} (with --set {' '.join(self.overrides)})"
        for f in config_fields():
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), where))
        object.__setattr__(self, "overrides", list(self.overrides))
        _check_rules(self, where)

    def to_dict(self) -> dict[str, Any]:
        """``{key: value}`` of every key, in declaration order (lists copied)."""
        return {f.name: _copy(getattr(self, f.name)) for f in config_fields()}

    def to_yaml(self) -> str:
        """The resolved config as YAML (every key), with its origin as a comment; loads back equal."""
        head = f"# resolved from {Path(self.source).name}"
        if self.overrides:
            head += f" with --set {' '.join(self.overrides)}"
        return head + "\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def config_fields() -> tuple[Field, ...]:
    """The dataclass fields of the config keys (not ``source``/``overrides``), in declaration order."""
    return tuple(f for f in fields(TrainConfig) if "help" in f.metadata)


_TYPES: dict[str, Any] = get_type_hints(TrainConfig)
#: The config keys, in declaration order.
KEYS: tuple[str, ...] = tuple(f.name for f in config_fields())
#: Keys that run folders written by earlier versions hold and that are no longer settings (ignored on reading).
RETIRED_KEYS = ("debug_nan_steps",)
_FIELD: dict[str, Field] = {f.name: f for f in config_fields()}


def _alternatives(key: str) -> tuple[Any, ...]:
    """The declared type of ``key`` as a tuple of alternatives (``str | None`` -> (str, NoneType))."""
    tp = _TYPES[key]
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return f"list of {get_args(tp)[0].__name__}"
    return tp.__name__


def expected_type(key: str) -> str:
    """The declared type of ``key`` in words: ``"str or list of str or null"``."""
    return " or ".join(_type_name(t) for t in _alternatives(key))


def coerce(key: str, value: Any, where: str) -> Any:
    """``value`` as ``key``'s declared type, range-checked; a ConfigError naming ``where`` and ``key`` if it cannot be.

    Ints are accepted for floats (converted), as are strings like ``"1e-4"``; bools are never numbers;
    paths are accepted for strings.
    """
    if key not in _FIELD:
        raise ConfigError(f"{where}: unknown key {key!r}; expected one of {', '.join(KEYS)}")
    alts = _alternatives(key)
    fail = f"{where}: key {key!r}: expected"
    value = _convert(value, alts)
    if not any(_is_instance(value, t) for t in alts):
        raise ConfigError(f"{fail} {expected_type(key)}, got {type(value).__name__} {value!r}")
    meta = _FIELD[key].metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{fail} a finite number, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{fail} one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    minimum = meta["minimum"]
    if isinstance(value, list):
        return _checked_list(value, fail)
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
        raise ConfigError(f"{fail} a value >= {minimum:g}, got {value!r}")
    return value


def _convert(value: Any, alts: tuple[Any, ...]) -> Any:
    """``value`` converted where the declared alternatives ``alts`` allow: a path to ``str``, an int or
    a numeric string (PyYAML reads ``1e-4`` as a string) to ``float``; anything else unchanged."""
    if str in alts and isinstance(value, os.PathLike):
        return os.fspath(value)
    if float not in alts:
        return value
    if _is_int(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _checked_list(value: list, fail: str) -> list[str]:
    """A copy of ``value``, a list key's value, once it is a non-empty list of non-empty strings
    (every list key is a list of strings; ``fail``: the message's start)."""
    if not (value and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"{fail} a non-empty list of strings, got {value!r}")
    return list(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_instance(value: Any, tp: Any) -> bool:
    """``isinstance`` for the declared alternatives: a list type checks only that it is a list
    (elements are checked by :func:`coerce`), an ``int`` is never a bool."""
    if get_origin(tp) is list:
        return isinstance(value, list)
    if tp is int:
        return _is_int(value)
    return isinstance(value, tp)


def _check_rules(cfg: TrainConfig, where: str) -> None:
    """The cross-key rules and the method's own check (``Adapters.check_config``)."""
    if cfg.prompt_dropout > 1:
        raise ConfigError(
            f"{where}: key 'prompt_dropout': expected a probability in [0, 1], got {cfg.prompt_dropout!r}"
        )
    if cfg.model not in MODELS and not (Path(cfg.model) / "model_index.json").is_file():
        raise ConfigError(
            f"{where}: key 'model': expected {' or '.join(MODELS)} or a diffusers pipeline folder "
            f"(with model_index.json), got {cfg.model!r}"
        )
    root = cfg.data_root
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"{where}: key 'data_root': no such folder {root!r}")
    if not cfg.validation_fraction < 1:
        raise ConfigError(
            f"{where}: key 'validation_fraction': expected a share below 1, got {cfg.validation_fraction}"
        )
    try:
        DATASETS[cfg.dataset].check_config(cfg)
        METHODS[cfg.method].check_config(cfg)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def is_offline_demo(cfg: TrainConfig) -> bool:
    """Whether a run is an offline demo: on the shipped mini SD or on data this package generates
    (:attr:`selora.data.DataSet.generated`). Such a run is scored with the offline proxies and its
    model card says what it is."""
    return cfg.model == OFFLINE_MODEL or DATASETS[cfg.dataset].generated is not None


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


def _node_value(key: str, node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    """The Python value of YAML ``node`` for ``key``: where the key (or its list elements) is a
    string, a plain scalar is taken as written (``no`` -> ``"no"``, ``1.0`` -> ``"1.0"``), not as
    YAML 1.1 reads it; ``null`` stays None."""
    alts = _alternatives(key)
    if isinstance(node, yaml.ScalarNode) and str in alts and node.tag != _NULL_TAG:
        return node.value
    if isinstance(node, yaml.SequenceNode) and list[str] in alts:
        return [
            item.value
            if isinstance(item, yaml.ScalarNode) and item.tag != _NULL_TAG
            else loader.construct_object(item, deep=True)
            for item in node.value
        ]
    return loader.construct_object(node, deep=True)


def _parse_yaml(text: str, where: str, key: str | None = None) -> Any:
    """``text`` as YAML: with ``key``, the value of that key (:func:`_node_value`); without, a
    ``{key: value}`` mapping of a config file (unknown keys refused)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if key is not None:
            return None if node is None else _node_value(key, node, loader)
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            got = type(loader.construct_object(node, deep=True)).__name__
            raise ConfigError(f"{where}: expected a mapping of keys to values, got {got}")
        out = {}
        for key_node, value_node in node.value:
            name = loader.construct_object(key_node, deep=True)
            if name in RETIRED_KEYS:
                continue
            if not isinstance(name, str) or name not in _FIELD:
                raise ConfigError(f"{where}: unknown key {name!r}; expected one of {', '.join(KEYS)}")
            out[name] = _node_value(name, value_node, loader)
        return out
    finally:
        loader.dispose()


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value read as YAML and coerced to the key's type); a ConfigError if it cannot be."""
    key, sep, text = item.partition("=")
    key = key.strip()
    where = f"--set {item}"
    if not sep or not key:
        raise ConfigError(f"{where}: expected key=value")
    if key not in _FIELD:
        raise ConfigError(f"{where}: unknown key {key!r}; expected one of {', '.join(KEYS)}")
    try:
        value = _parse_yaml(text, where, key) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, coerce(key, value, where)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The ``{key: value}`` a config file sets, each value coerced to its key's type. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        loaded = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return {k: coerce(k, v, str(path)) for k, v in loaded.items()}


def load_config(
    name_or_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a config (file, shipped name, or ``base`` values), apply ``--set`` overrides, validate.

    Keys set nowhere take the :class:`TrainConfig` defaults. Raises :class:`ConfigError`.
    """
    values: dict[str, Any] = {}
    source = "<defaults>"
    if name_or_path is not None:
        path = config_path(name_or_path)
        source = str(path)
        values.update(read_config_file(path))
    if base is not None:
        values.update({k: coerce(k, v, "load_config(base=...)") for k, v in base.items()})
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    return TrainConfig(**values, source=source, overrides=list(overrides))


__all__ = [
    "CONFIGS_DIR",
    "KEYS",
    "MODELS",
    "OFFLINE_MODEL",
    "ConfigError",
    "TrainConfig",
    "coerce",
    "config_fields",
    "config_path",
    "expected_type",
    "is_offline_demo",
    "load_config",
    "option",
    "parse_override",
    "read_config_file",
]
