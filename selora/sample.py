"""Sample from a trained run: the base pipeline with the run's adapters (unmerged or merged).

    python -m selora.sample --run RUN_DIR (--prompts FILE | --split test) [--guidance 7.5]
        [--steps 25] [--seed 0] [--batch 4] [--limit N] [--merged] [--adapters best|last] [--out DIR]

Writes ``NNN.png`` per image, ``grid.png`` (prompts underneath) and ``prompts.json`` into
``--out`` (default ``RUN_DIR/samples/<prompts file stem or split>``). Image i is drawn with the
generator seed ``seed + i``, so an image does not depend on the batch size. A prompts file holds
one prompt per line (blank lines and lines starting with ``#`` are skipped) or a JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from selora.config import ConfigError
from selora.data import DataError, split_prompts
from selora.rundir import load_run, run_config


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    resolution: int,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    batch: int = 4,
    progress: bool = True,
) -> list[Image.Image]:
    """One PIL image per prompt (``resolution`` px square); image i uses a CPU generator seeded ``seed + i``."""
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress, leave=False):
        chunk = list(prompts[start : start + batch])
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        out = pipe(
            chunk,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pil",
        )
        images.extend(out.images)
    return images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 1, H, W)`` images in [-1, 1] -> N grayscale PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a[0].numpy(), mode="L") for a in arr]


def image_grid(images: Sequence[Image.Image], captions: Sequence[str], cols: int = 4, width: int = 24) -> Image.Image:
    """Tiles in rows of ``cols`` with each caption wrapped at ``width`` characters underneath."""
    if not images:
        raise ValueError("image_grid: no images")
    w, h = images[0].size
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, width)[:4] or [""] for c in captions]
    line_h = 11
    cap_h = line_h * max(len(lines) for lines in wrapped) + 4
    tile_w = max(w, 6 * width + 4)
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tile_w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % cols) * tile_w, (i // cols) * (h + cap_h)
        grid.paste(img.convert("RGB"), (x + (tile_w - w) // 2, y))
        for k, line in enumerate(lines):
            draw.text((x + 2, y + h + 2 + k * line_h), line, fill="black", font=font)
    return grid


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line, ``#`` comments) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--prompts {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"--prompts {path}: expected a JSON list of strings")
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts")
    return prompts


def save_samples(images: Sequence[Image.Image], prompts: Sequence[str], out: Path, cols: int = 4) -> Path:
    """Write ``NNN.png``, ``grid.png`` and ``prompts.json`` into ``out``; returns the grid path."""
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(out / f"{i:03d}.png")
    (out / "prompts.json").write_text(json.dumps(list(prompts), indent=1), encoding="utf-8")
    grid = image_grid(images, prompts, cols=min(cols, len(images)))
    grid.save(out / "grid.png")
    return out / "grid.png"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (module docstring); exit 2 with a one-line error on bad input."""
    ap = argparse.ArgumentParser(prog="python -m selora.sample", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a run directory written by selora.train")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="text file (one prompt a line) or JSON list")
    src.add_argument("--split", help="prompts of a data split of the run's data set (e.g. test)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--merged", action="store_true", help="fold the adapters into the weights first")
    ap.add_argument("--adapters", choices=("best", "last"), default="best")
    ap.add_argument("--out", type=Path, help="output folder (default RUN_DIR/samples/<name>)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.steps < 1 or args.batch < 1 or args.guidance < 0 or (args.limit is not None and args.limit < 1):
            raise ConfigError("--steps, --batch, --limit must be >= 1 and --guidance >= 0")
        cfg = run_config(args.run)
        if args.prompts is not None:
            prompts, name = read_prompts(args.prompts), args.prompts.stem
        else:
            try:
                prompts, name = split_prompts(cfg, args.split), args.split
            except DataError as err:
                raise ConfigError(f"--split {args.split}: {err}") from None
        cfg, pipe = load_run(args.run, adapters=args.adapters, merged=args.merged)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = prompts[: args.limit] if args.limit else prompts
    images = generate(
        pipe, prompts, cfg.resolution, args.steps, args.guidance, args.seed, args.batch, progress=not args.no_progress
    )
    out = args.out or args.run / "samples" / (name + ("-merged" if args.merged else ""))
    grid = save_samples(images, prompts, out)
    print(f"wrote {len(images)} images and {grid.name} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
