"""Speed and memory of SeLoRA at Stable Diffusion v1.5's real shapes (issue 10).

    python benchmarks/sd15.py [--quick] [--rounds N] [--threads N] [--batches 1 2]
                              [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--out-dir DIR]

The base is SD v1.5's UNet (diffusers' default ``UNet2DConditionModel`` config with a 768-wide
cross-attention, ~860 M parameters) and a CLIP ViT-L/14 text encoder (~123 M), randomly initialised:
no download. ``--quick`` builds the shipped mini SD's configs instead (``selora/assets/mini-sd``):
smaller widths, the same code path. Inputs: a 28x28 latent (224 px images), 77 tokens, batch 1 and 2.
Adapters go on every ``nn.Linear`` of the UNet and of the text encoder.

Measurement:
* times: ONE child process builds the frozen base once and every timed configuration as a copy that
  shares its frozen weights; rounds interleave the configurations (order rotated every round and
  reversed every other round, so each pair runs in both orders) and the median over rounds is
  reported. On CPU the clock is the process CPU time of a single-threaded process (waiting for a
  core shared with other jobs is not counted); on CUDA wall time after a sync. The timing child keeps
  freed buffers in its heap (``TIMING_MALLOC_ENV``: no page-fault time in the steps). The timing child runs
  ALONE: the memory children start after it (a 5-16 GB neighbour competes for memory bandwidth and
  cache, which a CPU-time clock does not see).
* peak memory: a FRESH child process per (configuration, batch) builds the model, runs two steps and
  reports its peak RSS (``resource.getrusage``; on CUDA ``torch.cuda.max_memory_allocated``).
* ratios (machine noise cancels): per batch size the median over rounds of the PAIRED ratio (the
  two configurations' calls of the same round, run minutes apart at most), then the geometric mean
  over the batch sizes.

Results go to ``results.json`` (with a ``ratios`` object) and ``results.md`` in ``--out-dir``
(default: this folder), written atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import selora
from selora.core.criteria import FIRatio
from selora.core.layers import SeLoRALinear, lora_layers
from selora.dtypes import DTYPES
from selora.export import merge_into
from selora.paths import ASSETS_DIR
from selora.pipeline import DiffusionModel, cast_trainable
from selora.sd15 import SD15_TOKENS, sd15_text_encoder, sd15_unet
from selora.train_step import TrainStep, noise_prediction

HERE = Path(__file__).resolve().parent
#: Where the committed results live: package data, so the appendix reads them in an installed package too.
RESULTS_DIR = HERE.parent / "selora" / "assets" / "benchmarks"
LATENT = 28  # 224 px / 8 (VAE factor)
TOKENS = SD15_TOKENS
LORA_RANK = 4
T_INTERVAL = 40  # the paper's test interval t
#: text-encoder / UNet layers that get rank 4 in the mixed-rank state (where the paper's Fig. 3
#: concentrates rank: q and k of cross-attention and of the text encoder's self-attention)
MIXED_HIGH = ("attn2.to_q", "attn2.to_k", "self_attn.q_proj", "self_attn.k_proj")

#: configuration -> what one measured call does (issue 10, items 1-8)
CONFIGS: dict[str, str] = {
    "frozen": "1. frozen base: forward + backward to the inputs (latent and text embeddings)",
    "lora_selora": "2. selora LoRALinear r=4: train step (AdamW)",
    "lora_peft": "3. PEFT LoRA r=4, same targets: train step (AdamW)",
    "selora_r1": "4. SeLoRA plain step, every layer at rank 1",
    "selora_mixed": "4. SeLoRA plain step, mixed ranks (cross-attn/text q,k at 4, others 1-2)",
    "selora_test_r1": "5. SeLoRA expansion-test step (Fisher hooks on), rank 1",
    "selora_test_mixed": "5. SeLoRA expansion-test step (Fisher hooks on), mixed ranks",
    "authors_mixed": "6. authors' scheme: plain step + one extra forward + backward, mixed ranks",
    "full_ft": "7. full fine-tuning of UNet + text encoder with Adam",
    "infer_base": "8. inference forward: base model",
    "infer_unmerged": "8. inference forward: unmerged SeLoRA adapters (mixed ranks)",
    "infer_merged": "8. inference forward: adapters merged into the weights",
}
#: timed interleaved in one process (full fine-tuning needs its own weights: timed in its memory child)
TIMED = [name for name in CONFIGS if name != "full_ft"]
MEMORY = ["frozen", "lora_selora", "lora_peft", "selora_r1", "selora_test_mixed", "full_ft"]
#: ratio key -> (numerator, denominator, goal); amortized_t40 is derived from test_step_vs_plain
RATIOS: dict[str, tuple[str, str, float]] = {
    "lora_selora_vs_peft": ("lora_selora", "lora_peft", 1.00),
    "test_step_vs_plain": ("selora_test_mixed", "selora_mixed", 1.10),
    "authors_test_step_vs_plain": ("authors_mixed", "selora_mixed", 2.0),
    "amortized_t40": ("", "", 1.003),
    "peak_mem_vs_full_ft": ("selora_test_mixed", "full_ft", 0.45),
    "merged_infer_vs_base": ("infer_merged", "infer_base", 1.01),
}


# -- models ---------------------------------------------------------------------------------------
def build_base(quick: bool, dtype: torch.dtype, device: torch.device) -> DiffusionModel:
    """The frozen UNet + text encoder (random weights): SD v1.5 shapes, or the mini SD's with ``quick``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if quick:
        mini = ASSETS_DIR / "mini-sd"
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(mini / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(mini / "text_encoder", local_files_only=True))
    else:
        unet, text = sd15_unet(), sd15_text_encoder()  # SD v1.5's UNet, CLIP ViT-L/14's text model
    model = DiffusionModel(unet, text).to(device=device, dtype=dtype)
    return model.requires_grad_(False)


