"""Config loading and validation: shipped configs, --set overrides, one-line errors."""
from __future__ import annotations

import pytest
import yaml

from selora.config import CONFIGS_DIR, DEFAULTS, FIELDS, ConfigError, config_path, load_config, parse_override

SHIPPED = ("montgomery-offline", "montgomery-paper", "iuxray-paper")


def test_every_key_has_a_default_and_every_shipped_config_spells_out_every_key():
    assert set(DEFAULTS) == set(FIELDS)
    for name in SHIPPED:
        data = yaml.safe_load(config_path(name).read_text())
        assert set(data) == set(FIELDS), f"{name}: keys differ from FIELDS"


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
    assert cfg.interval == 7 and cfg.lr == 3e-4 and cfg.threshold == DEFAULTS["threshold"]
    with pytest.raises(ConfigError, match=r"no such file and not a shipped config \(one of: iuxray-paper, montgomery-offline"):
        load_config("montgomery-nope")
    assert {p.stem for p in CONFIGS_DIR.glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize(
    "text, message",
    [
        ("intervall: 3\n", "unknown key 'intervall'"),
        ("interval: 2.5\n", "key 'interval': expected int, got float 2.5"),
        ("interval: true\n", "key 'interval': expected int, got bool True"),
        ("interval: 0\n", "key 'interval': expected a value >= 1, got 0"),
        ("lr: fast\n", "key 'lr': expected int or float, got str 'fast'"),
        ("method: dora\n", "key 'method': expected one of selora, lora"),
        ("mixed_precision: fp8\n", "key 'mixed_precision': expected one of no, fp16, bf16"),
        ("unet_targets: []\n", "key 'unet_targets': expected a non-empty list of strings"),
        ("prompt_dropout: 1.5\n", "key 'prompt_dropout': expected a probability"),
        ("eval_split: validation\n", "Montgomery has no validation split"),
        ("data_root: does/not/exist\n", "key 'data_root': no such folder"),
        ("model: no/such/pipeline\n", "key 'model': expected mini-sd or sd-v1-5 or a diffusers pipeline folder"),
        ("debug_nan_steps: [0]\n", "key 'debug_nan_steps': expected a list of batch numbers >= 1"),
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
    ],
)
def test_bad_override(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("montgomery-offline", [item])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("montgomery-offline", ["interval=5", "sample_prompts=[a chest x-ray, another]"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert path.read_text().startswith("# resolved from montgomery-offline.yaml with --set interval=5")
    assert load_config(path).values == cfg.values
    with pytest.raises(AttributeError):
        cfg.no_such_key
