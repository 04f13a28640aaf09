"""Numbers quoted from the paper (Mao et al. 2024, arXiv 2408.07196), kept in one place.

Nothing here is computed: these are the published values, so the book can put them next to its own
runs (always separated and labelled "(paper, Table 1)"). Each metric is ``(mean, std)`` over the
paper's 3 seeds; FID lower is better, CLIP score higher is better.
"""

from __future__ import annotations

#: Table 1: ``{dataset: {method: {"fid": (mean, std), "clip": (mean, std)}}}``.
TABLE1: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "IU X-ray": {
        "lora": {"fid": (113.37, 7.88), "clip": (27.11, 0.18)},
        "adalora": {"fid": (184.25, 53.05), "clip": (26.90, 0.33)},
        "dylora": {"fid": (116.03, 10.29), "clip": (26.89, 0.05)},
        "selora": {"fid": (113.04, 16.79), "clip": (27.26, 0.22)},
    },
    "Montgomery": {
        "lora": {"fid": (461.80, 14.10), "clip": (24.34, 0.71)},
        "adalora": {"fid": (489.24, 14.28), "clip": (22.47, 0.23)},
        "dylora": {"fid": (475.42, 7.84), "clip": (22.93, 0.27)},
        "selora": {"fid": (205.54, 9.56), "clip": (26.38, 0.04)},
    },
}

#: Trainable parameters on IU X-ray as reported (one unit for both methods): SeLoRA's average vs LoRA r = 4.
TRAINABLE_IU_XRAY: dict[str, dict[str, float]] = {
    "selora": {"text_encoder": 0.121, "unet": 0.368},
    "lora": {"text_encoder": 0.216, "unet": 0.803},
}

#: Where Fig. 3 finds the rank: q and k of the text encoder's attention and of the UNet's
#: cross-attention (``attn2``), in the kinds of :func:`selora.report.module_kind`.
FIG3_KINDS: tuple[str, ...] = ("text q", "text k", "attn2 q", "attn2 k")

#: Method names as the paper prints them.
METHOD_NAMES: dict[str, str] = {"lora": "LoRA", "adalora": "AdaLoRA", "dylora": "DyLoRA", "selora": "SeLoRA"}


def table1_markdown(dataset: str = "Montgomery") -> str:
    """The quoted Table 1 rows of ``dataset`` as a markdown table (FID ↓, CLIP score ↑)."""
    if dataset not in TABLE1:
        raise KeyError(f"dataset {dataset!r}: expected one of {', '.join(TABLE1)}")
    lines = [f"| method | FID ↓ ({dataset}) | CLIP score ↑ ({dataset}) |", "|---|---:|---:|"]
    for method, row in TABLE1[dataset].items():
        (f, fs), (c, cs) = row["fid"], row["clip"]
        lines.append(f"| {METHOD_NAMES[method]} | {f:.2f} ± {fs:.2f} | {c:.2f} ± {cs:.2f} |")
    return "\n".join(lines)
