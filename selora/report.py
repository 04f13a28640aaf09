"""From a training run to the numbers of chapter 6: curves, the rank history, parameter counts and
a paired-seed test of whether a prompt's findings change the generated image.

Everything here reads what :mod:`selora.train` writes (``read_records(run_dir)``) or works on
images already generated, so it is cheap and testable without a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from selora.layers import lora_layers

__all__ = [
    "PromptEffect",
    "laterality_index",
    "loss_curves",
    "mean_and_se",
    "module_kind",
    "noise_prediction_errors",
    "paired_gap",
    "prompt_effect",
    "rank_by_kind",
    "rank_matrix",
    "rms_difference",
    "running_mean",
    "short_name",
    "side_fraction",
    "trainable_counts",
    "welch_t",
]

COMPONENTS = ("unet", "text_encoder")  # name prefixes of the adapters in selora.train.DiffusionModel


# -- curves ---------------------------------------------------------------------------------------
def loss_curves(records: Mapping[str, list[dict]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (steps, loss), "eval": (steps, eval_loss)}`` from ``read_records(run_dir)``.

    Skipped (non-finite) training steps carry ``loss`` None and are left out.
    """
    train = [(r["step"], r["loss"]) for r in records["train"] if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records["eval"]]
    if not train:
        raise ValueError("records: no finite training loss (did the run take a step?)")
    out = {}
    for key, pairs in (("train", train), ("eval", evals)):
        steps, values = zip(*pairs) if pairs else ((), ())
        out[key] = (np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
    return out


def running_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start); same length as ``values``."""
    if window < 1:
        raise ValueError(f"window={window}: expected an integer >= 1")
    x = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


# -- ranks ----------------------------------------------------------------------------------------
def rank_matrix(history: Sequence[dict]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The rank history as ``(steps (S,), layer names (L,), ranks (L, S))``.

    ``history`` is ``read_records(run_dir)["ranks"]``: one record per expansion test (plus step 0),
    each ``{"step", "ranks": {layer: rank}}``. Layers keep the order of the first record.
    """
    if not history:
        raise ValueError("history: empty (rank_history.jsonl has no records)")
    names = list(history[0]["ranks"])
    for rec in history:
        if set(rec["ranks"]) != set(names):
            raise ValueError(f"history: step {rec['step']} lists different layers than step {history[0]['step']}")
    steps = np.asarray([rec["step"] for rec in history], dtype=np.int64)
    matrix = np.asarray([[rec["ranks"][n] for rec in history] for n in names], dtype=np.int64)
    return steps, names, matrix


_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)|mid_block")


def short_name(layer: str) -> str:
    """A compact label: ``unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` ->
    ``U up1.0 attn2.to_k``; ``text_encoder.encoder.layers.2.self_attn.q_proj`` -> ``T 2 q_proj``."""
    if layer.startswith("text_encoder."):
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", layer)
        return f"T {m.group(1)} {m.group(2)}" if m else "T " + layer.split(".", 1)[1]
    rest = layer.split(".", 1)[1] if layer.startswith("unet.") else layer
    block = _BLOCK.search(rest)
    where = ("mid" if block.group(0) == "mid_block" else f"{block.group(1)}{block.group(2)}") if block else ""
    sub = re.search(r"(?:attentions|resnets)\.(\d+)", rest)
    if sub:
        where += f".{sub.group(1)}"
    leaf = re.search(r"(attn[12]\.to_\w+|ff\.net\.[02](?:\.proj)?|proj_in|proj_out|time_emb_proj|linear_\d)"
                     r"(?:\.0)?$", rest)
    return f"U {where} {leaf.group(1) if leaf else rest}".replace("  ", " ")


def module_kind(layer: str) -> str:
    """The role of an adapted layer, for grouping ranks as the paper's Fig. 3 does.

    UNet: ``attn1 q``/``k``/``v``/``out`` (self-attention), ``attn2 ...`` (cross-attention),
    ``ff``, ``proj in/out``, ``time``; text encoder: ``text q``/``k``/``v``/``out``, ``text mlp``.
    """
    if layer.startswith("text_encoder."):
        m = re.search(r"self_attn\.(q|k|v|out)_proj$", layer)
        return f"text {m.group(1)}" if m else "text mlp"
    m = re.search(r"(attn[12])\.to_(q|k|v|out)(?:\.0)?$", layer)
    if m:
        return f"{m.group(1)} {m.group(2)}"
    if ".ff." in layer:
        return "ff"
    if layer.endswith(("proj_in", "proj_out")):
        return "proj in/out"
    if "time_emb" in layer or "time_embedding" in layer:
        return "time"
    return "other"


def rank_by_kind(final_ranks: Mapping[str, int]) -> dict[str, float]:
    """Mean rank per :func:`module_kind`, highest first."""
    groups: dict[str, list[int]] = {}
    for name, r in final_ranks.items():
        groups.setdefault(module_kind(name), []).append(r)
    means = {k: float(np.mean(v)) for k, v in groups.items()}
    return dict(sorted(means.items(), key=lambda kv: (-kv[1], kv[0])))


