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
RATIO_KEYS = {
    "lora_selora_vs_peft",
    "test_step_vs_plain",
    "authors_test_step_vs_plain",
    "amortized_t40",
    "peak_mem_vs_full_ft",
    "merged_infer_vs_base",
}


def _positive(value: object, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where}: {value!r}"


def check_schema(res: dict) -> None:
    """Every key the book and the issue rely on is there, with finite positive numbers."""
    assert set(res["ratios"]) == RATIO_KEYS, sorted(res["ratios"])
    for key, value in res["ratios"].items():
        _positive(value, f"ratios.{key}")
        _positive(res["goals"][key], f"goals.{key}")
    for key, (lo, hi) in res["ratio_intervals"].items():
        value = res["ratios"][key]  # the interval comes through numpy's log/exp, the value through math's: 1 ulp apart
        assert lo * (1 - 1e-12) <= value <= hi * (1 + 1e-12), f"ratio_intervals.{key}: [{lo}, {hi}] misses {value}"
    assert set(res["ratio_intervals"]) == RATIO_KEYS - {"peak_mem_vs_full_ft"}
    assert set(res["verdicts"]) == RATIO_KEYS
    assert all(v.split(" (")[0] in ("yes", "no") for v in res["verdicts"].values())
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
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] is True and res["settings"]["batches"] == [2]
    check_schema(res)
    # nothing was estimated at the mini widths: every configuration really ran in its own process
    assert all(per["2"]["kind"] == "peak_rss" for per in res["memory"].values())
    md = (tmp_path / "results.md").read_text()
    assert all(f"`{key}`" in md for key in RATIO_KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temp files left
    # the analysis is a pure function of the stored raw samples: --reanalyse reproduces it exactly
    again = tmp_path / "again"
    again.mkdir()
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--reanalyse", str(tmp_path / "results.json"), "--out-dir", str(again)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res2 = json.loads((again / "results.json").read_text())
    assert res2["ratios"] == res["ratios"] and res2["ratio_intervals"] == res["ratio_intervals"]


def test_committed_results_have_the_schema() -> None:
    res = json.loads((ROOT / "selora" / "assets" / "benchmarks" / "results.json").read_text())
    assert res["quick"] is False, "the committed results must come from the full SD v1.5 run"
    check_schema(res)


def test_reanalyse_of_a_non_result_file_fails_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text('{"settings": {}}')
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--reanalyse", str(bad), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 1 and str(bad) in out.stderr and "raw samples" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"], "nothing written"


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--out-dir", "no/such/dir"]])
def test_bad_arguments_exit_2(bad: list[str], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *bad],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert out.returncode == 2
    assert bad[0] in out.stderr


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd15_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_are_medians_of_same_round_pairs_not_ratios_of_medians():
    sd15 = _load_script()
    # per-round ratios 0.5, 2, 0.9 -> median 0.9; the ratio of the medians would be 4 / 2 = 2
    assert sd15.paired_ratio([1.0, 4.0, 9.0], [2.0, 2.0, 10.0]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="equal, non-empty"):
        sd15.paired_ratio([1.0, 2.0], [1.0])
    samples = {name: {"1": [1.0, 2.0, 3.0]} for name in sd15.TIMED}
    samples["lora_selora"]["1"] = [1.1, 1.8, 3.3]  # per round: 1.1, 0.9, 1.1
    memory = {name: {"1": {"peak_bytes": 2}} for name in sd15.MEMORY}
    memory["full_ft"]["1"]["peak_bytes"] = 8
    ratios, by_batch = sd15.compute_ratios(samples, memory, [1])
    assert ratios["lora_selora_vs_peft"] == pytest.approx(1.1)
    assert ratios["peak_mem_vs_full_ft"] == pytest.approx(0.25)
    assert ratios["amortized_t40"] == pytest.approx(1.0) and by_batch["1"]["test_step_vs_plain"] == pytest.approx(1.0)


def test_intervals_widen_with_noise_and_verdicts_say_when_a_run_settles_nothing():
    sd15 = _load_script()
    rng = __import__("numpy").random.default_rng(0)
    quiet = {name: {"1": list(1 + 0.001 * rng.standard_normal(10))} for name in sd15.TIMED}
    noisy = {name: {"1": list(1 + 0.2 * rng.standard_normal(10))} for name in sd15.TIMED}
    lo_q, hi_q = sd15.ratio_intervals(quiet, [1])["merged_infer_vs_base"]
    lo_n, hi_n = sd15.ratio_intervals(noisy, [1])["merged_infer_vs_base"]
    assert hi_q - lo_q < 0.01 < hi_n - lo_n
    assert sd15.goal_verdict("merged_infer_vs_base", 1.0, 1.01, [lo_q, hi_q]) == "yes"
    assert sd15.goal_verdict("merged_infer_vs_base", 1.015, 1.01, [0.99, 1.07]) == "no (within noise)"
    assert sd15.goal_verdict("lora_selora_vs_peft", 0.99, 1.0, [0.93, 1.02]) == "yes (within noise)"
    assert sd15.goal_verdict("test_step_vs_plain", 1.2, 1.1, [1.15, 1.25]) == "no"
    assert sd15.goal_verdict("authors_test_step_vs_plain", 1.9, 2.0, [1.0, 3.0]) == "yes"
