"""Runs that survive: two checkpoints kept, a truncated or corrupt one passed over on resume, a full
disk that leaves the previous checkpoint intact, ``--max-steps`` ending a run like its last epoch
(and a larger one continuing it), and SIGKILL at many points resumed to the uninterrupted run, bitwise."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.tiny_runs import REPO, tiny_config, tiny_overrides, train_losses
from safetensors.torch import load_file

import selora.checkpoint as checkpoint
import selora.rundir
from selora.checkpoint import CheckpointWriteError, read_checkpoint, write_failure
from selora.config import ConfigError, load_config
from selora.rundir import read_records
from selora.train import main
from selora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("assets_cache")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("SELORA_THREADS", "1")  # main() sets the thread count; runs compared bitwise need the same


def config(assets, **extra):
    return tiny_config(assets, **{"epochs": 1, "num_samples": 0, "checkpoint_every": 3, **extra})


def tree(run: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``run`` (hidden temporaries included): relative path -> bytes."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and not str(p.relative_to(run)).startswith(skip)
    }


def state(run: Path, which: str = "last") -> dict:
    return json.loads((run / "checkpoints" / which / "state.json").read_text())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resume(run: Path, *args: str) -> int:
    return main(["--resume", str(run), "--no-progress", *args])


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


# -- a truncated or corrupt checkpoint --------------------------------------------------------------
def test_truncated_last_checkpoint_falls_back_to_previous(assets, tmp_path, capsys):
    """The issue's case: state.safetensors cut in half. The resume names the file in one line, goes
    on from previous (step 6) and ends exactly like a run that was never interrupted."""
    cfg = config(assets)
    full, split = tmp_path / "full", tmp_path / "split"
    Trainer(cfg, full, max_steps=10, progress=False).run()
    Trainer(cfg, split, max_steps=7, progress=False).run()  # checkpoints at 3 and 6, the end at 7
    assert (state(split)["step"], state(split, "previous")["step"]) == (7, 6)
    bad = split / "checkpoints" / "last" / "state.safetensors"
    truncate(bad)
    cut = bad.read_bytes()
    capsys.readouterr()
    assert resume(split, "--max-steps", "10") == 0
    (line,) = warnings_in(capsys.readouterr().err)
    assert str(bad) in line and "truncated or corrupt" in line, line
    assert line.endswith(f"resuming from {split / 'checkpoints' / 'previous'} (step 6)"), line
    # the bad one is kept aside, out of the rotation; every other file equals the uninterrupted run's
    assert (split / "checkpoints" / "last.bad" / "state.safetensors").read_bytes() == cut
    a, b = tree(split, skip=("checkpoints/last.bad",)), tree(full)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


@pytest.mark.parametrize(
    "damage", ["state.json", "ranks.json", "adapters.safetensors", "state.safetensors", "missing-last"]
)
def test_each_bad_file_is_named_and_passed_over(assets, tmp_path, capsys, damage):
    run = tmp_path / "run"
    Trainer(config(assets), run, max_steps=4, progress=False).run()  # last: step 4, previous: step 3
    last = run / "checkpoints" / "last"
    if damage == "missing-last":  # a kill between the two renames of a rotation
        shutil.rmtree(last)
        named = f"{last}: missing"
    else:
        (last / damage).write_text("{") if damage.endswith(".json") else truncate(last / damage)
        named = str(last / damage)
    capsys.readouterr()
    trainer = Trainer(load_config(run / "config.yaml"), run, resume=True, max_steps=4, progress=False)
    (line,) = warnings_in(capsys.readouterr().err)
    assert line.startswith(f"warning: {named}") and line.endswith("(step 3)"), line
    assert trainer.state.step == 3 and state(run)["step"] == 3 and not (run / "checkpoints" / "previous").exists()
    assert len(read_records(run)["train"]) == 3  # the records cut back to previous's


def test_no_good_checkpoint_is_a_one_line_error(assets, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(assets), run, max_steps=4, progress=False).run()
    last, previous = run / "checkpoints" / "last", run / "checkpoints" / "previous"
    (last / "state.json").write_text('{"step": 4')
    truncate(previous / "adapters.safetensors")
    before = tree(run)
    capsys.readouterr()
    assert resume(run) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]  # (+ loading bars)
    assert len(lines) == 1 and lines[0].startswith("error: --resume"), lines
    assert str(last / "state.json") in lines[0] and str(previous / "adapters.safetensors") in lines[0], lines
    assert tree(run) == before, "a failed resume must leave the run as it was"
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        Trainer(load_config(run / "config.yaml"), run, resume=True, progress=False)


# -- a full disk ----------------------------------------------------------------------------------
def full_disk_after(monkeypatch, n_ok: int, seen: dict) -> Callable:
    """state.safetensors writes after the first ``n_ok`` fail with ENOSPC; ``seen`` gets the checkpoint
    folders' files as they were at the failure."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path, metadata=None):
        if Path(path).name == "state.safetensors":
            calls.append(path)
            if len(calls) > n_ok:
                ckpts = Path(path).parent.parent
                seen.update(tree(ckpts, skip=(".",)))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    return real