KIND_ORDER = ("text q", "text k", "text v", "text out", "text mlp", "attn1 q", "attn1 k", "attn1 v", "attn1 out",
              "attn2 q", "attn2 k", "attn2 v", "attn2 out", "ff", "proj in/out", "time", "other")


def rank_grid(final_ranks: Sequence[Mapping[str, int]]) -> tuple[list[str], list[str], np.ndarray]:
    """The Fig. 3 layout: mean final rank per (location, kind of layer), averaged over runs.

    ``final_ranks``: one ``{layer: rank}`` per run (e.g. per seed). Rows are locations in model order
    (text-encoder layers, then UNet blocks as in :func:`short_name`), columns are :func:`module_kind`
    in :data:`KIND_ORDER`; a cell is NaN where a location has no layer of that kind.
    Returns ``(rows, cols, matrix (len(rows), len(cols)))``.
    """
    if not final_ranks:
        raise ValueError("final_ranks: expected at least one run")
    cells: dict[tuple[str, str], list[int]] = {}
    rows: list[str] = []
    for run in final_ranks:
        for layer, r in run.items():
            where = short_name(layer).rsplit(" ", 1)[0]
            if where not in rows:
                rows.append(where)
            cells.setdefault((where, module_kind(layer)), []).append(r)
    cols = [k for k in KIND_ORDER if any(kind == k for _, kind in cells)]
    matrix = np.full((len(rows), len(cols)), np.nan)
    for (where, kind), values in cells.items():
        matrix[rows.index(where), cols.index(kind)] = float(np.mean(values))
    return rows, cols, matrix


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get their average rank)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"spearman: expected two 1-d sequences of equal length >= 2, got {a.shape} and {b.shape}")

    def average_ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        sorted_v = v[order]
        first = np.r_[True, sorted_v[1:] != sorted_v[:-1]]      # start of each run of equal values
        group = np.cumsum(first) - 1
        starts = np.r_[np.flatnonzero(first), len(v)]
        ranks = np.empty(len(v))
        ranks[order] = 0.5 * (starts[group] + starts[group + 1] - 1) + 1  # mean of the run's 1-based positions
        return ranks

    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        raise ValueError("spearman: a sequence is constant, the correlation is undefined")
    return float(np.corrcoef(ra, rb)[0, 1])


# -- parameters -----------------------------------------------------------------------------------
def trainable_counts(model: nn.Module, lora_rank: int = 4) -> dict[str, dict[str, int]]:
    """Adapter parameters per component for the model's current ranks and for LoRA at ``lora_rank``.

    An adapter of rank r on a ``d_in -> d_out`` layer has r (d_in + d_out) parameters
    (``lora_A`` (r, d_in) + ``lora_B`` (d_out, r)). Returns ``{component: {"selora": n, "lora": m}}``
    for ``unet``, ``text_encoder`` and ``total``.
    """
    counts = {c: {"selora": 0, "lora": 0} for c in (*COMPONENTS, "total")}
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: no LoRA/SeLoRA layers (inject adapters first)")
    for name, layer in layers.items():
        comp = next((c for c in COMPONENTS if name.startswith(c + ".")), None)
        if comp is None:
            raise ValueError(f"adapter {name!r}: expected a name starting with one of {COMPONENTS}")
        width = layer.in_features + layer.out_features
        for key, r in (("selora", layer.rank), ("lora", lora_rank)):
            counts[comp][key] += r * width
            counts["total"][key] += r * width
    return counts


# -- does the image follow the findings? ----------------------------------------------------------
def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"images: expected two (N, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def rms_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel difference per image pair: ``(N, C, H, W)`` x 2 -> ``(N,)``."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def side_fraction(a: torch.Tensor, b: torch.Tensor, side: str) -> float:
    """Share of the squared difference ``sum (a - b)^2`` that lies on the image half showing the
    patient's ``side`` (radiological convention: the patient's left is the image's right half).

    ``a``, ``b``: ``(N, C, H, W)``; 0.5 means the change is not lateralised (with an odd width the
    middle column counts for neither side).
    """
    _check_pair(a, b)
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    sq = (a.double() - b.double()).pow(2).sum(dim=(0, 1, 2))  # (W,) energy per image column
    w = sq.shape[0]
    half = sq[w // 2 + w % 2 :] if side == "left" else sq[: w // 2]
    total = sq.sum()
    if total == 0:
        raise ValueError("images: identical, the difference has no energy to locate")
    return float(half.sum() / total)


def laterality_index(left: torch.Tensor, right: torch.Tensor, normal: torch.Tensor) -> np.ndarray:
    """Per paired seed: does the side word move a finding's change to that side?

    ``left``, ``right``, ``normal``: ``(N, C, H, W)`` drawn with seed i at index i for the same finding
    named on the patient's left, on the right, and for ``normal``. Returns ``(N,)``: the share of the
    change ``left_i - normal_i`` on the patient's left (:func:`side_fraction`) minus the share of
    ``right_i - normal_i`` there. 1: each change lands wholly on its named side; 0: the side word does
    not move the change; -1: the sides are swapped.
    """
    _check_pair(left, normal)
    _check_pair(right, normal)
    return np.asarray([side_fraction(left[i:i + 1], normal[i:i + 1], "left")
                       - side_fraction(right[i:i + 1], normal[i:i + 1], "left") for i in range(normal.shape[0])])


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); n >= 2."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"values: need at least 2, got {v.size}")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b) for independent samples (each n >= 2, not both constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"welch_t: need at least 2 values per group, got {a.size} and {b.size}")
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    if se == 0:
        raise ValueError("welch_t: both groups are constant, t is undefined")
    return float((a.mean() - b.mean()) / se)


