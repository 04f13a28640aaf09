"""Time and memory of a paper-profile training run on a T4 or an A100: ESTIMATES until a GPU measures them.

No GPU has run the paper profile for this book yet (``make gpu-check`` is the command that will
measure it). Until then chapter 6 states what the arithmetic gives, labelled as an estimate:

* time: the floating-point operations of one training step, COUNTED by torch's ``FlopCounterMode``
  on SD v1.5 at full width built on the meta device (shapes only, no memory, seconds): text-encoder
  forward, UNet forward, and the backward to the adapters of both; divided by the GPU's dense fp16
  tensor-core peak times an ASSUMED utilisation (a range per GPU, :data:`GPUS`). Training steps
  only: the per-epoch evaluation and the sampling for FID come on top.
* memory: the frozen weights in fp16 (their parameter count x 2 bytes) plus the activations of
  the batch, scaled from the per-sample peak memory MEASURED on CPU in float32 at SD v1.5's shapes
  (``benchmarks/sd15.py``, shipped results: peak at batch 2 minus peak at batch 1) and halved for
  fp16, plus a fixed CUDA context (:data:`CUDA_CONTEXT_GIB`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from selora.core.inject import inject
from selora.paths import ASSETS_DIR

BENCHMARK_RESULTS = ASSETS_DIR / "benchmarks" / "results.json"
#: Assumed memory the CUDA context, cuDNN workspaces and the allocator's slack take, GiB.
CUDA_CONTEXT_GIB = 1.0
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """A GPU's dense fp16 tensor-core peak (vendor data sheet), its memory, and the ASSUMED fraction
    of the peak a diffusion fine-tuning step achieves there (low, high)."""

    name: str
    peak_tflops: float
    memory_gib: float
    utilisation: tuple[float, float]


#: The T4 is power-capped at 70 W and sustains far below its peak, hence its lower assumed range.
GPUS = (GPU("T4", 65.0, 16.0, (0.05, 0.20)), GPU("A100 40 GB", 312.0, 40.0, (0.15, 0.40)))


def train_step_flops(
    unet: nn.Module, text_encoder: nn.Module, batch: int, resolution: int, targets: tuple[str, str]
) -> int:
    """FLOPs of one training step: ``targets`` = (UNet, text-encoder) presets get rank-1 adapters,
    then text-encoder forward, UNet forward on ``(batch, 4, resolution/8, resolution/8)`` latents,
    and the backward to the adapters. Build the models on the meta device: nothing is computed."""
    device = next(unet.parameters()).device
    for model, target in zip((unet, text_encoder), targets):
        inject(model, target, kind="lora", rank=1)
    side = resolution // 8
    latents = torch.zeros(batch, 4, side, side, device=device)
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    ids = torch.zeros(batch, text_encoder.config.max_position_embeddings, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        text = text_encoder(ids).last_hidden_state
        unet(latents, steps, encoder_hidden_states=text).sample.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def activation_bytes_per_sample(results: dict | None = None, config: str = "lora_selora") -> float:
    """Per-sample float32 activation memory of a training step on CPU at SD v1.5's shapes: the measured
    peak at batch 2 minus the peak at batch 1 (``benchmarks/sd15.py`` results, default the shipped ones)."""
    results = results if results is not None else json.loads(BENCHMARK_RESULTS.read_text(encoding="utf-8"))
    peaks = results["memory"][config]
    return float(peaks["2"]["peak_bytes"] - peaks["1"]["peak_bytes"])


def estimate_run(
    step_flops: int, steps: int, frozen_parameters: int, batch: int, per_sample_fp32_bytes: float
) -> list[dict[str, object]]:
    """Per GPU of :data:`GPUS`: step seconds and run minutes as (fast, slow) over its assumed utilisation,
    and peak memory in GiB (fp16 weights + half the fp32 per-sample activations x batch + context)."""
    memory = (2 * frozen_parameters + batch * per_sample_fp32_bytes / 2) / GIB + CUDA_CONTEXT_GIB
    rows = []
    for gpu in GPUS:
        seconds = [step_flops / (gpu.peak_tflops * 1e12 * u) for u in reversed(gpu.utilisation)]
        rows.append(
            {
                "gpu": gpu.name,
                "step_seconds": tuple(seconds),
                "run_minutes": tuple(s * steps / 60 for s in seconds),
                "memory_gib": memory,
                "fits": memory < gpu.memory_gib,
            }
        )
    return rows


__all__ = ["GPU", "GPUS", "activation_bytes_per_sample", "estimate_run", "train_step_flops"]
