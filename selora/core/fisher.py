"""Exact per-sample empirical Fisher of an adapter, from the training step's own backward (Eq. 3-5).

For one adapter call ``z = s * (x A^T) B^T`` with ``x`` ``(N, T, in)`` (a 2-D input ``(N, in)`` has
T = 1; more middle dimensions are flattened into T; **the first dimension is the sample dimension**),
``u = x A^T`` ``(N, T, r)`` and ``g = dL/dz = dL/dy`` ``(N, T, out)``, sample i's gradients are

    dL_i/dB     = s * sum_t g_it u_it^T                 (N, out, r)
    dL_i/dA     = s * sum_t (g_it B)^T x_it             (N, r, in)
    dL_i/dB_new = s * sum_t g_it (K x_it)^T             (N, out, k)   for candidate rows K (k, in)

The last line is the expanded layer's new B columns at B_new = 0 (Eq. 2); with B_new = 0 the
gradients of every old entry are unchanged, so

    FI_orig = mean_i (||dL_i/dA||^2 + ||dL_i/dB||^2)          (Eq. 3-4)
    FI_exp  = FI_orig + mean_i ||dL_i/dB_new||^2   >= FI_orig  (Eq. 4 for [A;K], [B, 0])

and the working rule of Eq. 5 is FI_exp / FI_orig >= lambda (the printed orig/exp is <= 1).
Everything is O(N T r (in + out)), like the adapter's own forward: no extra forward/backward pass.

When the training loss is ``mean_i L_i`` (``loss_reduction="mean"``) the captured g is
``(1/N) dL_i/dy``, so the per-sample gradients are multiplied by N. A layer called several times in
one forward contributes the SUM of its calls' per-sample gradients (squared afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from selora.core.growable import Growable

LOSS_REDUCTIONS = ("mean", "sum")
#: Entries of :func:`sample_stats`: ``[sum_i ||dL_i/d(A, B)||^2, sum_i ||dL_i/dB_new||^2, N]``.
FISHER_STATS = 3


class SampleGrads(NamedTuple):
    """One adapter's per-sample gradients: ``dA`` ``(N, r, in)``, ``dB`` ``(N, out, r)`` and
    ``dB_new`` ``(N, out, k)`` for candidate rows K ``(k, in)`` (None without K)."""

    dA: torch.Tensor
    dB: torch.Tensor
    dB_new: torch.Tensor | None


#: ``fold(layer, K, grads) -> row``: what a capture keeps of one backward, a row of sums that adds up
#: across passes and processes (an expansion criterion's, :meth:`selora.core.criteria.Criterion.fold`).
Fold = Callable[[Growable, torch.Tensor, SampleGrads], torch.Tensor]


def _as_samples(t: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, ..., d) -> (N, T, d)`` in ``dtype`` (a 1-D input is one sample with T = 1)."""
    return t.reshape(n, -1, t.shape[-1]).to(dtype)


def per_sample_grads(
    x: torch.Tensor,
    u: torch.Tensor,
    g: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    K: torch.Tensor | None = None,
    factor: float = 1.0,
) -> SampleGrads:
    """Closed-form per-sample gradients of one adapter call (module docstring).

    Args: ``x`` ``(N, ..., in)``, ``u = x A^T`` ``(N, ..., r)``, ``g = dL/dy`` ``(N, ..., out)``,
    ``lora_B`` ``(out, r)``, candidate rows ``K`` ``(k, in)`` or None; ``factor`` multiplies every
    gradient (N for a mean-reduced loss). Computed in at least float32.

    Returns :class:`SampleGrads` ``(dA (N, r, in), dB (N, out, r), dB_new (N, out, k) or None)``.
    """
    n = x.shape[0] if x.dim() > 1 else 1
    dtype = torch.promote_types(x.dtype, torch.float32)
    x3, u3, g3 = (_as_samples(t, n, dtype) for t in (x, u, g))
    c = float(scaling) * float(factor)
    # Every product keeps the long T axis as the contraction of a (small x T) @ (T x wide) bmm:
    # several times faster on CPU than the transposed (wide x T) @ (T x small) forms.
    dB = c * torch.bmm(u3.transpose(1, 2), g3).transpose(1, 2)  # (N, out, r)
    gB_t = torch.matmul(lora_B.to(dtype).T.contiguous(), g3.transpose(1, 2))  # (N, r, T) = (g B)^T
    dA = c * torch.bmm(gB_t, x3)  # (N, r, in)
    dB_new = None
    if K is not None:
        v_t = torch.matmul(K.to(dtype), x3.transpose(1, 2))  # (N, k, T) = (x K^T)^T
        dB_new = c * torch.bmm(v_t, g3).transpose(1, 2)  # (N, out, k)
    return SampleGrads(dA, dB, dB_new)


