"""From a training run to the curves and rank figures of chapters 6-8: loss curves, the rank history,
layer names and kinds, and the Fig. 3 grid of final ranks.

Everything here reads what a training run writes (``selora.rundir.read_records(run_dir)``, final
``ranks.json``), so it is cheap and testable without a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "KIND_ORDER",
    "loss_curves",
    "module_kind",
    "rank_by_kind",
    "rank_grid",
    "rank_matrix",
    "running_mean",
    "short_name",
]


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
    leaf = re.search(
        r"(attn[12]\.to_\w+|ff\.net\.[02](?:\.proj)?|proj_in|proj_out|time_emb_proj|linear_\d)"
        r"(?:\.0)?$",
        rest,
    )
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


KIND_ORDER = (
    "text q",
    "text k",
    "text v",
    "text out",
    "text mlp",
    "attn1 q",
    "attn1 k",
    "attn1 v",
    "attn1 out",
    "attn2 q",
    "attn2 k",
    "attn2 v",
    "attn2 out",
    "ff",
    "proj in/out",
    "time",
    "other",
)


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