def make_inputs(
    model: DiffusionModel, batch: int, device: torch.device, dtype: torch.dtype, latent: int = LATENT
) -> tuple[torch.Tensor, ...]:
    """``(noisy (N, 4, L, L), t (N,), ids (N, 77), noise (N, 4, L, L))``, seeded; ``L = latent``
    (28: 224 px images)."""
    g = torch.Generator().manual_seed(batch)
    vocab = model.text_encoder.config.vocab_size
    noisy = torch.randn(batch, 4, latent, latent, generator=g)
    noise = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ids = torch.randint(0, vocab, (batch, TOKENS), generator=g)
    return noisy.to(device, dtype), t.to(device), ids.to(device), noise.to(device)


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base``'s module tree that shares its parameter and buffer tensors (no weight copy)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def add_selora(model: DiffusionModel, kind: str, rank: int, mixed: bool = False) -> None:
    """Adapters of ``kind`` on every linear layer of UNet and text encoder; ``mixed`` grows SeLoRA
    layers to the mixed-rank state (``MIXED_HIGH`` at rank 4, the others alternating 1 and 2)."""
    gen = torch.Generator().manual_seed(1)
    for part in (model.unet, model.text_encoder):
        selora.inject(part, "all-linear", kind=kind, rank=rank, generator=gen)
    if mixed:
        for i, (name, layer) in enumerate(lora_layers(model, SeLoRALinear).items()):
            target = 4 if any(name.endswith(s) for s in MIXED_HIGH) else 1 + i % 2
            if target > layer.rank:
                layer.expand(target - layer.rank, generator=gen)
    cast_trainable(model)  # adapters in float32 when the frozen weights are half precision


