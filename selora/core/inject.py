"""Put LoRA / SeLoRA adapters into any torch model's ``nn.Linear`` layers (paper Sec. 4.1)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from selora.core.layers import LoRALinear, RowInit, SeLoRALinear

#: Target presets. Module names are those of diffusers 0.42 ``UNet2DConditionModel`` and
#: transformers 5.x ``CLIPTextModel``. The paper's text says "every linear layer"; its parameter
#: counts for LoRA r = 4 (Sec. 4: 0.803 M UNet, 0.216 M text encoder) are those of the attention
#: projections below (0.797 M and 0.221 M at SD v1.5's widths, against 1.71 M and 0.66 M for every
#: linear layer; ``tests/test_target_sets.py`` counts each candidate set), so the paper presets
#: are the attention projections and "every linear layer" is the named alternative.
PRESETS: dict[str, tuple[str, ...]] = {
    # every nn.Linear of the model
    "all-linear": (r".*",),
    # the paper's UNet targets: q/k/v/out of self- (attn1) and cross-attention (attn2)
    "paper-unet": (r"(.*\.)?attn[12]\.(to_q|to_k|to_v|to_out\.0)",),
    # the paper's text-encoder targets: the self-attention's q/k/v projections
    "paper-text-encoder": (r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj)",),
    # what the authors' released code adapted in the UNet
    "authors-unet": ("to_q", "to_k", "to_v", "ff.net.0.proj", "time_emb_proj"),
}

KINDS: dict[str, type[LoRALinear]] = {"selora": SeLoRALinear, "lora": LoRALinear}


def matches(name: str, target: str) -> bool:
    """Whether module ``name`` matches ``target``: equal, ends with ``"." + target``, or regex full match."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def replace_modules(model: nn.Module, new: Mapping[int, nn.Module]) -> int:
    """Install ``new[id(old)]`` in every slot of ``model`` that holds a module ``old`` keyed in ``new``.

    Contract:

    - ``new`` maps ``id(old module)`` to its replacement; the caller keeps every ``old`` alive while
      this runs (an ``id`` is only unique among live objects), e.g. by holding them in a dict.
    - A slot is one ``(parent, name)`` entry of ``parent._modules`` for each distinct module
      ``parent`` of ``model.modules()`` (``model`` included), so a module registered under several
      names, which ``named_children()`` / ``named_modules()`` list once, is replaced under every
      name. ``None`` children are skipped. ``model`` itself is no slot and is never replaced.
    - The parents are listed before anything changes: the replacements are not walked, so a
      replacement may contain the module it replaces (an adapter wrapping its base layer).
    - Keys not found in ``model`` are ignored; no type check is made (filter ``new`` beforehand).

    Returns the number of slots replaced (``0`` when nothing matched).
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() hides duplicates
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])
                replaced += 1
    return replaced


def _targets(targets: str | Sequence[str]) -> tuple[list[str], bool]:
    """Resolve a preset name or a list of targets; returns (patterns, is_preset)."""
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(
                f"targets: unknown preset {targets!r}; expected one of {', '.join(PRESETS)} or a list of names"
            )
        return list(PRESETS[targets]), True
    patterns = list(targets)
    if not patterns or not all(isinstance(t, str) and t for t in patterns):
        raise ValueError(f"targets: expected a preset name or a non-empty list of strings, got {targets!r}")
    return patterns, False


def select_linear(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}`` that ``targets`` selects in ``model`` (rules of :func:`inject`).

    Linear layers already wrapped by an adapter are never selected again. Raises ``ValueError``
    naming a few available modules when a preset matches nothing or a listed target matches nothing.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("inject: model is itself an nn.Linear; wrap it directly with LoRALinear/SeLoRALinear")
    patterns, is_preset = _targets(targets)
    adapted = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}  # never wrap twice
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in adapted}
    hits = {p: {n for n in linear if matches(n, p)} for p in patterns}
    chosen = [n for n in linear if any(n in names for names in hits.values())]
    missing = [p for p, names in hits.items() if not names]
    if not chosen or (missing and not is_preset):
        sample = ", ".join(list(linear)[:6]) or "none (the model has no nn.Linear)"
        what = f"preset {targets!r}" if is_preset else f"target(s) {missing}"
        raise ValueError(f"inject: {what} matched no nn.Linear module; available names include: {sample}")
    return {n: linear[n] for n in chosen}


def inject(
    model: nn.Module,
    targets: str | Sequence[str],
    kind: str = "selora",
    rank: int | None = None,
    scale: float = 1.0,
    init: RowInit | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, LoRALinear]:
    """Replace the matching ``nn.Linear`` modules of ``model`` in place by adapters; freeze the rest.

    Args:
        model: any torch module (a diffusers UNet, a CLIP text encoder, a toy MLP).
        targets: a preset (``"all-linear"``, ``"paper-unet"``, ``"paper-text-encoder"``,
            ``"authors-unet"``) or a list of strings; a string matches a module whose qualified
            name equals it, ends with ``"." + it``, or full-matches it as a regex. Each listed
            string must match at least one ``nn.Linear``.
        kind: ``"selora"`` (:class:`SeLoRALinear`) or ``"lora"`` (:class:`LoRALinear`).
        rank: initial rank; default 1 for SeLoRA and 4 for LoRA.
        scale: the adapters' fixed ``scaling``.
        init, generator: row initialiser and CPU generator for ``lora_A`` (see :mod:`selora.core.layers`).

    Returns ``{qualified name: adapter}`` in model order. Afterwards only the adapters'
    ``lora_A``/``lora_B`` require grad. A linear module reachable under several names is wrapped
    once and the wrapper is installed under every name (listed under the first).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if rank is None:
        rank = 1 if kind == "selora" else 4
    selected = select_linear(model, targets)

    existing = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        if id(p) not in existing:  # freeze everything but adapters (earlier ones keep their flag)
            p.requires_grad_(False)
    cls = KINDS[kind]
    wrapped: dict[int, LoRALinear] = {}
    for base in selected.values():
        if id(base) not in wrapped:
            wrapped[id(base)] = cls(base, rank=rank, scale=scale, init=init, generator=generator)
    replace_modules(model, wrapped)  # keys: ids of the selected nn.Linear only, under every name
    return {name: wrapped[id(base)] for name, base in selected.items()}
