"""benchmarks/gpu_check.py: its CPU variant (the GPU check's own code at widths 32 / 48, gloo for
NCCL) runs here, so the check the day a GPU machine is at hand does not rot; its verdict fails on
each kind of bad result; ``make gpu-check`` runs it from the checkout with no install step."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402 (benchmarks/ is not a package)

METHODS = ("selora", "lora", "dylora", "adalora")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One CPU-variant run of the script as a command line: ``(its out dir, its JSON)``."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = os.environ | {"SELORA_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-variant", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def _finite(values: list[float]) -> bool:
    return bool(values) and all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_cpu_variant_trains_every_method_in_both_half_precisions(run: tuple[Path, dict[str, Any]]) -> None:
    _, res = run
    plan = res["plan"]
    assert res["cpu_variant"] and plan["device"] == "cpu" and (plan["width"], plan["text_width"]) == (32, 48)
    rows = {(r["method"], r["dtype"]): r for r in res["methods"]}
    assert set(rows) == {(m, d) for m in METHODS for d in ("float16", "bfloat16")}
    for (method, dtype), r in rows.items():
        where = f"{method} {dtype}"
        assert r["skipped"] == [] and len(r["losses"]) == r["steps"] == plan["steps"], where
        assert _finite(r["losses"]), where
        assert all(s == 1.0 for s in r["grad_scales"]) == (dtype == "bfloat16"), f"{where}: GradScaler only for fp16"
    for dtype in ("float16", "bfloat16"):
        lora, selora = rows[("lora", dtype)], rows[("selora", dtype)]
        assert lora["total_rank"] == [4 * lora["layers"]] * 2  # fixed rank 4 on the paper's targets
        assert selora["layers"] == lora["layers"] > 0  # the same targets for every method
        assert rows[("adalora", dtype)]["total_rank"][1] < rows[("adalora", dtype)]["total_rank"][0]  # pruned


def test_cpu_variant_tests_for_expansion_at_every_step(run: tuple[Path, dict[str, Any]]) -> None:
    _, res = run
    for r in [row for row in res["methods"] if row["method"] == "selora"] + [res["ddp"]]:
        where = f"selora {r['dtype']}"
        assert r["tests"] == r["steps"] and r["ratios_finite"] is True, where
        lo, hi = r["ratio_range"]
        assert 1.0 <= lo <= hi and math.isfinite(hi), where  # Eq. 5 in the working direction
        # lambda = 1: every layer grows at every test, and each grown row is the K that was scored
        assert r["k_checked"] == r["layers"] * r["steps"] and r["k_installed"] is True, where
        assert r["total_rank"] == [r["layers"], r["layers"] * (1 + r["steps"])], where
        assert len(r["k_digests"]) == r["steps"] and len(set(r["k_digests"])) == r["steps"], where  # fresh K each test
    for r in res["methods"]:
        if r["method"] != "selora":
            assert r["tests"] == 0 and r["k_checked"] == 0 and r["ratio_range"] is None


def test_cpu_variant_starts_ddp_on_one_gloo_process(run: tuple[Path, dict[str, Any]]) -> None:
    _, res = run
    ddp = res["ddp"]
    assert (ddp["backend"], ddp["world"], ddp["method"], ddp["dtype"]) == ("gloo", 1, "selora", "float16")
    assert ddp["same_k"] is True and ddp["skipped"] == [] and ddp["rewraps"] == ddp["steps"]
    plain = next(r for r in res["methods"] if (r["method"], r["dtype"]) == ("selora", "float16"))
    # one process under DDP trains like no DDP at all: same K drawn, same ranks
    assert ddp["k_digests"] == plain["k_digests"] and ddp["total_rank"] == plain["total_rank"]


def test_cpu_variant_measures_speed_and_memory(run: tuple[Path, dict[str, Any]]) -> None:
    _, res = run
    plan = res["plan"]
    assert list(res["timing"]) == [str(px) for px in plan["resolutions"]] == list(res["ratios"])
    for px, per in res["timing"].items():
        assert list(per) == list(gpu_check.TIMED), px
        for name, c in per.items():
            assert len(c["seconds"]) == plan["timed"] and _finite(c["seconds"]), (px, name)
            assert all(s > 0 for s in c["seconds"]) and c["median_s"] > 0 and c["peak_bytes"] > 0, (px, name)
        assert per["frozen"]["trainable"] == 0 < per["selora_r1"]["trainable"] < per["lora_peft"]["trainable"]
        assert _finite(list(res["ratios"][px].values())) and min(res["ratios"][px].values()) > 0, px
    assert 0 < res["elapsed_s"] <= plan["budget_s"]


def test_cpu_variant_writes_json_and_markdown(run: tuple[Path, dict[str, Any]]) -> None:
    out, res = run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temp file left
    assert res["ok"] is True and all(res["checks"].values()) and len(res["checks"]) == 10
    md = (out / "gpu_check.md").read_text()
    assert md == gpu_check.markdown(res) and md.startswith("# GPU check (CPU variant): PASSED")
    assert all(f"| {name} | yes |" in md for name in res["checks"])


@pytest.mark.parametrize(
    ("check", "spoil"),
    [
        ("no skipped step", lambda r: r["methods"][3]["skipped"].append("non-finite gradient")),
        ("finite losses", lambda r: r["ddp"]["losses"].__setitem__(0, math.nan)),
        ("every method x dtype ran", lambda r: r["methods"].pop()),
        ("selora: a test every step, finite ratios", lambda r: r["methods"][0].update(ratios_finite=False)),
        ("selora: K installed = K scored", lambda r: r["ddp"].update(k_installed=False)),
        ("selora: every layer grew at every test", lambda r: r["methods"][0].update(layers_grown_every_test=False)),
        ("ddp: 1 process, rewrapped after every expansion", lambda r: r["ddp"].update(rewraps=0)),
        ("ddp: same K on every process", lambda r: r["ddp"].update(same_k=False)),
        ("timing: positive finite times and peaks", lambda r: r["timing"]["32"]["frozen"]["seconds"].append(0.0)),
        ("within the time budget", lambda r: r.update(elapsed_s=r["plan"]["budget_s"] + 1)),
    ],
)
def test_each_check_fails_on_its_bad_result(run: tuple[Path, dict[str, Any]], check: str, spoil) -> None:
    res = copy.deepcopy(run[1])
    spoil(res)
    verdict = gpu_check.checks(res)
    assert [name for name, ok in verdict.items() if not ok] == [check]
    res["checks"], res["ok"] = verdict, False
    assert gpu_check.markdown(res).startswith("# GPU check (CPU variant): FAILED")


def test_bad_out_dir_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        gpu_check.parse_args(["--cpu-variant", "--out-dir", str(tmp_path / "absent")])
    assert err.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].endswith(f"--out-dir {tmp_path / 'absent'}: not a directory")
    )


def test_make_gpu_check_runs_from_the_checkout_with_the_wheels(tmp_path: Path) -> None:
    """``make gpu-check`` installs nothing: the checkout and every wheels/*.whl go on PYTHONPATH."""
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "diffusers-0.0.0-py3-none-any.whl"
    wheel.touch()
    out = subprocess.run(
        ["make", "-n", "-f", str(ROOT / "Makefile"), "gpu-check", "PYTHON=python3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    command = [line for line in out.splitlines() if "gpu_check.py" in line]
    assert len(command) == 1 and "pip" not in out and ".venv" not in out, out
    assert f"PYTHONPATH={tmp_path}:{wheel}" in command[0], command[0]
    assert command[0].endswith("python3 benchmarks/gpu_check.py --device cuda --out-dir runs/gpu-check")
