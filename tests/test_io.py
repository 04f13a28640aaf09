"""selora.io: files and folders appear complete at their final path, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from selora.io import (
    atomic_dir,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
)


class Boom(Exception):
    pass


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_appears_only_after_the_block(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")
        tmp.write_text("new", encoding="utf-8")
        assert not target.exists(), "the final path must not exist while the block runs"
    assert target.read_text(encoding="utf-8") == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"], "temp file left behind"


def test_exception_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise Boom
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_exception_with_no_old_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("wanted", [0o644, 0o600, 0o640])
def test_mode_is_applied(tmp_path: Path, wanted: int) -> None:
    old_umask = os.umask(0o077)  # a private umask must not leak into shared outputs
    try:
        path = atomic_write_text(tmp_path / "m.txt", "x", mode=wanted)
    finally:
        os.umask(old_umask)
    assert mode(path) == wanted


def test_default_mode_is_shareable(tmp_path: Path) -> None:
    assert mode(atomic_write_bytes(tmp_path / "a.bin", b"1")) == 0o644
    assert mode(atomic_save_safetensors({"t": torch.zeros(1)}, tmp_path / "a.safetensors")) == 0o644


def test_text_and_bytes_round_trip_and_overwrite(tmp_path: Path) -> None:
    text = "päth\nline two\r\n"
    assert atomic_write_text(tmp_path / "t.txt", text) == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == text.encode("utf-8"), "text must be UTF-8, no newline translation"
    data = bytes(range(256))
    atomic_write_bytes(tmp_path / "b.bin", b"first version, longer than the second")
    atomic_write_bytes(tmp_path / "b.bin", data)
    assert (tmp_path / "b.bin").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "t.txt"]


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, generator=g).half(),
    }
    path = atomic_save_safetensors(tensors, tmp_path / "w.safetensors", {"format": "pt", "k": "v"})
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "k": "v"}
        assert set(fh.keys()) == set(tensors)
        for key, value in tensors.items():
            got = fh.get_tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key


def test_safetensors_error_keeps_old_file(tmp_path: Path) -> None:
    path = atomic_save_safetensors({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(ValueError):  # safetensors refuses non-contiguous tensors
        atomic_save_safetensors({"a": torch.ones(4, 4).t()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_dir_appears_only_after_the_block(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == tmp_path
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.txt").write_text("x", encoding="utf-8")
        assert not target.exists()
    assert (target / "sub" / "f.txt").read_text(encoding="utf-8") == "x"
    assert mode(target) == 0o755, "mkdtemp's private 0700 must not stay"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_dir_replaces_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"], "the moved-aside .old folder must be deleted"


def test_dir_removes_stale_old_folder(tmp_path: Path) -> None:
    target, stale = tmp_path / "folder", tmp_path / "folder.old"
    stale.mkdir()
    (stale / "stale.txt").write_text("s", encoding="utf-8")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_dir_failure_keeps_old_folder_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half", encoding="utf-8")
            raise Boom
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_dir_failure_without_old_folder_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "half.txt").write_text("half", encoding="utf-8")
            raise Boom
    assert not any(tmp_path.iterdir())


def test_read_jsonl_returns_one_record_per_line_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "ranks": {"a": 3}}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "ranks": {"a": 3}}]
    path.write_text("", encoding="utf-8")
    assert read_jsonl(path) == []


@pytest.fixture
def disk_log(monkeypatch) -> list[tuple[str, str]]:
    """What reaches the disk, in order: ("fsync", name of the flushed file/folder), ("replace", target name)."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        log.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst) -> None:
        log.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_a_file_is_on_the_disk_before_it_is_renamed_and_the_rename_after(tmp_path: Path, disk_log) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")
    (flush_tmp, rename, flush_folder) = disk_log
    assert flush_tmp[0] == "fsync" and flush_tmp[1].startswith(".a.txt.") and flush_tmp[1].endswith(".tmp")
    assert rename == ("replace", "a.txt") and flush_folder == ("fsync", tmp_path.name)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_a_folder_is_on_the_disk_before_it_is_renamed_and_the_rename_after(tmp_path: Path, disk_log) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "c.json").write_text("{}")
    flushed = [name for kind, name in disk_log[:-2] if kind == "fsync"]
    assert sorted(flushed[:-1]) == ["c.json", "sub", "w.bin"] and flushed[-1] == tmp.name
    assert disk_log[-2:] == [("replace", "out"), ("fsync", tmp_path.name)]
