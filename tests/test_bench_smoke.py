"""Smoke test of benchmarks/sd15.py: the --quick run (mini SD widths, same code path) writes a complete
results.json; the committed results.json has the same schema. No timing assertions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sd15.py"
RATIO_KEYS = {"lora_selora_vs_peft", "test_step_vs_plain", "authors_test_step_vs_plain", "amortized_t40",
              "peak_mem_vs_full_ft", "merged_infer_vs_base"}


def _positive(value: object, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where}: {value!r}"


def check_schema(res: dict) -> None:
    """Every key the book and the issue rely on is there, with finite positive numbers."""
    assert set(res["ratios"]) == RATIO_KEYS, sorted(res["ratios"])
    for key, value in res["ratios"].items():
        _positive(value, f"ratios.{key}")
        _positive(res["goals"][key], f"goals.{key}")
    batches = [str(b) for b in res["settings"]["batches"]]
    assert batches and set(res["ratios_by_batch"]) == set(batches)
    for b in batches:
        assert set(res["ratios_by_batch"][b]) == RATIO_KEYS
        for key, value in res["ratios_by_batch"][b].items():
            _positive(value, f"ratios_by_batch.{b}.{key}")
    assert set(res["seconds_median"]) == set(res["configs"])
    for name, per in res["seconds_median"].items():
        for b in batches:
            if name != "full_ft" or res["memory"]["full_ft"][b]["kind"] != "estimate":
                _positive(per[b], f"seconds_median.{name}.{b}")
    for name, samples in res["seconds_samples"].items():
        for b in batches:
            assert len(samples[b]) == res["settings"]["rounds"], f"{name} batch {b}: one sample per round"
    assert {"frozen", "selora_test_mixed", "full_ft"} <= set(res["memory"])
    for name, per in res["memory"].items():
        for b in batches:
            _positive(per[b]["peak_bytes"], f"memory.{name}.{b}")
    machine = res["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and len(machine["load_average_start"]) == 3
    assert res["settings"]["torch_threads"] >= 1 and res["settings"]["latent"] == [28, 28]


def test_quick_run_writes_complete_results(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--batches", "2", "--rounds", "1", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] is True and res["settings"]["batches"] == [2]
    check_schema(res)
    # nothing was estimated at the mini widths: every configuration really ran in its own process
    assert all(per["2"]["kind"] == "peak_rss" for per in res["memory"].values())
    md = (tmp_path / "results.md").read_text()
    assert all(f"`{key}`" in md for key in RATIO_KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temp files left


def test_committed_results_have_the_schema() -> None:
    res = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    assert res["quick"] is False, "the committed results must come from the full SD v1.5 run"
    check_schema(res)


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--out-dir", "no/such/dir"]])
def test_bad_arguments_exit_2(bad: list[str], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", *bad], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert bad[0] in out.stderr
