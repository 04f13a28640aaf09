"""Two CPU processes under torchrun (gloo) train like one process with the same global batch:
Fisher statistics reduced before each decision, the same K everywhere, DDP rebuilt on growth.

``check_two_processes`` holds the checks; tests/test_accelerate.py applies them to the same run
started by ``accelerate launch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.tiny_runs import REPO, check_two_processes, ddp_overrides

pytestmark = pytest.mark.usefixtures("assets_cache")

DRIVER = """
import os, sys, json
import torch
from safetensors.torch import save_file
from selora.checkpoint import adapter_tensors
from selora.config import load_config
from selora.core.layers import ranks
from selora.trainer import Trainer

cfg = load_config("montgomery-offline", json.loads(sys.argv[2]))
trainer = Trainer(cfg, sys.argv[1], progress=False)
trainer.run()
rank = trainer.dist.rank
save_file(adapter_tensors(trainer.adapters), os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
    json.dump({"ranks": ranks(trainer.model), "world": trainer.dist.world, "threads": torch.get_num_threads()}, fh)
"""


def test_two_processes_match_one_process(assets, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ddp = tmp_path / "ddp"
    env = {**os.environ, "SELORA_CACHE": str(assets["cache"]), "SELORA_PROFILE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(driver),
            str(ddp),
            json.dumps(ddp_overrides(assets)),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_two_processes(assets, ddp)


class _OldDDP:
    """DistributedDataParallel's signature before torch 2.7 (no ``init_sync``)."""

    def __init__(self, module, device_ids=None):
        self.module, self.device_ids = module, device_ids


class _NewDDP:
    """DistributedDataParallel's signature from torch 2.7 on."""

    def __init__(self, module, device_ids=None, init_sync=True):
        self.module, self.device_ids, self.init_sync = module, device_ids, init_sync


def test_ddp_skips_its_start_sync_only_where_torch_has_the_option(monkeypatch):
    """``init_sync=False`` (every process loaded the same weights) is passed where DDP takes it (torch
    2.7+); an older DDP gets no unknown keyword (it raised TypeError on torch 2.3-2.6)."""
    import torch.nn.parallel

    from selora.distributed import Dist

    model = torch.nn.Linear(2, 2)
    two = Dist(0, 2, torch.device("cpu"))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", _OldDDP)
    assert two.wrap(model).module is model
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", _NewDDP)
    wrapped = two.wrap(model)
    assert wrapped.module is model and wrapped.init_sync is False
    assert Dist(0, 1, torch.device("cpu")).wrap(model) is model
