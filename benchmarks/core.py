"""Cost of SeLoRA's hook-captured Fisher test step, on SD-1.5-sized linear layers.

Prints, measured interleaved in one run (fastest CPU time per step over rounds):
  test step / plain step            (goal <= 1.10; the authors' extra forward+backward costs ~2x)
  signal test step / fi-ratio test step   (goal <= 1.02: the signal test of selora.core.signal is no
                                            slower than the paper's test on the same step)
  SeLoRA plain step / LoRA plain step at equal rank   (goal <= 1.02)
  selora LoRA plain step / PEFT LoRA plain step       (goal <= 1.00; the layer-level view of
                                                        sd15.py's ``lora_selora_vs_peft``)
and, for reference, a plain step followed by an extra forward+backward (what the authors' code does).

Usage: python benchmarks/core.py [--quick] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import selora
from selora.core.criteria import FIRatio, SignalTest

#: (width, tokens): UNet levels of SD 1.5 at 224 px (28x28, 14x14, 7x7 latents)
SD_LEVELS = ((320, 28 * 28), (640, 14 * 14), (1280, 7 * 7))
QUICK_LEVELS = ((64, 64), (128, 16))


class Level(nn.Module):
    """q, k, v, out projections and a 4x feed-forward at one width, on (N, T, C) tokens."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.out(torch.tanh(self.q(x)) * self.k(x) + self.v(x))
        return h + self.ff2(nn.functional.gelu(self.ff1(h)))


class Stack(nn.Module):
    def __init__(self, levels: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.levels = nn.ModuleList(Level(w) for w, _ in levels)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return sum(level(x).pow(2).mean() for level, x in zip(self.levels, xs))


def make_step(kind: str, levels: tuple[tuple[int, int], ...], rank: int, batch: int, mode: str) -> Callable[[], None]:
    """One training step of a fresh model: ``kind`` lora | selora | peft, ``mode`` plain | test |
    signal-test | extra-pass."""
    torch.manual_seed(0)
    model = Stack(levels)
    if kind == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        model.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names), model)
    else:
        selora.inject(model, "all-linear", kind=kind, rank=rank)
    with torch.no_grad():
        for p in selora.trainable_parameters(model):
            if p.dim() == 2 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.01)  # non-zero B: realistic gradients for A too
    opt = torch.optim.AdamW(selora.trainable_parameters(model), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, t, w, generator=g) for w, t in levels]
    ctl = None
    if kind == "selora":
        # test mode: every step is a test step; nothing expands, so shapes stay comparable
        interval = 1 if mode in ("test", "signal-test") else 10**9
        criterion = SignalTest(alpha=0.001) if mode == "signal-test" else FIRatio(1e30)
        ctl = selora.ExpansionController(model, opt, criterion, interval=interval, max_rank=rank)

    def step() -> None:
        model(xs).backward()
        opt.step()
        if ctl is not None:
            ctl.step()
        if mode == "extra-pass":
            model(xs).backward()  # the authors' separate scoring pass
        opt.zero_grad(set_to_none=True)

    return step


def run(
    levels: tuple[tuple[int, int], ...] = SD_LEVELS, rank: int = 4, batch: int = 2, rounds: int = 15, warmup: int = 2
) -> dict[str, float]:
    """Fastest CPU seconds per step of each variant over ``rounds`` interleaved rounds.

    CPU time (``time.process_time``) and the minimum are the measurements least disturbed by other
    processes on shared cores; the variant order rotates every round; the control repeats LoRA to
    show the remaining noise floor."""
    variants = {
        "lora plain": make_step("lora", levels, rank, batch, "plain"),
        "lora plain (control)": make_step("lora", levels, rank, batch, "plain"),
        "peft lora plain": make_step("peft", levels, rank, batch, "plain"),
        "selora plain": make_step("selora", levels, rank, batch, "plain"),
        "selora test step": make_step("selora", levels, rank, batch, "test"),
        "selora signal test step": make_step("selora", levels, rank, batch, "signal-test"),
        "plain + extra fwd/bwd": make_step("lora", levels, rank, batch, "extra-pass"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(warmup + rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            step = variants[name]
            t0 = time.process_time()
            step()
            if r >= warmup:
                times[name].append(time.process_time() - t0)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny widths and few rounds (smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 15, quick 3)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.set_num_threads(args.threads)
    levels = QUICK_LEVELS if args.quick else SD_LEVELS
    rounds = args.rounds or (3 if args.quick else 15)
    print(
        f"levels (width, tokens): {levels}; rank {args.rank}; batch {args.batch}; "
        f"rounds {rounds}; threads {args.threads}; torch {torch.__version__}"
    )
    med = run(levels, args.rank, args.batch, rounds)
    for name, t in med.items():
        print(f"  {name:<24s} {1000 * t:9.2f} ms/step (CPU)")
    print(f"test step / plain step (goal <= 1.10):        {med['selora test step'] / med['selora plain']:.3f}")
    signal = med["selora signal test step"] / med["selora test step"]
    print(f"signal test step / fi-ratio test step (<= 1.02): {signal:.3f}")
    print(f"SeLoRA plain / LoRA plain, rank {args.rank} (<= 1.02): {med['selora plain'] / med['lora plain']:.3f}")
    print(f"selora LoRA / PEFT LoRA, rank {args.rank} (<= 1.00): {med['lora plain'] / med['peft lora plain']:.3f}")
    print(f"plain + extra fwd/bwd / plain (authors):      {med['plain + extra fwd/bwd'] / med['lora plain']:.3f}")
    print(f"noise floor, LoRA control / LoRA:             {med['lora plain (control)'] / med['lora plain']:.3f}")


if __name__ == "__main__":
    main()
