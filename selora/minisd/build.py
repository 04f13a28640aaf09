"""Build the offline profile's mini Stable Diffusion for 128 px radiographs (issue #27 item 2).

::

    python -m selora.minisd.build --out DIR              # the full build, resumable
    python -m selora.minisd.build --quick --out DIR      # a two-minute smoke test of every stage

Stages (:mod:`selora.minisd.stages`) keep their results in a build folder (``--work``, default in
the cache); past ``--hours`` of wall time the running stage snapshots and the command exits with
code 3: the same command resumes it. The pipeline folder (fp16 safetensors, SD v1.5's layout) gets
``training_log.json`` (steps, seconds, losses, PSNRs, the judge's accuracies), ``samples.png`` (each
probe prompt's first sample, in prompt order, eight a row) and is replaced atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from selora.minisd import shapes, stages, views
from selora.minisd.judge import judge_samples
from selora.minisd.save import assemble, save_folder
from selora.minisd.training import Paused, thin
from selora.paths import cache_dir
from selora.profile import seed_everything, set_threads
from selora.tokenizer import load_clip_tokenizer

FULL = {
    "text_encoder": 800,
    "vae": 2500,
    "unet": 9000,
    "judge": 600,
    "shapes": 6000,
    "views": 2000,
    "judge_views": 640,
    "probe_shapes": 42,
    "probe_seeds": 6,
}
QUICK = {
    **dict.fromkeys(("text_encoder", "vae", "unet", "judge"), 3),
    "shapes": 32,
    "views": 8,
    "judge_views": 10,
}
QUICK.update(probe_shapes=7, probe_seeds=1)
PASS = 0.9  # the share of samples whose every stated attribute the judge must find (per attribute)
# Classifier-free guidance of the probe's samples. SD v1.5's 7.5 saturates this small model (objects
# brighten, tones merge: tone 54 %, shape 64 % at 7.5); picked on a grid of 1.5-4 with seeds 0-1 and
# confirmed on seeds 2-5 (every attribute >= 98 % at 2.5).
GUIDANCE = 2.5


def probe_prompts(rng: np.random.Generator, n_shapes: int = 42) -> list[str]:
    """Full captions: ``n_shapes`` objects (every tone equally often) and every view x facing x phrasing."""
    out = []
    for i in range(n_shapes):
        attrs = shapes.draw_attributes(rng)
        attrs["tone"] = tuple(shapes.TONES)[i % len(shapes.TONES)]
        out.append(shapes.caption(attrs, rng, drop=0.0))
    for view in views.VIEWS:
        for facing in views.FACING:
            for phrase in views.PHRASES[view][:2]:
                out.append(f"{phrase}, patient facing {facing}")
    return out


def generate(pipe, prompts: list[str], seeds: list[int], guidance: float = GUIDANCE) -> np.ndarray:
    """Every prompt with every seed (prompt-major), 25 PNDM steps at ``guidance``: (P*len(seeds), S, S, 3)."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    prompts = [p for p in prompts for _ in seeds]
    return np.concatenate(
        [
            pipe(
                prompts[i : i + 32],
                num_inference_steps=25,
                guidance_scale=guidance,
                generator=gens[i : i + 32],
                output_type="np",
            ).images
            for i in range(0, len(prompts), 32)
        ]
    )


def grid_png(images: np.ndarray, cols: int) -> bytes:
    """Images (n, S, S, 3) in [0, 1] as one PNG, ``cols`` per row."""
    from PIL import Image

    s = images.shape[1]
    rows = -(-len(images) // cols)
    canvas = np.ones((rows * (s + 2), cols * (s + 2), 3))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (s + 2) : r * (s + 2) + s, c * (s + 2) : c * (s + 2) + s] = im
    buf = io.BytesIO()
    Image.fromarray(np.round(canvas * 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m selora.minisd.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    ap.add_argument("--work", type=Path, help="build folder of the stages' results (default: in the cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--hours", type=float, default=2.0, help="wall time after which the build pauses (exit 3)")
    ap.add_argument("--quick", action="store_true", help=f"smoke-test sizes {QUICK}")
    ap.add_argument(
        "--guidance", type=float, default=GUIDANCE, help=f"classifier-free guidance of the probe (default {GUIDANCE})"
    )
    for name, value in FULL.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"steps or set size (default {value})")
    args = ap.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.guidance < 1:
        ap.error(f"--guidance must be at least 1 (1: no guidance), got {args.guidance}")
    if args.judge_views < 5:
        ap.error(f"--judge-views must be at least 5 (a fifth is held out), got {args.judge_views}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: exists and is not a folder")
    if args.work is None:
        args.work = cache_dir("mini-sd-build") / ("quick" if args.quick else f"seed-{args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()
    steps = {k: getattr(args, k) for k in ("text_encoder", "vae", "unet", "judge")}
    b = stages.Build(args.work, args.seed, steps, deadline=t_start + 3600 * args.hours)
    tokenizer = load_clip_tokenizer("offline")
    try:
        text_encoder, text = stages.text_stage(b, tokenizer)
        pool, pool_attrs = stages.view_pool(b, "views", args.views, key=30)
        judge_pool, judge_attrs = stages.view_pool(b, "judge_views", args.judge_views, key=31)
        vae, vae_result = stages.vae_stage(b, pool, judge_pool[-32:])
        objs, obj_attrs = stages.shapes_set(args.shapes, b.rng(32))
        latents, scaling = stages.latent_stage(b, vae, {"shapes": objs, "views": pool})
        vae.register_to_config(scaling_factor=scaling)
        unet, unet_result = stages.unet_stage(
            b, text_encoder, tokenizer, latents, {"shapes": obj_attrs, "views": pool_attrs}, scaling
        )
        judge, judge_result = stages.judge_stage(b, judge_pool, judge_attrs)
    except Paused as stop:
        print(f"{stop} after {args.hours} h: run the same command again to resume", file=sys.stderr)
        return 3
    pipe = assemble(vae, text_encoder, tokenizer, unet)
    prompts = probe_prompts(b.rng(60), args.probe_shapes)
    seeds = list(range(args.probe_seeds))
    images = generate(pipe, prompts, seeds, args.guidance)
    probe = judge_samples(judge, images, [p for p in prompts for _ in seeds])
    results = {
        "text_encoder": text,
        "vae": vae_result,
        "unet": unet_result,
        "judge": judge_result,
    }
    log = {
        "seed": args.seed,
        "steps": steps,
        "sizes": {k: getattr(args, k) for k in ("shapes", "views", "judge_views", "probe_shapes", "probe_seeds")},
        "threads": torch.get_num_threads(),
        "versions": {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers")},
        "parameters": {
            k: sum(p.numel() for p in m.parameters())
            for k, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))
        },
        "vae_scaling_factor": scaling,
        "seconds": {k: r["seconds"] for k, r in results.items()},
        **{
            k: {**{f: v for f, v in r.items() if f != "loss"}, "loss_every_25_steps": thin(r["loss"])}
            for k, r in results.items()
        },
        "probe": {
            "prompts": prompts,
            "seeds": seeds,
            "guidance": args.guidance,
            "judged": probe,
            "pass": PASS,
            "passed": all(v["accuracy"] >= PASS for v in probe.values()),
        },
    }
    extras = {
        "training_log.json": json.dumps(log, indent=1).encode(),
        "samples.png": grid_png(images[:: len(seeds)], 8),
    }
    save_folder((vae, text_encoder, tokenizer, unet), args.out, extras)
    print(f"judged: {json.dumps(probe)}")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