def add_peft(model: DiffusionModel, rank: int) -> None:
    """PEFT LoRA (scaling alpha / r = 1, no dropout) on the same linear layers as :func:`add_selora`."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names), model)
    cast_trainable(model)  # adapters in float32 when the frozen weights are half precision


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def inference_step(name: str, model: DiffusionModel, autocast: torch.dtype | None) -> Callable[[tuple], None]:
    """A forward without gradients of ``model`` (``infer_base``), with mixed-rank SeLoRA adapters
    (``infer_unmerged``), or with them merged into the weights (``infer_merged``)."""
    if name != "infer_base":
        add_selora(model, "selora", 1, mixed=True)
    if name == "infer_merged":
        merge_into(model)  # W0 + s B A into plain nn.Linear layers
    device_type = next(model.parameters()).device.type

    @torch.no_grad()
    def infer(inputs: tuple) -> None:
        noisy, t, ids, _ = inputs
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            model(noisy, t, ids)

    return infer


def make_step(name: str, base: DiffusionModel, autocast: torch.dtype | None) -> tuple[Callable[[tuple], None], int]:
    """``(step(inputs), trainable parameter count)`` of configuration ``name`` on (a shared copy of) ``base``.

    A train step is the trainer's (:class:`selora.train_step.TrainStep`): forward, noise-prediction
    MSE, backward, gradient-norm check, optimizer step, controller step, zero_grad; the authors'
    scheme adds its scoring pass (one more forward/backward) after the backward. ``frozen`` is a
    forward/backward to the inputs (nothing trains), ``infer_*`` a forward without gradients.
    """
    model = base if name == "full_ft" else shared_copy(base)
    loss_fn = noise_prediction(autocast)
    if name.startswith("infer"):
        return inference_step(name, model, autocast), 0
    if name == "frozen":
        model.text_encoder.embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))

        def frozen(inputs: tuple) -> None:
            noisy, *rest = inputs
            loss_fn(model, (noisy.detach().requires_grad_(True), *rest)).backward()
            model.zero_grad(set_to_none=True)

        return frozen, 0
    ctl = None
    if name == "full_ft":
        model.requires_grad_(True)
        cast_trainable(model)  # master weights in float32 (a no-op for float32 runs)
    elif name in ("lora_selora", "lora_peft"):
        add_peft(model, LORA_RANK) if name == "lora_peft" else add_selora(model, "lora", LORA_RANK)
    else:  # selora_* and authors_mixed
        add_selora(model, "selora", 1, mixed=not name.endswith("r1"))
    params = trainable(model)
    opt = (torch.optim.Adam if name == "full_ft" else torch.optim.AdamW)(params, lr=1e-4)
    if name.startswith(("selora", "authors")):
        # a test step on every call (interval 1) that never expands (threshold 1e30): shapes stay put
        interval = 1 if "test" in name else 10**9
        ctl = selora.ExpansionController(model, opt, FIRatio(1e30), interval=interval)
    train_step = TrainStep(model, opt, loss_fn, controller=ctl)
    if name.startswith("authors"):
        train_step.add_callback("on_backward", lambda s: loss_fn(s.forward, s.batch).backward())  # its scoring pass
    return lambda inputs: train_step(inputs, 0), sum(p.numel() for p in params)


# -- children -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Seconds: process CPU time on CPU (single-threaded), wall time on CUDA."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def timing_child(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds over every configuration in ``TIMED`` x ``args.batches``; raw seconds."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    autocast = None if dtype == torch.float32 else dtype
    base = build_base(args.quick, dtype, device)
    steps = {name: make_step(name, base, autocast) for name in TIMED}
    inputs = {b: make_inputs(base, b, device, dtype) for b in args.batches}
    jobs = [(name, b) for b in args.batches for name in TIMED]
    cpu: dict[str, dict[str, list[float]]] = {name: {str(b): [] for b in args.batches} for name in TIMED}
    wall: dict[str, dict[str, list[float]]] = {name: {str(b): [] for b in args.batches} for name in TIMED}
    system = {name: {str(b): [] for b in args.batches} for name in TIMED}  # kernel share of the CPU time
    for name in TIMED:  # warm-up: one call of each configuration at the smallest batch
        steps[name][0](inputs[min(args.batches)])
    for r in range(args.rounds):
        shift = (r * len(jobs)) // max(args.rounds, 1)
        order = jobs[shift:] + jobs[:shift]
        for name, b in order[::-1] if r % 2 else order:
            sync(device)
            t0, w0, k0 = clock(device), time.perf_counter(), os.times().system
            steps[name][0](inputs[b])
            sync(device)
            cpu[name][str(b)].append(clock(device) - t0)
            system[name][str(b)].append(os.times().system - k0)
            wall[name][str(b)].append(time.perf_counter() - w0)
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return {
        "seconds": cpu,
        "wall_seconds": wall,
        "system_seconds": system,
        "trainable": {name: s[1] for name, s in steps.items()},
        "base_parameter_bytes": sum(p.numel() * 4 for p in base.parameters()),
    }


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one fresh process running two steps of ``args.config`` at ``args.batch``."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base = build_base(args.quick, dtype, device)
    step, n_train = make_step(args.config, base, None if dtype == torch.float32 else dtype)
    inputs = make_inputs(base, args.batch, device, dtype)
    seconds = []
    for _ in range(2):
        sync(device)
        t0 = clock(device)
        step(inputs)
        sync(device)
        seconds.append(clock(device) - t0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"  # KiB on Linux
    return {"peak_bytes": int(peak), "kind": kind, "seconds": seconds, "trainable": n_train}


def _child_cmd(args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--rounds",
        str(args.rounds),
        "--batches",
        *map(str, args.batches),
        *extra,
    ]
    return cmd + (["--quick"] if args.quick else [])


#: glibc malloc settings for the timing child: keep freed activation buffers (up to 32 MiB, glibc's
#: largest mmap threshold) in the heap instead of returning them to the kernel after every call.
#: With the defaults ~20 % of a step's CPU time at SD v1.5 shapes is kernel time spent faulting in
#: and zeroing fresh pages, and it varies from call to call; with these it is ~0. Other C libraries
#: ignore the variables. Memory children keep the defaults (their peak RSS is what a user sees).
TIMING_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def _run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child with ``stdout=PIPE`` (``env`` added to this environment); its last stdout line is its JSON result."""
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ | env if env else None, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}): {' '.join(map(str, cmd[2:]))}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fits(frozen: dict[str, Any], timing: dict[str, Any]) -> bool:
    """Whether full fine-tuning (frozen peak + grads + two Adam moments, +10 %) fits in free memory."""
    avail = _mem_available()
    need = 1.1 * (frozen["peak_bytes"] + 3 * timing["base_parameter_bytes"])
    return avail is None or avail > need


