"""A command that needs an optional dependency refuses before any work when it is missing, in one line
naming the extra to install."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

import selora.evaluate
from selora.extras import MissingExtraError, require_extra


def _installed(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    fake = types.ModuleType(module)
    fake.__spec__ = importlib.machinery.ModuleSpec(module, None)
    monkeypatch.setitem(sys.modules, module, fake)


def test_require_extra_names_the_module_the_purpose_and_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(MissingExtraError) as err:
        require_extra("paper", "FID")
    assert str(err.value) == 'FID needs torch-fidelity, which is not installed: pip install "selora[paper]"'
    _installed(monkeypatch, "torch_fidelity")
    require_extra("paper", "FID")
    with pytest.raises(ValueError, match="extra 'gpu': expected one of paper"):
        require_extra("gpu", "FID")


def test_evaluate_refuses_the_paper_metrics_without_their_extra_before_any_work(tmp_path, capsys, monkeypatch):
    """Paper profile without the ``paper`` extra: one line, exit 2, nothing trained or written (it
    used to train and sample, then end in torchmetrics' ModuleNotFoundError)."""
    monkeypatch.setenv("SELORA_PROFILE", "paper")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)

    def no_work(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(selora.evaluate, "evaluate_run", no_work)
    out = tmp_path / "exp"
    args = ["--out", str(out), "--config", "montgomery-paper", "--methods", "lora", "--seeds", "0", "--no-progress"]
    assert selora.evaluate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: FID needs torch-fidelity, which is not installed: pip install "selora[paper]"'], err
    assert not out.exists()
    _installed(monkeypatch, "torch_fidelity")
    with pytest.raises(AssertionError, match="a run was started"):
        selora.evaluate.main(args)
