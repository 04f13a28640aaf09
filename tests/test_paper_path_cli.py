"""Items 10, 6 and 12: the training CLI says which profile it runs in (stderr, main process only);
``selora.evaluate`` and the per-epoch evaluation choose metrics from the run's data and model, not
from the active profile; loading a pipeline raises no ``torch_dtype`` deprecation warning."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers.tiny_runs import tiny_config, tiny_overrides

import selora.metrics
from selora.config import ConfigError, load_config
from selora.evaluate import markdown, metric_fn, run_experiment
from selora.held_out import default_metrics, metric_profile
from selora.models import load_pipeline
from selora.train import main

pytestmark = pytest.mark.usefixtures("assets_cache")


def cli_sets(assets, **extra) -> list[str]:
    items = tiny_overrides(assets, epochs=1, batch_size=16, num_samples=0, **extra)
    return [a for item in items for a in ("--set", item)]


# -- item 10: the profile line ----------------------------------------------------------------------
def test_training_cli_prints_its_profile_on_stderr(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELORA_THREADS", "1")
    args = ["--config", "montgomery-offline", "--max-steps", "1", "--no-progress", *cli_sets(assets, method="lora")]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 1  # stdout: the JSON summary and nothing else
    lines = [ln for ln in err.splitlines() if ln.startswith("selora.train:")]
    assert len(lines) == 1, err
    assert all(f in lines[0] for f in ("profile=offline", "device=cpu", "threads=1", "method=lora")), lines[0]
    # another process of a torchrun job stays quiet
    monkeypatch.setenv("RANK", "1")
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    assert "selora.train:" not in capsys.readouterr().err


# -- item 6: metrics from the run's config --------------------------------------------------------
@pytest.fixture
def fake_metrics(monkeypatch):
    """Every metric loader replaced by a recorder (no download, no proxy weights)."""
    called = []

    def fake(name):
        def fn(*args, **kwargs):
            called.append(name)
            return 1.0

        return fn

    for name in ("inception_fid", "clip_score", "fid_proxy", "alignment_proxy"):
        monkeypatch.setattr(selora.metrics, name, fake(name))
    return called


def real_config(assets, tmp_path):
    """A run on real (Montgomery-layout) data with a local pipeline folder: FID / CLIP score."""
    return load_config("montgomery-offline", tiny_overrides(assets, dataset="montgomery"))


@pytest.mark.parametrize("profile", ["offline", "paper"])
def test_metrics_follow_the_run_config_not_the_profile(assets, tmp_path, monkeypatch, fake_metrics, profile):
    monkeypatch.setenv("SELORA_PROFILE", profile)
    phantom, real = tiny_config(assets), real_config(assets, tmp_path)
    mini = load_config("montgomery-offline", tiny_overrides(assets, dataset="montgomery", model="mini-sd"))
    assert [metric_profile(c) for c in (phantom, mini, real)] == ["offline", "offline", "paper"]
    images, prompts = torch.zeros(2, 1, 16, 16), ["a", "b"]
    assert set(metric_fn(phantom)(images, prompts, images)) == {"fid_proxy", "alignment_proxy"}
    assert fake_metrics == ["fid_proxy", "alignment_proxy"]
    fake_metrics.clear()
    assert set(metric_fn(real)(images, prompts, images)) == {"fid", "clip_score"}
    assert fake_metrics == ["inception_fid", "clip_score"]
    # the per-epoch evaluation: proxies for phantom data / the mini SD, none (4-image grids) on real data
    assert set(default_metrics(phantom)) == {"fid_proxy", "alignment_proxy"} == set(default_metrics(mini))
    assert default_metrics(real) == {}


def test_results_are_labelled_by_the_metrics_they_used(assets, tmp_path, monkeypatch, fake_metrics):
    """Phantom data on a GPU (paper profile): proxies, labelled as proxies; a real-data run in the
    offline profile cannot download FID / CLIP weights and is refused before any training."""
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    overrides = tiny_overrides(assets, epochs=1, batch_size=16, num_samples=0, sample_steps=2)
    results = run_experiment(["lora"], [0], tmp_path / "exp", overrides=overrides, limit=2, progress=False)
    assert set(results["runs"][0]["metrics"]) == {"fid_proxy", "alignment_proxy"}
    prov = results["provenance"]
    assert prov["metric_profile"] == "offline" and set(prov["metrics"]) == {"frechet", "alignment"}
    assert "proxy metrics, not comparable" in markdown(results) and "profile: paper" in markdown(results)
    monkeypatch.setenv("SELORA_PROFILE", "offline")
    real = tiny_overrides(assets, dataset="montgomery", epochs=1, batch_size=16, num_samples=0)
    with pytest.raises(ConfigError, match="FID / CLIP score.*offline"):
        run_experiment(["lora"], [0], tmp_path / "exp2", overrides=real, limit=2, progress=False)
    assert not (tmp_path / "exp2" / "runs" / "lora-seed0").exists()


# -- item 12: no torch_dtype deprecation ----------------------------------------------------------
def test_loading_the_mini_sd_raises_no_torch_dtype_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline("mini-sd", torch.float32, "cpu")
    assert [str(w.message) for w in caught if "torch_dtype" in str(w.message)] == []
    assert pipe.unet.dtype == torch.float32


def test_loading_in_half_precision_still_gives_half_weights(assets):
    pipe = load_pipeline(str(assets["model"]), torch.bfloat16, "cpu")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