def test_full_disk_leaves_the_previous_checkpoint_intact(assets, tmp_path, monkeypatch):
    run, seen = tmp_path / "run", {}
    real = full_disk_after(monkeypatch, 2, seen)  # checkpoints at 3 and 6 written, the one at 9 fails
    with pytest.raises(CheckpointWriteError) as info:
        Trainer(config(assets), run, max_steps=10, progress=False).run()
    last = run / "checkpoints" / "last"
    assert str(info.value) == (
        f"no space left on device while writing {last} (step 9); the previous checkpoint {last} (step 6) is intact"
    )
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "previous"], "temporaries left"
    assert tree(run / "checkpoints") == seen and (state(run)["step"], state(run, "previous")["step"]) == (6, 3)
    read_checkpoint(last)
    monkeypatch.setattr(checkpoint, "save_file", real)  # space again
    summary = Trainer(load_config(run / "config.yaml"), run, resume=True, max_steps=10, progress=False).run()
    assert summary["step"] == 10 and [r["step"] for r in read_records(run)["train"]] == list(range(1, 11))


def test_safetensors_own_enospc_error_is_recognised():
    """safetensors reports a full disk as SafetensorError (measured on a 64 KiB tmpfs), no errno."""
    from safetensors import SafetensorError

    err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    failure = write_failure(Path("run/checkpoints/last"), err)
    assert failure.reason == "no space left on device" and failure.errno == errno.ENOSPC
    assert str(failure) == "no space left on device while writing run/checkpoints/last"
    assert write_failure(Path("x"), ValueError("not a write")) is None
    assert write_failure(Path("x"), PermissionError(errno.EACCES, "Permission denied")).reason == "Permission denied"


