"""Optimizer surgery after an expansion: swap grown parameters in place, keep their state."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

#: Optimizers whose per-parameter state is understood, with the state keys shaped like the parameter.
SUPPORTED: dict[type[torch.optim.Optimizer], tuple[str, ...]] = {
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
}


def _shaped_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    for cls, keys in SUPPORTED.items():
        if type(optimizer) is cls:
            return keys
    names = ", ".join(c.__name__ for c in SUPPORTED)
    raise TypeError(f"cannot resize the state of optimizer {type(optimizer).__name__}; supported: {names}")


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``TypeError`` unless :func:`replace_parameters` knows how to resize ``optimizer``'s state."""
    _shaped_keys(optimizer)


def _pad(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zeros of ``shape`` with ``t`` copied bit-for-bit into the leading corner."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def replace_parameters(optimizer: torch.optim.Optimizer, mapping: Mapping[nn.Parameter, nn.Parameter]) -> None:
    """Replace each old parameter by its grown successor in ``optimizer``.

    The new parameter takes the old one's position in the same param group (hyper-parameters
    unchanged). Moment buffers (Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD
    ``momentum_buffer``) keep the old entries bit-for-bit and get zeros for the new ones; ``step``
    is kept. Every new shape must contain the old one (growth only).
    """
    keys = _shaped_keys(optimizer)
    todo = {id(old): (old, new) for old, new in mapping.items()}
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if id(p) not in todo:
                continue
            old, new = todo.pop(id(p))
            if new.dim() != old.dim() or any(n < o for n, o in zip(new.shape, old.shape)):
                raise ValueError(f"replace_parameters: cannot shrink {tuple(old.shape)} to {tuple(new.shape)}")
            params[i] = new
            state = optimizer.state.pop(old, None)
            if state:
                optimizer.state[new] = {
                    k: _pad(v, new.shape) if k in keys and isinstance(v, torch.Tensor) else v for k, v in state.items()
                }
    if todo:
        shapes = [tuple(old.shape) for old, _ in todo.values()]
        raise ValueError(f"replace_parameters: {len(todo)} parameter(s) not in the optimizer (shapes {shapes})")