def _mem_available() -> int | None:
    """MemAvailable in bytes (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- the orchestrating parent ---------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, cores, threads, memory, versions, load average (no host names)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_bytes": mem,
        "os": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (the two calls of round i), for equal-length lists."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio: expected two equal, non-empty sample lists, got {len(num)} and {len(den)}")
    return statistics.median(n / d for n, d in zip(num, den))


def compute_ratios(
    samples: dict[str, dict[str, list[float]]], memory: dict[str, dict[str, Any]], batches: list[int]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(ratios, ratios by batch)`` from per-round seconds and peak bytes (module docstring)."""
    by_batch: dict[str, dict[str, float]] = {}
    for b in map(str, batches):
        row = {}
        for key, (num, den, _) in RATIOS.items():
            if key == "peak_mem_vs_full_ft":
                row[key] = memory[num][b]["peak_bytes"] / memory[den][b]["peak_bytes"]
            elif num:
                row[key] = paired_ratio(samples[num][b], samples[den][b])
        # a test step every t steps, plain steps otherwise: ((t - 1) plain + test) / (t plain)
        row["amortized_t40"] = (T_INTERVAL - 1 + row["test_step_vs_plain"]) / T_INTERVAL
        by_batch[b] = row
    ratios = {key: _geomean([by_batch[str(b)][key] for b in batches]) for key in RATIOS}
    return ratios, by_batch