def test_cli_full_disk_exits_1_with_one_line(assets, tmp_path, monkeypatch, capsys):
    out, seen = tmp_path / "run", {}
    full_disk_after(monkeypatch, 1, seen)
    sets = [a for item in tiny_overrides(assets, epochs=1, num_samples=0, checkpoint_every=3) for a in ("--set", item)]
    code = main(["--config", "montgomery-offline", "--out", str(out), *sets, "--max-steps", "7", "--no-progress"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert code == 1 and len(lines) == 1, lines
    expected = r"error: no space left on device while writing .*last \(step 6\); .* \(step 3\) is intact"
    assert re.fullmatch(expected, lines[0]), lines


def half_then_full(monkeypatch, name: str) -> None:
    """``os.write`` as the kernel does it on a disk that fills up: to a file called ``name``, half
    of the first write lands, then ENOSPC; other files are written normally."""
    real = os.write

    def write(fd, data):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name != name:
            return real(fd, data)
        if len(data) > 1:
            return real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


def test_full_disk_while_appending_a_record_loses_nothing(tmp_path, monkeypatch):
    """No half line is left behind: the records before it read back as they were."""
    path = tmp_path / "metrics.jsonl"
    selora.rundir.append_record(path, {"kind": "train", "step": 1})
    before = path.read_bytes()
    half_then_full(monkeypatch, "metrics.jsonl")
    with pytest.raises(CheckpointWriteError) as info:
        selora.rundir.append_record(path, {"kind": "train", "step": 2, "loss": 0.5})
    assert str(info.value) == f"no space left on device while writing {path}"
    assert info.value.errno == errno.ENOSPC and path.read_bytes() == before


def test_full_disk_while_logging_stops_training_with_one_line(assets, tmp_path, monkeypatch, capsys):
    """A record that cannot be written ends the run with exit status 1 and one line naming the file;
    the run resumes from its checkpoint to the uninterrupted run's records."""
    full, out = tmp_path / "full", tmp_path / "out"
    sets = [a for item in tiny_overrides(assets, epochs=1, num_samples=0, checkpoint_every=3) for a in ("--set", item)]
    assert main(["--config", "montgomery-offline", "--out", str(full), *sets, "--max-steps", "7", "--no-progress"]) == 0
    real, seen = os.write, []

    def write(fd, data):  # the 5th record of metrics.jsonl finds the disk full
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == "metrics.jsonl":
            seen.append(data)
            if len(seen) == 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    capsys.readouterr()
    code = main(["--config", "montgomery-offline", "--out", str(out), *sets, "--max-steps", "7", "--no-progress"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert code == 1 and lines == [f"error: no space left on device while writing {out / 'metrics.jsonl'}"], lines
    monkeypatch.setattr(os, "write", real)
    assert resume(out, "--max-steps", "7") == 0
    assert (out / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


# -- --max-steps ends a run; a larger one continues it -------------------------------------------------
def test_max_steps_ends_like_a_finished_run_and_a_larger_one_continues(assets, tmp_path, capsys):
    cfg = config(assets)
    full, upto10, split = tmp_path / "full", tmp_path / "upto10", tmp_path / "split"
    Trainer(cfg, full, progress=False).run()  # the whole epoch, uninterrupted
    Trainer(cfg, upto10, max_steps=10, progress=False).run()
    summary = Trainer(cfg, split, max_steps=5, progress=False).run()
    # ended like a finished run: final adapters and ranks, an evaluation, best/, the checkpoint marked
    assert summary["status"] == "stopped at --max-steps" and summary["step"] == 5
    last = split / "checkpoints" / "last"
    assert (split / "adapters.safetensors").read_bytes() == (last / "adapters.safetensors").read_bytes()
    assert json.loads((split / "ranks.json").read_text()) == json.loads((last / "ranks.json").read_text())
    evals = read_records(split)["eval"]
    assert [e["step"] for e in evals] == [5] and json.loads((split / "best" / "state.json").read_text())["step"] == 5
    assert state(split)["stopped_at"] == 5 and state(split)["finished"] is False
    # the same --max-steps again: nothing to do
    before = tree(split)
    assert resume(split, "--max-steps", "5") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "stopped at --max-steps"
    assert tree(split) == before
    # a larger one continues: the training state equals a run straight to 10, bit for bit
    assert resume(split, "--max-steps", "10") == 0
    a, b = tree(split), tree(upto10)
    assert train_losses(split) == train_losses(upto10) and read_records(split)["ranks"] == read_records(upto10)["ranks"]
    same = [k for k in b if k.endswith(".safetensors") and not k.startswith("best/")]
    assert same and all(a[k] == b[k] for k in same), [k for k in same if a[k] != b[k]]  # adapters, moments, RNG, K
    assert a["ranks.json"] == b["ranks.json"] and read_records(split)["eval"][-1] == read_records(upto10)["eval"][-1]
    # no --max-steps: on to the configured epochs, the same as the uninterrupted run
    assert resume(split) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "finished"
    a, b = tree(split), tree(full)
    assert train_losses(split) == train_losses(full) and read_records(split)["ranks"] == read_records(full)["ranks"]
    same = [k for k in b if k.endswith((".safetensors", "ranks.json")) and not k.startswith("best/")]
    assert all(a[k] == b[k] for k in same), [k for k in same if a[k] != b[k]]
    assert [e["step"] for e in read_records(split)["eval"]] == [5, 10, len(train_losses(full))]
    # truly finished: a larger --max-steps has nothing to do
    before = tree(split)
    assert resume(split, "--max-steps", "50") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "finished"
    assert tree(split) == before


def test_continuing_past_a_max_steps_end_drops_its_final_adapters(assets, tmp_path):
    """While a continued run trains, adapters.safetensors would be older than checkpoints/last."""
    run = tmp_path / "run"
    Trainer(config(assets), run, max_steps=2, progress=False).run()
    assert (run / "adapters.safetensors").is_file()
    trainer = Trainer(load_config(run / "config.yaml"), run, resume=True, max_steps=4, progress=False)
    seen = []
    real = trainer.train_step

    def step(idx):
        seen.append((run / "adapters.safetensors").exists())
        return real(idx)

    trainer.train_step = step
    trainer.run()
    assert seen == [False, False] and (run / "adapters.safetensors").is_file()


# -- SIGKILL at many points -------------------------------------------------------------------------
#: Imports the package once, then forks one child per segment: ``selora.train.main`` (a fresh run,
#: then ``--resume``), killed with SIGKILL at the segment's point: ``train`` after the records show
#: ``n`` train steps (the parent polls), ``write`` inside the n-th checkpoint write (the temp folder
#: holds adapters and ranks, not yet the state), ``rotate`` between the two renames of the n-th
#: rotation (last -> previous done, the new one not yet in place), ``eval`` right after the n-th
#: evaluation record, ``final`` right after the final adapters; ``none`` runs to the end.
DRIVER = r"""
import json, os, signal, sys, time
from pathlib import Path
import selora.checkpoint, selora.rundir, selora.run_state
from selora.train import main

ref, run, sets, plan = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
fresh = lambda out: ["--config", "montgomery-offline", "--out", str(out), *sets, "--no-progress"]

def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def after(module, name, n, when=lambda *a: True, before=False):
    real, count = getattr(module, name), [0]
    def hooked(*args, **kwargs):
        if before and when(*args):
            count[0] += 1
            if count[0] == n: die()
        out = real(*args, **kwargs)
        if not before and when(*args):
            count[0] += 1
            if count[0] == n: die()
        return out
    setattr(module, name, hooked)

def trains(path):
    return sum('"kind": "train"' in l for l in path.read_text().splitlines()) if path.is_file() else 0

results = []
for i, (kind, n) in enumerate(plan):
    out = ref if kind == "ref" else run
    argv = fresh(out) if kind == "ref" or i == 1 else ["--resume", str(run), "--no-progress"]
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        if kind == "write":
            after(selora.checkpoint, "save_file", n, lambda t, p, *a: p.endswith("state.safetensors"), before=True)
        elif kind == "rotate":
            after(os, "replace", n, lambda s, d, *a: Path(d).name == "previous")
        elif kind == "eval":
            after(selora.rundir, "append_record", n, lambda p, r: r.get("kind") == "eval")
        elif kind == "final":
            after(selora.run_state, "atomic_save_safetensors", n)
        code = main(argv)
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if kind == "train" and trains(run / "metrics.jsonl") >= n:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    folder = run / "checkpoints"
    left = {p.name: sorted(x.name for x in p.iterdir()) for p in folder.iterdir()} if folder.is_dir() else {}
    results.append([kind, n, code, trains(run / "metrics.jsonl"), left])
print("RESULT " + json.dumps(results))
"""


def test_sigkill_at_six_points_resumes_to_the_uninterrupted_run_bitwise(assets, tmp_path):
    """One epoch of 27 steps, a checkpoint every 4: killed after 6 train records, inside the write
    of the checkpoint at 8, between the renames of the next rotation, after 18 train records, after
    the epoch's evaluation record, after the final adapters; resumed by ``python -m selora.train
    --resume``. Every file of the run (records, adapters, ranks, both checkpoints, best/) equals the
    uninterrupted run's, byte for byte, with no temporaries left."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    sets = [a for x in tiny_overrides(assets, epochs=1, num_samples=0, checkpoint_every=4) for a in ("--set", x)]
    plan = [["ref", 0], ["train", 6], ["write", 1], ["rotate", 1], ["train", 18], ["eval", 1], ["final", 1]]
    env = {**os.environ, "SELORA_CACHE": str(assets["cache"]), "SELORA_PROFILE": "offline", "SELORA_THREADS": "1"}
    args = [str(ref), str(run), json.dumps(sets), json.dumps(plan)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert results[0][2] == 0, (results, proc.stderr[-3000:])
    assert [r[2] for r in results[1:]] == [-9] * 6, (results, proc.stderr[-3000:])  # each died by SIGKILL
    left = {r[0]: r[4] for r in results[1:] if r[0] in ("write", "rotate")}
    (tmp,) = [k for k in left["write"] if k.startswith(".last.")]  # killed inside the write: a partial temp
    assert left["write"][tmp] == ["adapters.safetensors", "ranks.json"] and "last" in left["write"], left
    (tmp,) = [k for k in left["rotate"] if k.startswith(".last.")]  # killed between the renames
    assert "last" not in left["rotate"] and "previous" in left["rotate"] and len(left["rotate"][tmp]) == 4, left
    assert f"warning: {run}/checkpoints/last: missing; resuming from {run}/checkpoints/previous" in proc.stderr
    final = subprocess.run(
        [sys.executable, "-m", "selora.train", "--resume", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert json.loads(final.stdout.strip().splitlines()[-1])["status"] == "finished"
    a, b = tree(run), tree(ref)
    assert a.keys() == b.keys(), set(a) ^ set(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert len(read_records(run)["train"]) == 27 and (run / "adapters.safetensors").is_file()
    for name in ("adapters.safetensors", "checkpoints/last/state.safetensors"):
        x, y = load_file(str(run / name)), load_file(str(ref / name))
        assert all(torch.equal(x[k], y[k]) for k in y)
