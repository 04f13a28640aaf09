"""Sampling from a trained run: the CLI, merged vs unmerged adapters, prompts, seeds, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.tiny_runs import tiny_overrides
from PIL import Image

from selora.config import load_config
from selora.models import load_pipeline
from selora.rundir import load_run
from selora.sample import generate, main, read_prompts
from selora.trainer import Trainer

pytestmark = pytest.mark.usefixtures("assets_cache")

PROMPTS = [
    "male, 40 years: normal",
    "female, 63 years: right upper lobe cavity",
    "female, 35 years: left pleural effusion",
]


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """A short SeLoRA run (6 steps, large lr so the adapters matter) with its checkpoint only."""
    out = tmp_path_factory.mktemp("sample") / "run"
    cfg = load_config("montgomery-offline", tiny_overrides(assets, num_samples=0, lr=0.05))
    Trainer(cfg, out, max_steps=6, progress=False).run()
    return out


def pixels(folder, n):
    return [np.asarray(Image.open(folder / f"{i:03d}.png"), dtype=np.int16) for i in range(n)]


def test_cli_writes_pngs_grid_and_prompts(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# CXR prompts\n" + "\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "--run",
                str(run),
                "--prompts",
                str(prompts),
                "--steps",
                "3",
                "--batch",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    imgs = pixels(out, 3)
    assert all(im.shape == (16, 16, 3) for im in imgs)
    assert json.loads((out / "prompts.json").read_text()) == PROMPTS
    assert Image.open(out / "grid.png").size[0] >= 3 * 16
    # the output depends on the prompt (same seed offset would otherwise be the only difference)
    same = tmp_path / "same"
    prompts.write_text("\n".join([PROMPTS[0]] * 3))
    assert (
        main(
            [
                "--run",
                str(run),
                "--prompts",
                str(prompts),
                "--steps",
                "3",
                "--seed",
                "-1",
                "--batch",
                "3",
                "--out",
                str(same),
                "--no-progress",
            ]
        )
        == 0
    )
    again = pixels(same, 3)
    assert np.abs(again[1] - imgs[0]).max() <= 1  # prompt 0 with seed -1 + 1 = 0, as above
    assert np.abs(again[2] - imgs[1]).mean() > 1  # same seed as image 1, other prompt


def test_images_do_not_depend_on_the_batch_size(run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, batch in ((a, "1"), (b, "3")):
        assert (
            main(
                [
                    "--run",
                    str(run),
                    "--split",
                    "test",
                    "--limit",
                    "3",
                    "--steps",
                    "2",
                    "--batch",
                    batch,
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    assert all(np.abs(x - y).max() <= 1 for x, y in zip(pixels(a, 3), pixels(b, 3)))
    cfg = load_config(run / "config.yaml")
    assert json.loads((a / "prompts.json").read_text()) == [p for p in load_run_prompts(cfg)][:3]


def load_run_prompts(cfg):
    from selora.data import split_prompts

    return split_prompts(cfg, "test")


def test_merged_equals_unmerged_and_adapters_change_the_output(run):
    _, unmerged = load_run(run, adapters="last")
    _, merged = load_run(run, adapters="last", merged=True)
    cfg = load_config(run / "config.yaml")
    base = load_pipeline(cfg.model, torch.float32, torch.device("cpu"))
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    kw = dict(resolution=16, steps=3, guidance=7.5, seed=0, batch=3, progress=False)
    u, m, b = (
        np.stack([np.asarray(i, dtype=np.int16) for i in generate(p, PROMPTS, **kw)]) for p in (unmerged, merged, base)
    )
    assert np.abs(u - m).max() <= 1, "merging changed the images"
    assert np.abs(u - b).mean() > 1.0, "the trained adapters do not change the images"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda run, tmp: ["--run", str(tmp / "nope"), "--split", "test"], "not a run directory"),
        (lambda run, tmp: ["--run", str(run), "--prompts", str(tmp / "missing.txt")], "no such file"),
        (lambda run, tmp: ["--run", str(run), "--split", "validation"], "--split validation"),
        (lambda run, tmp: ["--run", str(run), "--split", "test", "--steps", "0"], "must be >= 1"),
    ],
)
def test_bad_input_exits_2(run, tmp_path, capsys, make_args, message):
    assert main(make_args(run, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_prompt_files(tmp_path):
    js = tmp_path / "p.json"
    js.write_text(json.dumps(PROMPTS))
    assert read_prompts(js) == PROMPTS
    js.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of strings"):
        read_prompts(js)
    empty = tmp_path / "e.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
