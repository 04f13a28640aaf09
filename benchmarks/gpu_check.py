"""The GPU check of the paper path: SD v1.5 at full widths, random weights, no hub (issue 17).

    python benchmarks/gpu_check.py [--device cuda] --out-dir DIR   # a GPU machine (sized for <= 8 min)
    python benchmarks/gpu_check.py --cpu-variant --out-dir DIR     # the same code, tiny, on the CPU

It needs torch, transformers, peft and diffusers and runs from the checkout (``PYTHONPATH=.``; README,
"GPU check": diffusers as a wheel). One code path; device, widths, dtypes, resolutions, step counts
and the DDP backend are a :class:`Plan` (``--cpu-variant``: :data:`CPU_PLAN`, widths 32 / 48, gloo).
Every stage works on a fresh copy of the frozen base that shares its weights:

1. **build** SD v1.5's UNet, VAE and CLIP text encoder (:func:`selora.sd15.build_sd15_modules`), on the device.
2. **methods**: selora, lora, dylora, adalora (``METHODS``, the ``montgomery-paper`` targets) in fp16
   and bf16 through the trainer's own step (:class:`selora.train_step.TrainStep`: frozen weights in
   the dtype under autocast, float32 adapters, a GradScaler for fp16, the noise-prediction loss on
   VAE-encoded batches). SeLoRA tests at EVERY
   step (interval 1) with lambda = 1: every layer whose FI ratio is finite grows (Eq. 5 is >= 1), so
   each test also installs the scored K (Eq. 2) and swaps the optimizer's parameters.
3. **ddp**: a 1-process group (NCCL on CUDA, gloo on the CPU; ``Dist(..., group=True)``), DDP over the
   SeLoRA model, Fisher statistics all-reduced, the wrapper rebuilt by the step after each expansion,
   each test's K digest all-gathered.
4. **speed and memory** of the frozen base, PEFT LoRA r = 4 and SeLoRA rank 1 (plain and
   expansion-test steps, ``benchmarks/sd15.py``'s) at 512 and 224 px, batch 1: the median of ``timed``
   steps after ``warmup`` (CUDA: wall time after a sync; CPU: process time) and the peak memory
   (CUDA: ``max_memory_allocated``; CPU: peak RSS, reset through ``/proc/self/clear_refs``).

Checks (:func:`checks`): no skipped step (a non-finite loss or gradient, an fp16 overflow: what the
trainer skips), finite losses and FI ratios, K installed = K scored, the same K on every process,
positive finite times and peaks, the time budget. ``gpu_check.json`` and ``gpu_check.md`` go to
``--out-dir`` (atomically); exit status 1 when a check fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler
from sd15 import DTYPES, clock, machine, make_inputs, make_step, shared_copy, sync
from torch import nn

from selora.config import load_config
from selora.diffusion import EncodedSplit, tokenize, training_batch, vae_posterior
from selora.distributed import Dist, close_distributed
from selora.dtypes import AUTOCAST
from selora.io import atomic_write_text
from selora.methods import METHODS, SeLoRAAdapters
from selora.models import sd15_scheduler_config
from selora.pipeline import DiffusionModel, add_adapters
from selora.profile import set_threads
from selora.sd15 import build_sd15_modules
from selora.tokenizer import load_clip_tokenizer
from selora.train_step import TrainStep, noise_prediction

#: timed configurations of ``benchmarks/sd15.py`` and the ratios reported between them
TIMED = ("frozen", "lora_peft", "selora_r1", "selora_test_r1")
RATIOS = {
    "selora_vs_peft": ("selora_r1", "lora_peft"),
    "selora_test_vs_peft": ("selora_test_r1", "lora_peft"),
    "peft_vs_frozen": ("lora_peft", "frozen"),
    "selora_vs_frozen": ("selora_r1", "frozen"),
}
PRECISION = {dtype: name for name, dtype in AUTOCAST.items() if dtype is not None}  # torch dtype -> fp16/bf16


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one check runs: device, widths, dtypes, resolutions (px), step counts, backend, budget."""

    device: str = "cuda"
    width: int = 320  # UNet first-block width (SD v1.5: 320)
    text_width: int = 768  # CLIP hidden size = cross-attention width (SD v1.5: 768)
    vae_width: int = 128  # VAE first-block width (SD v1.5: 128)
    dtypes: tuple[str, ...] = ("float16", "bfloat16")  # the method stage's precisions
    ddp_dtype: str = "float16"  # the montgomery-paper config's mixed_precision
    time_dtype: str = "float16"
    resolutions: tuple[int, ...] = (512, 224)  # speed and memory
    check_resolution: int = 224  # method and DDP stages
    batch: int = 2  # method and DDP stages (per-sample Fisher over 2 samples)
    steps: int = 3  # optimizer steps per method x dtype (each one a SeLoRA test)
    warmup: int = 3
    timed: int = 5
    time_batch: int = 1
    backend: str = "nccl"
    budget_s: float = 480.0