@dataclass(frozen=True)
class PromptEffect:
    """Mean RMS pixel differences (images in [-1, 1]) of one paired-seed experiment.

    ``finding``: same seed, findings prompt vs normal prompt; ``control``: same seed, a prompt
    differing in a detail the model should hardly care about (one year of age) vs the normal
    prompt; ``seed``: same normal prompt, neighbouring seeds (how different two draws are anyway).
    """

    finding: float
    control: float
    seed: float

    @property
    def over_control(self) -> float:
        """How many times more the findings change the image than the control change does."""
        return self.finding / self.control

    @property
    def over_seed(self) -> float:
        """The findings change relative to the difference between two seeds of one prompt."""
        return self.finding / self.seed


def prompt_effect(normal: torch.Tensor, finding: torch.Tensor, control: torch.Tensor) -> PromptEffect:
    """The three mean differences of :class:`PromptEffect` from images ``(N, C, H, W)``, N >= 2,
    where image i of each tensor was drawn with seed i (so index i is a paired comparison)."""
    _check_pair(normal, finding)
    _check_pair(normal, control)
    if normal.shape[0] < 2:
        raise ValueError(f"images: need at least 2 seeds, got {normal.shape[0]}")
    return PromptEffect(
        finding=float(rms_difference(finding, normal).mean()),
        control=float(rms_difference(control, normal).mean()),
        seed=float(rms_difference(normal[1:], normal[:-1]).mean()),
    )


# -- does the model use the findings? (noise prediction with the true vs an altered prompt) -------
@torch.no_grad()
def noise_prediction_errors(pipe, images: torch.Tensor, prompts: Sequence[str], draws: int = 8, seed: int = 0,
                            batch: int = 32) -> torch.Tensor:
    """Noise-prediction MSE (the training loss) of ``pipe`` on real ``images`` under ``prompts``.

    images: ``(N, C, H, W)`` in [-1, 1] (C = 1 is repeated to the VAE's channels); returns ``(N, draws)``:
    for each image ``draws`` fixed (noise, timestep) pairs from a generator seeded ``seed``, so two
    calls with the same images and seed but different prompts are compared on identical noise.
    Latents are the VAE posterior means scaled by ``vae.config.scaling_factor``.
    """
    from diffusers import DDPMScheduler

    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: expected {images.shape[0]} (one per image), got {len(prompts)}")
    unet, vae, tok = pipe.unet, pipe.vae, pipe.tokenizer
    dev, dtype = unet.device, unet.dtype
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    x = images.to(dev, dtype).expand(-1, vae.config.in_channels, -1, -1)
    z0 = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(batch)]).float().cpu()
    z0 = z0 * float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((draws, *z0.shape), generator=gen)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (draws, z0.shape[0]), generator=gen)
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    errors = torch.empty(z0.shape[0], draws, dtype=torch.float64)
    for idx in torch.arange(z0.shape[0]).split(batch):
        emb = pipe.text_encoder(ids[idx].to(dev))[0]
        for d in range(draws):
            noisy = scheduler.add_noise(z0[idx], noise[d, idx], steps[d, idx])  # DDPM forward process
            pred = unet(noisy.to(dev, dtype), steps[d, idx].to(dev), emb).sample
            errors[idx, d] = (pred.float().cpu() - noise[d, idx]).pow(2).flatten(1).mean(1).double()
    return errors


def paired_gap(worse: torch.Tensor, better: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over images of ``worse - better`` (each ``(N,)`` or ``(N, draws)``,
    averaged over draws first): the paired difference of two conditions on the same images."""
    if worse.shape != better.shape or worse.shape[0] < 2:
        raise ValueError(f"expected two tensors of one shape with >= 2 images, got {tuple(worse.shape)} "
                         f"and {tuple(better.shape)}")
    diff = (worse.double() - better.double()).reshape(worse.shape[0], -1).mean(1)
    return mean_and_se(diff.numpy())