def ratio_intervals(
    samples: dict[str, dict[str, list[float]]],
    batches: list[int],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Bootstrap intervals of the time ratios: rounds resampled with replacement (per batch, pairs kept
    together), the ratio recomputed as in :func:`compute_ratios`; the central ``level`` percentile range.
    Peak memory is one measurement per configuration: it has no interval."""
    rng = np.random.default_rng(seed)
    pairs = {key: (num, den) for key, (num, den, _) in RATIOS.items() if num and key != "peak_mem_vs_full_ft"}
    logs = {key: np.zeros(resamples) for key in pairs}
    for b in map(str, batches):
        n = len(samples[TIMED[0]][b])
        idx = rng.integers(0, n, size=(resamples, n))
        for key, (num, den) in pairs.items():
            per_round = np.asarray(samples[num][b]) / np.asarray(samples[den][b])
            logs[key] += np.log(np.median(per_round[idx], axis=1)) / len(batches)
    q = [50 * (1 - level), 50 * (1 + level)]
    out = {key: [float(v) for v in np.exp(np.percentile(lg, q))] for key, lg in logs.items()}
    out["amortized_t40"] = [(T_INTERVAL - 1 + v) / T_INTERVAL for v in out["test_step_vs_plain"]]
    return out


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with ``ratios``, ``ratios_by_batch`` and ``ratio_intervals`` (re)computed from its raw
    ``seconds_samples`` and ``memory``: the analysis of a run, separate from its measurement."""
    batches = res["settings"]["batches"]
    ratios, by_batch = compute_ratios(res["seconds_samples"], res["memory"], batches)
    intervals = ratio_intervals(res["seconds_samples"], batches)
    settings = res["settings"] | {
        "ratio_interval": "95 % bootstrap over rounds (2000 resamples, seed 0); "
        "peak memory: one measurement, no interval"
    }
    goals = {key: goal for key, (_, _, goal) in RATIOS.items()}
    verdicts = {key: goal_verdict(key, value, goals[key], intervals.get(key)) for key, value in ratios.items()}
    return res | {
        "settings": settings,
        "ratios": ratios,
        "ratios_by_batch": by_batch,
        "ratio_intervals": intervals,
        "goals": goals,
        "verdicts": verdicts,
    }


def goal_verdict(key: str, value: float, goal: float, interval: list[float] | None) -> str:
    """``yes`` / ``no`` (the value against the goal) and whether the run settles it: ``settled`` when
    the whole interval lies on the value's side of the goal, ``within noise`` when it contains the goal.
    The authors' scheme is a reference value (met within 25 %)."""
    if key == "authors_test_step_vs_plain":
        return "yes" if abs(value - goal) <= 0.25 * goal else "no"
    met = value <= goal
    if interval is None:
        return "yes" if met else "no"
    settled = interval[1] <= goal if met else interval[0] > goal
    return ("yes" if met else "no") + ("" if settled else " (within noise)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Launch the timing child and the memory children, collect everything into one results dict."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = os.getloadavg()
    # the timing child runs alone; then the memory children (``--jobs`` at once), full fine-tuning last
    timing = _run_child(_child_cmd(args, "--child", "timing"), env=TIMING_MALLOC_ENV)
    small = [(name, b) for name in MEMORY if name != "full_ft" for b in args.batches]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = pool.map(
            lambda job: _run_child(_child_cmd(args, "--child", "memory", "--config", job[0], "--batch", str(job[1]))),
            small,
        )
        memory: dict[str, dict[str, Any]] = {name: {} for name in MEMORY}
        for (name, b), out in zip(small, results):
            memory[name][str(b)] = out
            print(f"memory {name} batch {b}: {out['peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    notes = []
    for b in map(str, args.batches):
        why = (
            "not enough free memory to run it"
            if args.device == "cpu" and not _fits(memory["frozen"][b], timing)
            else ""
        )
        if not why:
            try:
                memory["full_ft"][b] = _run_child(
                    _child_cmd(args, "--child", "memory", "--config", "full_ft", "--batch", b)
                )
            except RuntimeError as err:  # e.g. killed for lack of memory
                why = str(err)
        if why:
            # weights in float32 + gradients + two Adam moments on top of the frozen run's peak
            need = memory["frozen"][b]["peak_bytes"] + 3 * timing["base_parameter_bytes"]
            memory["full_ft"][b] = {"peak_bytes": need, "kind": "estimate", "seconds": None, "trainable": None}
            notes.append(
                f"full_ft batch {b}: {why}; peak memory ESTIMATED as the frozen run's peak + 3 x "
                "parameter bytes (a lower bound, so the memory ratio is an upper bound)"
            )
            continue
        print(
            f"memory full_ft batch {b}: {memory['full_ft'][b]['peak_bytes'] / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    medians = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in timing["seconds"].items()}
    medians["full_ft"] = {
        b: statistics.median(m["seconds"][1:]) if m["seconds"] else None for b, m in memory["full_ft"].items()
    }
    notes.append("full_ft time: the second step of its own memory process (not interleaved; one sample)")
    return analyse(
        {
            "schema": 1,
            "quick": args.quick,
            "started_utc": started,
            "machine": machine() | {"load_average_start": list(load_start), "load_average_end": list(os.getloadavg())},
            "settings": {
                "torch_threads": args.threads,
                "rounds": args.rounds,
                "warmup": 1,
                "batches": args.batches,
                "latent": [LATENT, LATENT],
                "tokens": TOKENS,
                "device": args.device,
                "dtype": args.dtype,
                "lora_rank": LORA_RANK,
                "test_interval": T_INTERVAL,
                "clock": "wall (cuda sync)" if args.device == "cuda" else "process CPU time",
                "timing_child_env": TIMING_MALLOC_ENV,
                "ratio_aggregate": "geometric mean over batch sizes of the per-batch median over rounds "
                "of paired (same-round) ratios; memory children ran after the timing child",
            },
            "configs": CONFIGS,
            "seconds_median": medians,
            "seconds_samples": timing["seconds"],
            "wall_seconds_samples": timing["wall_seconds"],
            "system_seconds_samples": timing["system_seconds"],
            "trainable_parameters": timing["trainable"] | {"full_ft": timing["base_parameter_bytes"] // 4},
            "memory": memory,
            "notes": notes,
        }
    )


def reanalysed(path: Path) -> dict[str, Any]:
    """The results stored at ``path``, analysed again (:func:`analyse`); RuntimeError naming what is wrong."""
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
        return analyse(res)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RuntimeError(
            f"{path}: not a benchmark results.json with raw samples ({type(err).__name__}: {err})"
        ) from None


def _fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.3f}"


def markdown(res: dict[str, Any]) -> str:
    """The results as a markdown page: ratios against goals, absolute times, peak memory, machine."""
    goals, m, s = res["goals"], res["machine"], res["settings"]
    approx = {"authors_test_step_vs_plain"}
    lines = [
        "# SeLoRA benchmark at Stable Diffusion v1.5 shapes" + (" (quick smoke run)" if res["quick"] else ""),
        "",
        (
            f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']}, "
            f"{s['torch_threads']} torch thread(s), {s['device']} {s['dtype']}; load average "
            f"{m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end. "
            f"Latent {s['latent'][0]}x{s['latent'][1]}, batches {s['batches']}, {s['rounds']} interleaved "
            f"rounds ({s['clock']}); ratios: median of the rounds' paired ratios."
        ),
        "",
        "| ratio | value | 95 % interval | goal | met |",
        "|---|---:|---:|---:|:---:|",
    ]
    for key, value in res["ratios"].items():
        goal, interval = goals[key], res["ratio_intervals"].get(key)
        op = "≈" if key in approx else "≤"
        span = "—" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}"
        lines.append(f"| `{key}` | {value:.3f} | {span} | {op} {goal:g} | {res['verdicts'][key]} |")
    lines += [
        "",
        "Interval: " + s["ratio_interval"] + ". *Within noise*: the interval contains the goal, "
        "so this run does not settle it either way.",
    ]
    batches = [str(b) for b in s["batches"]]
    lines += [
        "",
        "Median seconds per call:",
        "",
        "| configuration | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name, desc in res["configs"].items():
        lines.append(f"| {desc} | " + " | ".join(_fmt(res["seconds_median"][name][b]) for b in batches) + " |")
    lines += [
        "",
        "Peak memory (fresh process per configuration):",
        "",
        "| configuration | " + " | ".join(f"batch {b} (GiB)" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name, per in res["memory"].items():
        lines.append(
            f"| {res['configs'][name]} | " + " | ".join(f"{per[b]['peak_bytes'] / 2**30:.2f}" for b in batches) + " |"
        )
    lines += [""] + [f"- {note}" for note in res["notes"]] + [""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the mini SD's widths (smoke run), same code path")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 10, quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes (default 1 2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="frozen weights' dtype; half precision runs under autocast with float32 adapters",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="memory-measuring processes run at once, after the timing one (default 1, quick 4)",
    )
    ap.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help="where results.json and results.md go (default: package data)"
    )
    ap.add_argument(
        "--reanalyse",
        type=Path,
        metavar="RESULTS_JSON",
        help="recompute ratios and intervals from a results.json's raw samples (no measuring)",
    )
    ap.add_argument("--child", choices=["timing", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 10
    if args.jobs is None:
        args.jobs = 4 if args.quick else 1
    if args.jobs < 1:
        ap.error(f"--jobs: expected an integer >= 1, got {args.jobs}")
    if args.rounds < 1:
        ap.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    if args.threads < 1:
        ap.error(f"--threads: expected an integer >= 1, got {args.threads}")
    if any(b < 1 for b in args.batches):
        ap.error(f"--batches: expected integers >= 1, got {args.batches}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and args.dtype == "float16":
        ap.error("--dtype float16: half precision on CPU is not supported here; use float32 or bfloat16")
    if not args.child and not args.out_dir.is_dir():
        ap.error(f"--out-dir {args.out_dir}: not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child == "timing":
        print(json.dumps(timing_child(args)))
        return 0
    if args.child == "memory":
        print(json.dumps(memory_child(args)))
        return 0
    try:
        res = reanalysed(args.reanalyse) if args.reanalyse else run(args)
    except RuntimeError as err:
        print(f"sd15 benchmark: {err}", file=sys.stderr)
        return 1
    _write_atomic(args.out_dir / "results.json", json.dumps(res, indent=1) + "\n")
    _write_atomic(args.out_dir / "results.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