GPU_PLAN = Plan()
#: the test suite's variant: the same stages at widths 32 / 48, 64 and 32 px, gloo, fp32 timing
CPU_PLAN = dataclasses.replace(
    GPU_PLAN,
    device="cpu",
    width=32,
    text_width=48,
    vae_width=8,
    time_dtype="float32",
    resolutions=(64, 32),
    check_resolution=80,  # latent 10: 2 x 2 tokens in the mid-block attention (1 x 1: its q, k get no gradient)
    steps=2,
    warmup=1,
    timed=2,
    backend="gloo",
    budget_s=300.0,
)


# -- memory ---------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    """Free what is unreferenced, then restart the peak-memory count at what is held now."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    ctypes.CDLL(None).malloc_trim(0)  # glibc: give freed heap pages back, so a later peak is its own
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS


def peak_bytes(device: torch.device) -> int:
    """Peak bytes since :func:`reset_peak`: CUDA's allocator peak, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status: no VmHWM line (peak RSS needs Linux)")


# -- models and data ------------------------------------------------------------------------------
def build(plan: Plan) -> tuple[DiffusionModel, nn.Module]:
    """``(frozen UNet + text encoder, VAE)`` of SD v1.5's structure at the plan's widths, float32, on its device."""
    with torch.device(plan.device):
        unet, vae, text = build_sd15_modules(plan.width, plan.text_width, vae_width=plan.vae_width)
    return DiffusionModel(unet, text).requires_grad_(False), vae.requires_grad_(False)


def in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` with its weights in ``dtype`` (``nn.Module.to``, not diffusers' override,
    which warns about float32 modules SD v1.5 does not have)."""
    return nn.Module.to(copy.deepcopy(module), dtype)


