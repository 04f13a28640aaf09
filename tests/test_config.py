"""Config loading and validation: shipped configs, --set overrides, one-line errors."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from selora.config import (
    CONFIGS_DIR,
    KEYS,
    ConfigError,
    TrainConfig,
    coerce,
    config_fields,
    config_path,
    is_offline_demo,
    load_config,
    parse_override,
    read_config_file,
)
from selora.data import DATASETS, open_dataset
from selora.methods import METHODS

SHIPPED = tuple(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))  # every shipped config
DEFAULTS = TrainConfig().to_dict()


def test_every_key_has_help_and_a_default_of_its_declared_type():
    assert len(KEYS) == 38 and KEYS == tuple(DEFAULTS)
    assert "source" not in KEYS and "overrides" not in KEYS
    for f in config_fields():
        assert f.metadata["help"].strip(), f"{f.name}: no help text"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value = coerce(f.name, default, "default")  # raises if the default is not of the declared type
        assert value == default and type(value) is type(default), f.name
    assert TrainConfig.__dataclass_fields__["method"].metadata["choices"] == tuple(METHODS)
    assert (DEFAULTS["threshold"], DEFAULTS["start_rank"], DEFAULTS["lora_rank"]) == (1.1, 1, 4)


def test_shipped_configs_list_only_what_differs_from_the_defaults():
    for name in SHIPPED:
        data = read_config_file(config_path(name))
        assert data, name
        same = [k for k, v in data.items() if v == DEFAULTS[k]]
        assert not same, f"{name}: restates the defaults of {same}"
        assert set(data) == set(yaml.safe_load(config_path(name).read_text())), name


def test_shipped_configs_match_the_paper_where_the_paper_is_specific(tmp_path):
    paper = load_config("montgomery-paper")
    assert (paper.model, paper.dataset, paper.resolution, paper.epochs) == ("sd-v1-5", "montgomery", 224, 100)
    assert (paper.threshold, paper.interval, paper.start_rank, paper.lora_rank) == (1.1, 40, 1, 4)
    assert (paper.unet_targets, paper.text_encoder_targets) == ("paper-unet", "paper-text-encoder")
    offline = load_config("montgomery-offline")
    assert (offline.model, offline.dataset, offline.resolution) == ("mini-sd", "montgomery-phantom", 64)
    assert offline.mixed_precision == "no" and offline.threshold == 1.1
    with pytest.raises(ConfigError, match="IU X-ray has no downloader"):
        load_config("iuxray-paper")
    iu = load_config("iuxray-paper", [f"data_root={tmp_path}"])
    assert (iu.dataset, iu.eval_split, iu.epochs) == ("iuxray", "validation", 10)


def test_config_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("interval: 7\nlr: 3.0e-4\n")
    cfg = load_config(path)
    assert cfg.interval == 7 and cfg.lr == 3e-4 and cfg.threshold == TrainConfig().threshold
    with pytest.raises(
        ConfigError, match=r"no such file and not a shipped config \(one of: iuxray-paper, montgomery-offline"
    ):
        load_config("montgomery-nope")
    assert {p.stem for p in CONFIGS_DIR.glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize(
    "text, message",
    [
        ("intervall: 3\n", "unknown key 'intervall'"),
        ("interval: 2.5\n", "key 'interval': expected int, got float 2.5"),
        ("interval: true\n", "key 'interval': expected int, got bool True"),
        ("interval: 0\n", "key 'interval': expected a value >= 1, got 0"),
        ("lr: fast\n", "key 'lr': expected float, got str 'fast'"),
        ("lr: yes\n", "key 'lr': expected float, got bool True"),
        ("max_rank: 2.0\n", "key 'max_rank': expected int or null, got float 2.0"),
        ("gradient_checkpointing: 1\n", "key 'gradient_checkpointing': expected bool, got int 1"),
        ("unet_targets: {to_q: 1}\n", "key 'unet_targets': expected str or list of str, got dict {'to_q': 1}"),
        ("method: dora\n", "key 'method': expected one of selora, lora"),
        ("mixed_precision: fp8\n", "key 'mixed_precision': expected one of no, fp16, bf16"),
        ("mixed_precision: off\n", "key 'mixed_precision': expected one of no, fp16, bf16, got 'off'"),
        ("mixed_precision: null\n", "key 'mixed_precision': expected str, got NoneType None"),
        ("sample_prompts: [a, null]\n", "key 'sample_prompts': expected a non-empty list of strings"),
        ("method: adalora\nlora_rank: 7\n", "key 'lora_rank': AdaLoRA prunes from rank 6"),
        ("unet_targets: []\n", "key 'unet_targets': expected a non-empty list of strings"),
        ("prompt_dropout: 1.5\n", "key 'prompt_dropout': expected a probability"),
        ("eval_split: validation\n", "Montgomery has a validation split only with validation_fraction > 0"),
        ("data_root: does/not/exist\n", "key 'data_root': no such folder"),
        ("model: no/such/pipeline\n", "key 'model': expected mini-sd or sd-v1-5 or a diffusers pipeline folder"),
        ("- a\n- b\n", "expected a mapping of keys to values, got list"),
        ("interval: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_file_is_one_line_error_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert message in msg and str(path) in msg and "\n" not in msg, msg


def test_overrides_are_parsed_as_yaml_with_float_fallback():
    assert parse_override("lr=1e-4") == ("lr", 1e-4)  # PyYAML alone would give the string "1e-4"
    assert parse_override("interval=10") == ("interval", 10)
    assert parse_override("unet_targets=[to_q, to_k]") == ("unet_targets", ["to_q", "to_k"])
    assert parse_override("text_encoder_targets=null") == ("text_encoder_targets", None)
    assert parse_override("gradient_checkpointing=true") == ("gradient_checkpointing", True)
    assert parse_override("gradient_checkpointing=no") == ("gradient_checkpointing", False)  # a bool key: YAML's no
    assert parse_override("max_rank=null") == ("max_rank", None)
    assert parse_override("lora_scale=2") == ("lora_scale", 2.0) and isinstance(
        parse_override("lora_scale=2")[1], float
    )
    cfg = load_config("montgomery-offline", ["threshold=1.05", "interval=10", "threshold=2"])
    assert (cfg.threshold, cfg.interval) == (2.0, 10) and isinstance(cfg.threshold, float)
    assert cfg.overrides == ["threshold=1.05", "interval=10", "threshold=2"]


@pytest.mark.parametrize(
    "item, message",
    [
        ("interval", "expected key=value"),
        ("colour=red", "unknown key 'colour'"),
        ("interval=ten", "--set interval=ten: key 'interval': expected int, got str 'ten'"),
        ("threshold=inf", "key 'threshold': expected a finite number"),
        ("threshold=.nan", "key 'threshold': expected a finite number"),
        ("lr=[1e-4]", "--set lr=[1e-4]: key 'lr': expected float, got list ['1e-4']"),
        ("max_rank=big", "--set max_rank=big: key 'max_rank': expected int or null, got str 'big'"),
        (
            "mixed_precision=false",
            "--set mixed_precision=false: key 'mixed_precision': expected one of no, fp16, bf16, got",
        ),
        ("mixed_precision=", "key 'mixed_precision': expected str, got NoneType None"),
    ],
)
def test_bad_override(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("montgomery-offline", [item])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("montgomery-offline", ["interval=5", "sample_prompts=[a chest x-ray, another]"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert path.read_text().startswith("# resolved from montgomery-offline.yaml with --set interval=5")
    again = load_config(path)
    assert again == cfg and again.to_dict() == cfg.to_dict() and list(again.to_dict()) == list(KEYS)
    assert again.source == str(path) and cfg.source.endswith("montgomery-offline.yaml")  # provenance: not compared
    assert set(SHIPPED) >= {"montgomery-offline", "montgomery-paper", "iuxray-paper"}
    for name in SHIPPED:  # every shipped config, resolved and written out, loads back equal
        sets = ["mixed_precision=no", "sample_prompts=[yes, 'no', 1.5]", f"data_root={tmp_path}"]
        shipped = load_config(name, sets)
        path.write_text(shipped.to_yaml())
        assert load_config(path) == shipped and shipped.sample_prompts == ["yes", "no", "1.5"]
        assert load_config(path).to_dict() == shipped.to_dict()
    assert not hasattr(cfg, "no_such_key")


def test_mixed_precision_no_via_set_and_via_unquoted_yaml(tmp_path):
    cfg = load_config("montgomery-paper", ["mixed_precision=no"])
    assert cfg.mixed_precision == "no" and cfg.overrides == ["mixed_precision=no"]
    assert load_config("montgomery-paper", ["mixed_precision='no'"]).mixed_precision == "no"
    assert load_config("montgomery-paper", ['mixed_precision="no"']).mixed_precision == "no"
    path = tmp_path / "mine.yaml"
    path.write_text("mixed_precision: no\nmodel: sd-v1-5\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, ["mixed_precision=bf16"]).mixed_precision == "bf16"


def test_config_is_frozen_and_replace_coerces_and_validates():
    cfg = load_config("montgomery-offline")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    faster = dataclasses.replace(cfg, lr=1, interval=10)
    assert (faster.lr, faster.interval, cfg.lr) == (1.0, 10, 1e-3) and isinstance(faster.lr, float)
    assert faster.source == cfg.source and faster != cfg
    with pytest.raises(ConfigError, match="montgomery-offline.yaml: key 'interval': expected int, got str 'ten'"):
        dataclasses.replace(cfg, interval="ten")
    with pytest.raises(ConfigError, match="key 'prompt_dropout': expected a probability"):
        dataclasses.replace(cfg, prompt_dropout=2)
    assert TrainConfig() == load_config() and TrainConfig().source == "<defaults>"


def test_method_check_names_the_key_and_the_source():
    assert load_config("montgomery-offline", ["method=adalora", "lora_rank=6"]).lora_rank == 6
    with pytest.raises(ConfigError) as err:
        load_config("montgomery-offline", ["method=adalora", "lora_rank=7"])
    msg = str(err.value)
    assert msg.startswith(
        str(config_path("montgomery-offline")) + " (with --set method=adalora lora_rank=7): key 'lora_rank': "
    )
    assert "expected lora_rank <= 6, got 7" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"load_config\(base=\.\.\.\): key 'seed': expected int, got str 'x'"):
        load_config(base={"seed": "x"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval_split=validation"], "Montgomery has a validation split only with validation_fraction > 0"),
        (["validation_fraction=0.2"], "got 'test' with validation_fraction=0.2"),
        (["eval_split=validation", "validation_fraction=1.0"], "key 'validation_fraction': expected a share below 1"),
    ],
)
def test_a_montgomery_validation_split_needs_its_share(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("montgomery-offline", overrides)
    cfg = load_config("montgomery-offline", ["eval_split=validation", "validation_fraction=0.2"])
    assert (cfg.eval_split, cfg.validation_fraction) == ("validation", 0.2)


# -- data sets: the registry is the one place that names them -------------------------------------
def test_every_registered_data_set_is_a_choice_and_opens_through_its_entry(monkeypatch):
    assert config_fields()[KEYS.index("dataset")].metadata["choices"] == tuple(DATASETS)
    cfg = load_config("montgomery-offline")
    opened = []
    entry = dataclasses.replace(DATASETS[cfg.dataset], open=lambda c, split: opened.append((c, split)) or "split")
    monkeypatch.setitem(DATASETS, cfg.dataset, entry)
    assert open_dataset(cfg, "train") == "split" and opened == [(cfg, "train")]


def test_a_data_sets_own_rules_are_checked_naming_the_source(monkeypatch):
    def refuse(cfg):
        raise ValueError("key 'resolution': this set comes at 128 px only")

    entry = dataclasses.replace(DATASETS["montgomery-phantom"], check_config=refuse)
    monkeypatch.setitem(DATASETS, "montgomery-phantom", entry)
    with pytest.raises(ConfigError, match=r"montgomery-offline.yaml: key 'resolution': this set comes at 128 px only"):
        load_config("montgomery-offline")


def test_an_offline_demo_is_the_shipped_model_or_generated_data(monkeypatch, tmp_path):
    real = load_config(base={"model": "sd-v1-5", "dataset": "montgomery"})
    assert not is_offline_demo(real) and is_offline_demo(dataclasses.replace(real, model="mini-sd"))
    assert is_offline_demo(dataclasses.replace(real, dataset="montgomery-phantom"))
    monkeypatch.setitem(DATASETS, "montgomery", dataclasses.replace(DATASETS["montgomery"], generated="drawn scans"))
    assert is_offline_demo(real)