def sample_stats(dA: torch.Tensor, dB: torch.Tensor, dB_new: torch.Tensor | None = None) -> torch.Tensor:
    """``[sum_i ||dL_i/d(A, B)||^2, sum_i ||dL_i/dB_new||^2, N]`` (3,) from per-sample gradients
    ``(N, r, in)``, ``(N, out, r)``, ``(N, out, k)``: the summable form of Eq. 3-4 (adds across
    micro-batches and DDP ranks)."""
    new = dB_new.pow(2).sum() if dB_new is not None else dA.new_zeros(())
    return torch.stack([dA.pow(2).sum() + dB.pow(2).sum(), new, dA.new_tensor(float(dA.shape[0]))])


def fi_scores(stats: torch.Tensor) -> tuple[float, float]:
    """``(FI_orig, FI_exp)`` = ``(S_orig / N, (S_orig + S_new) / N)`` from :func:`sample_stats`
    (Eq. 3 averaged over samples, Eq. 4 summed over entries); ``(0, 0)`` without samples."""
    sq_orig, sq_new, count = (float(v) for v in stats.tolist())
    if count == 0:
        return 0.0, 0.0
    return sq_orig / count, (sq_orig + sq_new) / count


def fi_ratio(fi_orig: float, fi_exp: float) -> float:
    """FI_exp / FI_orig (Eq. 5, working direction, >= 1); ``inf`` when only FI_exp > 0, ``nan`` for 0/0."""
    if fi_orig > 0:
        return fi_exp / fi_orig
    return math.inf if fi_exp > 0 else math.nan


class LayerCapture:
    """Accumulates one layer's per-sample statistics during armed forward/backward passes.

    Installed as ``layer._capture``; the layer's forward calls :meth:`record`, which registers a
    hook on the adapter branch output. The hook computes the call's per-sample gradients at the
    parameters of that backward and adds them to the running per-sample sums (all calls of the
    layer in one backward); at the end of the backward ``fold(layer, K, sums)`` turns the sums into
    a row (e.g. :func:`sample_stats`, squared per sample) that is added to :attr:`stats`.
    Several forward/backward passes (gradient accumulation) add up as more samples; forwards whose
    output never receives a gradient (e.g. recomputation under activation checkpointing) add nothing.
    """

    def __init__(self, layer: Growable, K: torch.Tensor, fold: Fold, loss_reduction: str = "mean") -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: expected one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.layer = layer
        self.K = K
        self.fold = fold
        self.loss_reduction = loss_reduction
        self._sums: list[torch.Tensor] | None = None  # running per-sample (dA, dB, dB_new) of this pass
        self._flush_queued = False
        self.stats: torch.Tensor | None = None  # the folded rows, summed

    def record(self, x: torch.Tensor, u: torch.Tensor, z: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Called by the layer's forward: ``x`` input, ``u = x A^T``, ``z`` branch output, ``lora_B``."""
        if not z.requires_grad:
            return
        z.register_hook(partial(self._on_grad, x.detach(), u.detach(), lora_B.detach()))

    @torch.no_grad()
    def _on_grad(self, x: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor) -> None:
        n = x.shape[0] if x.dim() > 1 else 1
        factor = n if self.loss_reduction == "mean" else 1
        parts = per_sample_grads(x, u, g, lora_B, self.layer.scaling, self.K, factor)
        if self._sums is None:
            self._sums = list(parts)
        else:
            if self._sums[0].shape[0] != n:
                raise RuntimeError(
                    f"SeLoRA Fisher capture: a layer was called with {n} and {self._sums[0].shape[0]} "
                    "samples in one pass; the first input dimension must be the sample dimension"
                )
            for acc, p in zip(self._sums, parts):
                acc.add_(p)
        if not self._flush_queued:  # fold this backward's per-sample sums when the backward ends
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)

    def reset(self) -> None:
        """Forget everything captured so far (a skipped step); ``K`` stays."""
        self._sums = None
        self.stats = None

    def flush(self) -> None:
        """Fold the running per-sample sums and add them to :attr:`stats` (idempotent when empty)."""
        self._flush_queued = False
        if self._sums is None:
            return
        row = self.fold(self.layer, self.K, SampleGrads(*self._sums))
        self._sums = None
        self.stats = row if self.stats is None else self.stats + row.to(self.stats)