def encoded_batch(vae: nn.Module, plan: Plan) -> tuple[EncodedSplit, torch.Tensor]:
    """``(split, empty-prompt ids (77,))``: ``plan.batch`` random grayscale images of
    ``check_resolution`` px through the VAE (in its dtype, as the trainer encodes), with prompts."""
    side = plan.check_resolution
    images = torch.rand(plan.batch, 1, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = [f"a chest x-ray, case {i}" for i in range(plan.batch)]
    mean, std = vae_posterior(vae, images)
    scale, tokenizer = float(vae.config.scaling_factor), load_clip_tokenizer("offline")
    split = EncodedSplit(mean * scale, std * scale, tokenize(tokenizer, prompts), prompts, None)
    return split, tokenize(tokenizer, [""])[0]


# -- the method and DDP stages --------------------------------------------------------------------
def checked_step(train_step: TrainStep, batch: tuple, step: int) -> dict[str, Any]:
    """One step of the trainer's :class:`~selora.train_step.TrainStep`, and what it did.

    ``{"loss", "skipped" (None or why), "grad_scale", "ratios" (FI ratio per tested layer),
    "k_checked", "k_installed", "k_digest"}``.
    """
    adapters = train_step.adapters
    # the K each SeLoRA layer is being tested with (1, in): drawn when the test was armed, installed if it passes
    scored = (
        {n: c.K.clone() for n, c in adapters.controller.captures.items()}
        if isinstance(adapters, SeLoRAAdapters)
        else {}
    )
    before = adapters.ranks()
    result = train_step(batch, step)
    rec: dict[str, Any] = dict(
        loss=float(result.loss), skipped=result.skipped, ratios={}, k_checked=0, k_installed=True
    )
    if result.skipped:
        return rec
    rec["grad_scale"], change = result.grad_scale, result.change
    if scored:
        rec["ratios"] = change.record["ratios"] if change else {}
        rec["k_digest"] = hashlib.sha256(b"".join(k.cpu().numpy().tobytes() for k in scored.values())).hexdigest()
        grown = change.record["expanded"] if change else []
        rec["k_checked"] = len(grown)
        rec["k_installed"] = all(
            torch.equal(adapters.model.get_submodule(name).lora_A[before[name]], scored[name][0]) for name in grown
        )
    return rec


def run_method(
    base: DiffusionModel, data: tuple[EncodedSplit, torch.Tensor], method: str, plan: Plan, in_ddp: bool = False
) -> dict[str, Any]:
    """``plan.steps`` training steps of ``method`` on a copy of ``base`` (its weights' dtype) with
    batches drawn from ``data`` (:func:`encoded_batch`); a result row."""
    dtype = next(base.parameters()).dtype
    cfg = dataclasses.replace(
        load_config("montgomery-paper"), method=method, interval=1, threshold=1.0, mixed_precision=PRECISION[dtype]
    )
    copy_ = shared_copy(base)
    pipe = SimpleNamespace(unet=copy_.unet, text_encoder=copy_.text_encoder, vae=nn.Identity())  # no VAE needed
    model = add_adapters(pipe, cfg, total_steps=plan.steps, generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    adapters, device = model.adapters, next(base.parameters()).device
    group = Dist(0, 1, device, group=True) if in_ddp else None  # DDP and all-reduce in the 1-process group
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    adapters.attach(opt, group.all_sum if in_ddp else None)
    train_step = TrainStep(
        model,
        opt,
        noise_prediction(AUTOCAST[cfg.mixed_precision]),
        scaler=scaler,
        adapters=adapters,
        max_grad_norm=cfg.max_grad_norm,
        dist=group,
    )
    (split, empty), gen, scheduler = (
        data,
        torch.Generator().manual_seed(cfg.seed),
        DDPMScheduler(**sd15_scheduler_config()),
    )
    ranks0, records, rewraps, t0 = adapters.ranks(), [], 0, time.perf_counter()
    for step in range(plan.steps):
        batch = training_batch(split, torch.arange(plan.batch), gen, scheduler, empty, 0.0, slice(None), device)
        forward = train_step.forward
        records.append(checked_step(train_step, batch, step))
        rewraps += train_step.forward is not forward  # new Parameter objects: the step rebuilt DDP
    sync(device)
    ranks = adapters.ranks()
    ratios = [r for rec in records for r in rec["ratios"].values()]
    return {
        "method": method,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": plan.steps,
        "skipped": [rec["skipped"] for rec in records if rec["skipped"]],
        "losses": [rec["loss"] for rec in records],
        "grad_scales": [rec.get("grad_scale") for rec in records],
        "layers": len(ranks),
        "tests": sum(bool(rec["ratios"]) for rec in records),
        "ratios_finite": all(map(math.isfinite, ratios)) if ratios else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios and all(map(math.isfinite, ratios)) else None,
        "k_checked": sum(rec["k_checked"] for rec in records),
        "k_installed": all(rec["k_installed"] for rec in records),
        "k_digests": [rec["k_digest"] for rec in records if "k_digest" in rec],
        "total_rank": [sum(ranks0.values()), sum(ranks.values())],
        "layers_grown_every_test": all(ranks[n] == ranks0[n] + plan.steps for n in ranks) if ratios else None,
        "rewraps": rewraps,
        "seconds": time.perf_counter() - t0,
    }


def run_ddp(base: DiffusionModel, data: tuple[EncodedSplit, torch.Tensor], plan: Plan) -> dict[str, Any]:
    """SeLoRA under DDP in a 1-process group over a file store (no port); the K digests all-gathered."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(plan.backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            row = run_method(base, data, "selora", plan, in_ddp=True)
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, row["k_digests"])
            world = dist.get_world_size()
        finally:
            close_distributed()
    return row | {"backend": plan.backend, "world": world, "same_k": all(g == row["k_digests"] for g in gathered)}


# -- speed and memory -----------------------------------------------------------------------------
def run_timing(base: DiffusionModel, plan: Plan) -> dict[str, dict[str, Any]]:
    """``{px: {configuration: {seconds, median_s, peak_bytes, trainable}}}`` over :data:`TIMED`.

    Each configuration is built, stepped ``warmup + timed`` times and freed before the next, so its
    peak holds the shared frozen weights, its own adapters, optimizer state and activations.
    """
    device, dtype = next(base.parameters()).device, next(base.parameters()).dtype
    autocast = None if dtype == torch.float32 else dtype
    out: dict[str, dict[str, Any]] = {}
    for px in plan.resolutions:
        inputs = make_inputs(base, plan.time_batch, device, dtype, latent=px // 8)
        out[str(px)] = {}
        for name in TIMED:
            reset_peak(device)
            step, trainable = make_step(name, base, autocast)
            seconds = []
            for i in range(plan.warmup + plan.timed):
                sync(device)
                t0 = clock(device)
                step(inputs)
                sync(device)
                if i >= plan.warmup:
                    seconds.append(clock(device) - t0)
            del step  # its model copy, adapters and optimizer go before the next configuration
            out[str(px)][name] = {
                "seconds": seconds,
                "median_s": statistics.median(seconds),
                "peak_bytes": peak_bytes(device),
                "trainable": trainable,
            }
    return out


def timing_ratios(timing: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{px: {"<ratio>_time": median / median, "<ratio>_memory": peak / peak}}`` for :data:`RATIOS`."""
    return {
        px: {
            f"{key}_{what}": per[num][field] / per[den][field]
            for key, (num, den) in RATIOS.items()
            for what, field in (("time", "median_s"), ("memory", "peak_bytes"))
        }
        for px, per in timing.items()
    }


# -- the verdict ----------------------------------------------------------------------------------
def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def checks(res: dict[str, Any]) -> dict[str, bool]:
    """Every pass/fail condition of the check, from a result dict alone (module docstring)."""
    rows, ddp_row = res["methods"], res["ddp"]
    selora = [r for r in rows if r["method"] == "selora"] + [ddp_row]
    timing = [c for per in res["timing"].values() for c in per.values()]
    return {
        "every method x dtype ran": {(r["method"], r["dtype"]) for r in rows}
        == {(m, d) for m in METHODS for d in res["plan"]["dtypes"]},
        "no skipped step": all(not r["skipped"] for r in [*rows, ddp_row]),
        "finite losses": all(all(map(math.isfinite, r["losses"])) for r in [*rows, ddp_row]),
        "selora: a test every step, finite ratios": all(
            r["tests"] == r["steps"] and r["ratios_finite"] for r in selora
        ),
        "selora: K installed = K scored": all(
            r["k_checked"] == r["layers"] * r["steps"] and r["k_installed"] for r in selora
        ),
        "selora: every layer grew at every test": all(r["layers_grown_every_test"] for r in selora),
        "ddp: 1 process, rewrapped after every expansion": ddp_row["world"] == 1
        and ddp_row["rewraps"] == ddp_row["steps"],
        "ddp: same K on every process": ddp_row["same_k"],
        "timing: positive finite times and peaks": all(
            all(map(_positive, c["seconds"])) and _positive(c["peak_bytes"]) for c in timing
        ),
        "within the time budget": res["elapsed_s"] <= res["plan"]["budget_s"],
    }


def markdown(res: dict[str, Any]) -> str:
    """The result as a markdown page: the checks, the method rows, the DDP row, times and peaks."""
    plan, m = res["plan"], res["machine"]
    lines = [
        f"# GPU check{' (CPU variant)' if res['cpu_variant'] else ''}: {'PASSED' if res['ok'] else 'FAILED'}",
        "",
        f"{m.get('gpu', m['cpu'])}, torch {m['torch']}, diffusers {res['versions']['diffusers']} "
        f"({res['versions']['diffusers_from']}); widths {plan['width']} / {plan['text_width']}; "
        f"{res['elapsed_s']:.0f} s of a {plan['budget_s']:.0f} s budget.",
        "",
        "| check | passed |",
        "|---|:---:|",
        *[f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in res["checks"].items()],
        "",
        f"Training steps ({plan['check_resolution']} px, batch {plan['batch']}, SeLoRA tested every step, lambda = 1):",
        "",
        "| method | dtype | steps | skipped | last loss | FI ratio range | K checked | total rank | seconds |",
        "|---|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in [*res["methods"], res["ddp"] | {"method": f"selora, DDP ({res['ddp']['backend']})"}]:
        span = "—" if r["ratio_range"] is None else f"{r['ratio_range'][0]:.3g}–{r['ratio_range'][1]:.3g}"
        lines.append(
            f"| {r['method']} | {r['dtype']} | {r['steps']} | {len(r['skipped'])} | {r['losses'][-1]:.4g} | "
            f"{span} | {r['k_checked']} | {r['total_rank'][0]} → {r['total_rank'][1]} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        f"Speed and memory ({plan['time_dtype']}, batch {plan['time_batch']}, median of {plan['timed']} steps "
        f"after {plan['warmup']}; {res['clock']}; peak: {res['peak_kind']}):",
        "",
        "| px | configuration | median s | peak GiB | trainable |",
        "|---:|---|---:|---:|---:|",
    ]
    for px, per in res["timing"].items():
        for name, c in per.items():
            lines.append(
                f"| {px} | {name} | {c['median_s']:.4f} | {c['peak_bytes'] / 2**30:.3f} | {c['trainable']:,} |"
            )
    lines += ["", "| px | " + " | ".join(f"`{k}`" for k in next(iter(res["ratios"].values()))) + " |"]
    lines.append("|---:|" + "---:|" * len(next(iter(res["ratios"].values()))))
    for px, row in res["ratios"].items():
        lines.append(f"| {px} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


# -- the command line -----------------------------------------------------------------------------
def run(plan: Plan) -> dict[str, Any]:
    """All four stages under ``plan``; the result dict with its checks."""
    import diffusers
    import peft
    import transformers

    t0 = time.perf_counter()
    base32, vae32 = build(plan)
    rows = []
    for name in plan.dtypes:
        base, data = in_dtype(base32, DTYPES[name]), encoded_batch(in_dtype(vae32, DTYPES[name]), plan)
        rows += [run_method(base, data, method, plan) for method in METHODS]
        if name == plan.ddp_dtype:
            ddp_row = run_ddp(base, data, plan)
        del base
    timing_base = in_dtype(base32, DTYPES[plan.time_dtype])
    del base32, vae32  # not in the peaks below
    timing = run_timing(timing_base, plan)
    cuda = plan.device == "cuda"
    res = {
        "schema": 1,
        "cpu_variant": plan == CPU_PLAN,
        "plan": dataclasses.asdict(plan),
        "machine": machine(),
        "versions": {
            "diffusers": diffusers.__version__,
            "diffusers_from": "a wheel on PYTHONPATH" if ".whl" in str(diffusers.__file__) else "installed",
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "clock": "wall time after a CUDA sync" if cuda else "process CPU time",
        "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "methods": rows,
        "ddp": ddp_row,
        "timing": timing,
        "ratios": timing_ratios(timing),
        "elapsed_s": time.perf_counter() - t0,
    }
    res["checks"] = checks(res)
    res["ok"] = all(res["checks"].values())
    return res


def parse_args(argv: list[str] | None = None) -> tuple[Plan, Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--device", choices=["cuda"], default="cuda", help="the GPU check proper (default)")
    where.add_argument(
        "--cpu-variant", action="store_true", help="the same stages, tiny, on the CPU (the test suite's)"
    )
    ap.add_argument("--out-dir", type=Path, required=True, help="where gpu_check.json and gpu_check.md go")
    args = ap.parse_args(argv)
    if not args.out_dir.is_dir():
        ap.error(f"--out-dir {args.out_dir}: not a directory")
    if not args.cpu_variant and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA device; on a CPU run --cpu-variant")
    return (CPU_PLAN if args.cpu_variant else GPU_PLAN), args.out_dir


def main(argv: list[str] | None = None) -> int:
    plan, out_dir = parse_args(argv)
    set_threads()
    res = run(plan)
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out_dir / "gpu_check.md", markdown(res))
    print(markdown(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
