"""Profile selection: SELORA_PROFILE wins, else paper iff CUDA; the offline profile never downloads."""

import pytest
import torch

import selora
from selora.profile import require_online


@pytest.mark.parametrize("value", ["offline", "paper", " Paper "])
def test_environment_variable_wins(monkeypatch, value):
    monkeypatch.setenv("SELORA_PROFILE", value)
    assert selora.profile() == value.strip().lower()


def test_default_follows_cuda(monkeypatch):
    monkeypatch.delenv("SELORA_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert selora.profile() == "paper"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selora.profile() == "offline"


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "gpu")
    with pytest.raises(ValueError, match="SELORA_PROFILE='gpu'"):
        selora.profile()


def test_offline_refuses_downloads(monkeypatch):
    monkeypatch.setenv("SELORA_PROFILE", "offline")
    with pytest.raises(RuntimeError, match="offline"):
        require_online("downloading the Montgomery set")
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    require_online("downloading the Montgomery set")


def test_setup_prints_profile_and_seeds(monkeypatch, capsys):
    monkeypatch.setenv("SELORA_PROFILE", "offline")
    monkeypatch.setenv("SELORA_THREADS", "1")
    info = selora.setup(seed=3)
    a = torch.rand(3)
    selora.setup(seed=3)
    assert torch.equal(a, torch.rand(3)), "setup(seed) must make torch draws reproducible"
    out = capsys.readouterr().out
    assert "profile: offline" in out and info["threads"] == 1 and torch.get_num_threads() == 1


def test_threads_shared_among_torchrun_processes(monkeypatch):
    monkeypatch.delenv("SELORA_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert selora.set_threads() == 1
    torch.set_num_threads(1)
