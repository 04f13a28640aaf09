"""The T4 / A100 estimates of chapter 6: counted FLOPs, measured per-sample memory, stated assumptions."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from selora.book import gpu_estimate
from selora.sd15 import build_sd15_modules

TARGETS = ("paper-unet", "paper-text-encoder")


def _flops(device: str, batch: int, resolution: int = 64) -> int:
    with torch.device(device):
        unet, _, text_encoder = build_sd15_modules(32, 48)
    return gpu_estimate.train_step_flops(unet, text_encoder, batch, resolution, TARGETS)


def test_flops_counted_on_the_meta_device_are_those_of_a_real_step():
    """A real CPU step with attention computed by matrix products (torch's counter has no formula for
    the CPU's fused attention kernel, which it would count as zero) counts what the meta device does."""
    with sdpa_kernel(SDPBackend.MATH):
        real = _flops("cpu", 2)
    assert _flops("meta", 2) == real > 0, "the meta-device count differs from a real step's"


def test_flops_grow_with_batch_and_resolution():
    one, two = _flops("meta", 1), _flops("meta", 2)
    assert two == pytest.approx(2 * one, rel=0.02)  # the text encoder and UNet scale with the batch
    assert _flops("meta", 1, resolution=128) > 2 * one  # 4x the latent pixels (the text encoder does not grow)


def test_estimate_run_is_the_stated_arithmetic():
    results = {"memory": {"lora_selora": {"1": {"peak_bytes": 5 * 2**30}, "2": {"peak_bytes": 6 * 2**30}}}}
    per_sample = gpu_estimate.activation_bytes_per_sample(results)
    assert per_sample == 2**30
    rows = gpu_estimate.estimate_run(
        step_flops=10**13, steps=600, frozen_parameters=2**29, batch=4, per_sample_fp32_bytes=per_sample
    )
    assert [r["gpu"] for r in rows] == [g.name for g in gpu_estimate.GPUS]
    for row, gpu in zip(rows, gpu_estimate.GPUS):
        fast, slow = row["step_seconds"]
        assert fast == pytest.approx(10**13 / (gpu.peak_tflops * 1e12 * gpu.utilisation[1]))
        assert slow == pytest.approx(10**13 / (gpu.peak_tflops * 1e12 * gpu.utilisation[0]))
        assert row["run_minutes"] == pytest.approx((fast * 10, slow * 10))
        # 1 GiB of fp16 weights + 4 samples x 0.5 GiB + the context
        assert row["memory_gib"] == pytest.approx(1 + 2 + gpu_estimate.CUDA_CONTEXT_GIB)
        assert row["fits"] == (row["memory_gib"] < gpu.memory_gib)


def test_the_shipped_benchmark_gives_a_positive_per_sample_memory():
    assert 0 < gpu_estimate.activation_bytes_per_sample() < 4 * 2**30
