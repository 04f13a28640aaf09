"""The 128 px mini SD's builder (selora.minisd): captions state exactly their attributes, objects and
views are drawn as captioned, the judge scores what prompts state, a stopped stage resumes to the
same weights, and the quick build writes a folder stock diffusers loads (and resumes to the same one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from selora.data import ct as ct_module
from selora.data.drr import build_scene
from selora.minisd import build, shapes, views
from selora.minisd.domains import ATTRIBUTES, DOMAINS, labels, random_captions, stated
from selora.minisd.judge import judge_samples
from selora.minisd.training import EMA, Loop, Paused


@pytest.mark.parametrize("name", list(DOMAINS))
def test_a_full_caption_states_exactly_its_attributes(name):
    domain, rng = DOMAINS[name], np.random.default_rng(0)
    for _ in range(300):
        attrs = domain.draw_attributes(rng)
        want = {k: v for k, v in attrs.items() if not (k == "striped" and v == "plain")}  # plain is never said
        assert stated(domain.caption(attrs, rng, drop=0.0)) == {"domain": name, **want}


def test_a_caption_with_words_left_out_states_a_subset_and_the_empty_prompt_nothing():
    rng = np.random.default_rng(1)
    for text in random_captions(400, rng, empty=0.0):
        said = stated(text)
        assert said["domain"] in DOMAINS and set(said) <= set(ATTRIBUTES)
        assert set(said) - {"domain"} <= set(DOMAINS[said["domain"]].ATTRIBUTES)
    assert stated("") == {} and labels("") == {k: len(v) for k, v in ATTRIBUTES.items()}


def test_an_object_is_drawn_in_its_cell_in_its_tone():
    rng = np.random.default_rng(2)
    for _ in range(40):
        attrs = {**shapes.draw_attributes(rng), "size": "large", "striped": "plain"}
        img = shapes.render(attrs, rng)
        cover = np.abs(img - img[:, :1, :1]).sum(0) > 0.2
        ys, xs = np.nonzero(cover)
        cy, cx = ys.mean() / shapes.UNIT, xs.mean() / shapes.UNIT  # canvas units
        assert min(shapes.ROWS, key=lambda r: abs(shapes.ROWS[r] - cy)) == attrs["row"]
        assert min(shapes.COLS, key=lambda c: abs(shapes.COLS[c] - cx)) == attrs["col"]
        assert np.array_equal(img[0], img[1]) and np.array_equal(img[0], img[2])  # gray
        tone = img[0, cover].mean()
        assert min(shapes.TONES, key=lambda t: abs(shapes.TONES[t] - tone)) == attrs["tone"]


@pytest.fixture(scope="module")
def scene():
    return build_scene(ct_module.load_chest_ct())


def test_a_lateral_view_facing_left_is_nearer_the_mirror_of_one_facing_right(scene):
    """Same patient and exposure from +yaw and -yaw: the image correlates more with the other's mirror
    image than with the other image (on average over patients: framing jitter is not mirrored)."""
    gaps = []
    for seed in range(4):
        left, right = (
            views.render({"view": "lateral", "facing": f}, scene, np.random.default_rng(seed))[0] for f in views.FACING
        )
        assert left.shape == (shapes.SIZE, shapes.SIZE) and 0.1 < left.std()
        mirrored = np.corrcoef(left.ravel(), right[:, ::-1].ravel())[0, 1]
        gaps.append(mirrored - np.corrcoef(left.ravel(), right.ravel())[0, 1])
    assert np.mean(gaps) > 0.1, gaps


class FixedJudge(torch.nn.Module):
    """Answers the class ``answers[attribute]`` for every image."""

    def __init__(self, answers: dict[str, int]) -> None:
        super().__init__()
        self.answers = answers

    def forward(self, images):
        return {
            k: torch.nn.functional.one_hot(torch.full((len(images),), i), len(ATTRIBUTES[k])).float()
            for k, i in self.answers.items()
        }


def test_judged_accuracy_counts_only_the_attributes_each_prompt_states():
    prompts = ["a large white circle on the left", "a small light square", "a lateral chest radiograph, facing left"]
    answers = {k: 0 for k in ATTRIBUTES}  # shapes, circle, white, small, upper, left, plain, lateral, left
    got = judge_samples(FixedJudge(answers), np.zeros((3, 8, 8, 3)), prompts)
    assert got["domain"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert got["shape"] == {"accuracy": 0.5, "n": 2} and got["tone"] == {"accuracy": 0.5, "n": 2}
    assert got["size"] == {"accuracy": 0.5, "n": 2} and got["col"] == {"accuracy": 1.0, "n": 1}
    assert got["view"] == {"accuracy": 1.0, "n": 1} and "striped" not in got
    assert got["row"] == {"accuracy": 0.0, "n": 1}  # "on the left" is the middle row; the judge said upper


def _loop(folder, steps, deadline=None):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    loop = Loop(
        "toy",
        folder,
        module,
        list(module.parameters()),
        steps,
        0.05,
        np.random.default_rng(0),
        torch.Generator().manual_seed(0),
        ema=EMA(module),
        every=2,
        deadline=deadline,
    )
    x = torch.randn(16, 3)

    def loss(step):
        noise = torch.randn(16, 2, generator=loop.gen) + float(loop.rng.normal())
        return (module(x) - noise).pow(2).mean()

    return loop, loss


def test_a_stopped_loop_resumes_to_the_same_weights_ema_and_log(tmp_path):
    whole, loss = _loop(tmp_path / "whole", 6)
    whole.run(loss)
    stopped, loss = _loop(tmp_path / "parts", 6, deadline=0.0)  # past its deadline at the first snapshot
    with pytest.raises(Paused, match="toy paused at step 2/6"):
        stopped.run(loss)
    resumed, loss = _loop(tmp_path / "parts", 6)
    assert resumed.step == 2
    resumed.run(loss)
    assert resumed.log == whole.log and len(whole.log) == 6
    for a, b in zip(
        [*resumed.module.parameters(), *resumed.ema.shadow], [*whole.module.parameters(), *whole.ema.shadow]
    ):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_quick_build_writes_a_stock_pipeline_and_resumes_to_the_same_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    out, work = tmp_path / "out", tmp_path / "work"
    assert build.main(["--quick", "--out", str(out), "--work", str(work), "--threads", "1"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.vae.config.block_out_channels == [16, 32, 64, 96] and pipe.unet.config.sample_size == 16
    log = json.loads((out / "training_log.json").read_text())
    judged = log["probe"]["judged"]
    assert set(judged) == set(ATTRIBUTES) - {"striped"} or set(judged) == set(ATTRIBUTES)
    assert all(0 <= v["accuracy"] <= 1 and v["n"] > 0 for v in judged.values())
    assert set(log["vae"]["held_out_psnr_db"]) == {"frontal_stand_in_scans", "views", "shapes", "generic"}
    again = tmp_path / "again"  # every stage's result is in the build folder: nothing retrains
    assert build.main(["--quick", "--out", str(again), "--work", str(work), "--threads", "1"]) == 0
    for part in ("unet", "vae", "text_encoder"):
        assert (
            next((out / part).glob("*.safetensors")).read_bytes()
            == next((again / part).glob("*.safetensors")).read_bytes()
        )


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        build.main(["--out", str(tmp_path), "--unet", "0"])
    assert err.value.code == 2 and "--unet must be a positive integer, got 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        build.main(["--out", str(tmp_path / "file")])
    assert err.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        build.main(["--out", str(tmp_path), "--guidance", "0.5"])
    assert err.value.code == 2 and "--guidance must be at least 1 (1: no guidance), got 0.5" in capsys.readouterr().err
