"""The evaluation script (Table 1 counterpart) end to end on the tiny pipeline and the phantom set:
every (method, seed) through the trainer, test-split samples, proxy metrics, JSON + markdown."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch
from helpers.tiny_runs import tiny_overrides
from safetensors.torch import load_file

from selora.config import load_config
from selora.evaluate import held_out_split, main, summary_table
from selora.metrics import evaluate

pytestmark = pytest.mark.usefixtures("assets_cache")


def sets(assets, **extra) -> list[str]:
    items = tiny_overrides(assets, epochs=1, batch_size=16, num_samples=0, sample_steps=2, **extra)
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("SELORA_THREADS", "1")  # main() sets the thread count from the environment


def test_experiment_writes_per_run_and_per_method_results_with_provenance(assets, tmp_path, capsys):
    out = tmp_path / "exp"
    args = [
        "--methods",
        "lora,adalora",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        *sets(assets),
        "--limit",
        "4",
        "--batch",
        "4",
        "--no-progress",
    ]
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("lora", 0), ("lora", 1), ("adalora", 0), ("adalora", 1)]

    # each run: the metrics are the profile's metrics of exactly the saved samples vs the real test images
    cfg = load_config(
        "montgomery-offline", tiny_overrides(assets, epochs=1, batch_size=16, num_samples=0, sample_steps=2)
    )
    prompts, real = held_out_split(cfg, 4)
    for r in runs:
        run = out / r["run_dir"]
        assert r["prompts"] == prompts and r["num_test_images"] == 4
        pixels = load_file(str(run / "test-samples.safetensors"))["images"]
        assert pixels.shape == (4, 1, 16, 16) and pixels.dtype == torch.uint8
        again = evaluate(pixels.float() / 127.5 - 1, prompts, real, profile="offline")
        assert again == pytest.approx(r["metrics"], rel=1e-9), "metrics are not those of the saved samples"
        adapters = load_file(str(run / "best" / "adapters.safetensors"))
        assert r["trainable"] == sum(t.numel() for t in adapters.values())
        assert r["trainable_fraction"] == r["trainable"] / r["parameters"]["total"]["base"]
        assert r["ranks"] == json.loads((run / "best" / "ranks.json").read_text())
        assert r["total_rank"] == sum(r["ranks"].values())
        assert r["train_seconds"] > 0 and r["sample_seconds"] > 0 and not r["resumed"]
    # the tiny model's frozen UNet + text encoder, counted independently
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    base = sum(
        p.numel()
        for m in (
            UNet2DConditionModel.from_pretrained(assets["model"], subfolder="unet"),
            CLIPTextModel.from_pretrained(assets["model"], subfolder="text_encoder"),
        )
        for p in m.parameters()
    )
    assert {r["parameters"]["total"]["base"] for r in runs} == {base}
    lora, ada = (next(r for r in runs if r["method"] == m) for m in ("lora", "adalora"))
    assert ada["trainable"] > lora["trainable"], "AdaLoRA allocates rank 6 (A, B, E) against LoRA's 4"

    # per method: mean and sample std over the seeds of the per-run numbers
    for method, row in results["summary"].items():
        mine = [r for r in runs if r["method"] == method]
        assert row["seeds"] == [0, 1]
        for key, stat in row["metrics"].items():
            values = [r["metrics"][key] for r in mine]
            assert stat["mean"] == pytest.approx(statistics.mean(values))
            assert stat["std"] == pytest.approx(statistics.stdev(values))
        assert row["train_seconds"]["mean"] == pytest.approx(statistics.mean(r["train_seconds"] for r in mine))

    prov = results["provenance"]
    assert prov["profile"] == "offline" and prov["seeds"] == [0, 1] and prov["methods"] == ["lora", "adalora"]
    assert re.fullmatch(r"[0-9a-f]{64}", prov["data_sha256"]) and re.fullmatch(r"[0-9a-f]{64}", prov["model"]["sha256"])
    assert prov["git"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"])
    assert set(prov["metrics"]) == {"frechet", "alignment"} and prov["num_test_images"] == 4
    text = (out / "results.json").read_text() + (out / "results.md").read_text()
    assert str(tmp_path) not in text and str(assets["model"].parent) not in text, "absolute paths in the results"

    table = (out / "results.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith(("| lora", "| adalora"))]
    assert len(rows) == 2 and all(" ± " in ln for ln in rows)
    assert "Fréchet distance (offline proxy)" in table and "alignment score (offline proxy)" in table
    assert f"{results['summary']['lora']['metrics']['fid_proxy']['mean']:.2f}" in rows[0]
    with_floor = summary_table(results["summary"], {"real scans": {"fid_proxy": 12.345, "alignment_proxy": 67.891}})
    assert with_floor.splitlines()[:4] == table.split("\n\n")[1].splitlines()[:4], "methods first, unchanged"
    assert with_floor.splitlines()[-1].startswith("| real scans |  | 12.35 | 67.89 |")
    with pytest.raises(KeyError, match="reference\\['base'\\]: no value for 'alignment_proxy'"):
        summary_table(results["summary"], {"base": {"fid_proxy": 1.0}})

    # a re-run re-uses the finished runs; a different config for the same folder is refused
    stamp = (out / "runs" / "lora-seed0" / "evaluation.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "lora-seed0" / "evaluation.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    capsys.readouterr()
    assert main([*args, "--set", "lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora-seed0: trained with a different config (lr: 0.01 there, 0.5 now)" in err[0], err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "lora,dora"], "--methods: unknown method 'dora'"),
        (["--seeds", "0,x"], "--seeds 0,x: expected a comma-separated list of int"),
        (["--seeds", "1,1"], "without repeats"),
        (["--set", "seed=3"], "--set seed=3: method and seed are set by --methods and --seeds"),
        (["--limit", "1"], "--limit 1: expected at least 2 test images"),
        (["--set", "lr=-1"], "key 'lr': expected a value >= 0"),
    ],
)
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "exp"
    assert main(["--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
