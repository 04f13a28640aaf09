"""Item 9: the loss target follows the scheduler's ``prediction_type``: eps for ``epsilon``, the
velocity ``get_velocity(z0, eps, t)`` for ``v_prediction`` (training and held-out loss); anything
else is refused with a one-line ConfigError naming the pipeline's scheduler config."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.tiny_runs import tiny_config, tiny_overrides

import selora.held_out
from selora.config import ConfigError
from selora.diffusion import noise_scheduler, training_batch
from selora.models import load_pipeline
from selora.train import main
from selora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("assets_cache")


def pipeline_with(assets, tmp_path, prediction_type: str):
    """A copy of the tiny pipeline folder whose scheduler config says ``prediction_type``."""
    folder = tmp_path / f"tiny-{prediction_type}"
    shutil.copytree(assets["model"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = prediction_type
    path.write_text(json.dumps(config))
    return folder


def expected_batch(trainer: Trainer, idx: torch.Tensor, seed: int):
    """Redo training_batch's draws (same order) and return ``(z0, noise, t)``."""
    g = torch.Generator().manual_seed(seed)
    data, n = trainer.train_data, len(idx)
    shape = (n, *data.mean.shape[1:])
    eps_latent, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, trainer.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
    return data.mean[idx] + data.std[idx] * eps_latent, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_and_eval_targets_follow_the_prediction_type(assets, tmp_path, monkeypatch, prediction_type):
    folder = pipeline_with(assets, tmp_path, prediction_type)
    trainer = Trainer(tiny_config(assets, model=str(folder), epochs=1, num_samples=0), tmp_path / "run", progress=False)
    sched = trainer.noise_scheduler
    assert sched.config.prediction_type == prediction_type
    idx = torch.arange(4)
    noisy, t, _, target = training_batch(
        trainer.train_data, idx, torch.Generator().manual_seed(5), sched, trainer.empty_ids, 0.0
    )
    z0, noise, t_want = expected_batch(trainer, idx, 5)
    assert torch.equal(t, t_want) and torch.equal(noisy, sched.add_noise(z0, noise, t))
    want = sched.get_velocity(z0, noise, t) if prediction_type == "v_prediction" else noise
    assert torch.equal(target, want)
    if prediction_type == "v_prediction":
        assert not torch.allclose(target, noise)
    # the held-out loss scores the prediction against the same kind of target
    seen = []
    real = selora.held_out.per_sample_errors

    def spy(pred, target):
        seen.append(target)
        return real(pred, target)

    monkeypatch.setattr(selora.held_out, "per_sample_errors", spy)
    trainer.evaluator.eval_loss()
    data, g = trainer.eval_data, torch.Generator().manual_seed(trainer.cfg.seed + 2)
    eps_latent, noise = torch.randn(data.mean.shape, generator=g), torch.randn(data.mean.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(data),), generator=g)
    z0 = data.mean + data.std * eps_latent
    want = sched.get_velocity(z0, noise, t) if prediction_type == "v_prediction" else noise
    assert torch.equal(torch.cat(seen), want)
    assert trainer.train_step(idx) is not None  # and it trains


def test_other_prediction_types_are_refused(assets, tmp_path, capsys):
    folder = pipeline_with(assets, tmp_path, "sample")
    with pytest.raises(ConfigError, match=r"prediction_type='sample'.*'epsilon' or 'v_prediction'") as err:
        noise_scheduler(load_pipeline(str(folder), torch.float32, "cpu"))
    assert "scheduler_config.json" in str(err.value) and str(folder) in str(err.value)
    sets = [a for item in tiny_overrides(assets, model=str(folder), num_samples=0) for a in ("--set", item)]
    assert main(["--config", "montgomery-offline", "--out", str(tmp_path / "run"), "--no-progress", *sets]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "prediction_type='sample'" in lines[-1]
