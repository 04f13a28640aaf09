"""`accelerate launch` (how diffusers users start training) runs `python -m selora.train` on two CPU
processes exactly like torchrun does: the same ranks and adapters on both, equal to one process.

accelerate's `--multi_gpu` is its multi-process launcher (torch.distributed.run underneath, so the
processes get WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR); without CUDA they join over gloo.
Its `--cpu` flag starts ONE process unless an MPI hostfile is given, so it is not what this tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers.tiny_runs import REPO, check_two_processes, ddp_overrides

pytestmark = pytest.mark.usefixtures("assets_cache")

# `python -m selora.train` itself (same main, same argv), then what only the processes know: each
# one's final ranks and adapters (the run folder holds the main process's), world and threads.
PROBE = """
import json, os, sys
import torch
from safetensors.torch import save_file
import selora.train
from selora.checkpoint import adapter_tensors
from selora.core.layers import ranks

made = []


class Recorded(selora.train.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)


selora.train.Trainer = Recorded
code = selora.train.main(sys.argv[1:])
if made:
    tr = made[0]
    r = tr.dist.rank
    save_file(adapter_tensors(tr.adapters), os.path.join(tr.run_dir, f"rank{r}.safetensors"))
    launcher = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    info = {"ranks": ranks(tr.model), "world": tr.dist.world, "threads": torch.get_num_threads(), "env": launcher}
    with open(os.path.join(tr.run_dir, f"rank{r}.json"), "w") as fh:
        json.dump(info, fh)
sys.exit(code)
"""


def free_port() -> str:
    """A TCP port free now (``--main_process_port 0`` leaves the workers hanging on accelerate < 1.7)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_accelerate_launch_two_processes_match_one_process(assets, tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "selora_train_probe.py").write_text(PROBE)
    run = tmp_path / "run"
    env = {
        **os.environ,
        "SELORA_CACHE": str(assets["cache"]),
        "SELORA_PROFILE": "offline",
        "SELORA_THREADS": "1",  # one thread per process, as README "Multi-process training" says
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no user `accelerate config` file applies
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "probe"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.accelerate_cli"),  # the `accelerate` command
        *("launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", free_port()),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "selora_train_probe"),  # = -m selora.train, observed (see PROBE)
        *("--config", "montgomery-offline", "--out", str(run), "--no-progress"),
        *(a for o in ddp_overrides(assets) for a in ("--set", o)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["env"] for i in info] == [
        {"WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": i["env"]["MASTER_ADDR"]}
        for r, i in enumerate(info)
    ]
    # the command line's own output: one summary line, from the main process only
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["status"] == "finished" and summaries[0]["step"] == 6
    check_two_processes(assets, run)
