"""SeLoRA on a PEFT model: PEFT's own LoRA ``Linear`` layers grown by the expansion controller.

``selora.ExpansionController(peft_model, optimizer)`` finds every ``peft.tuners.lora.layer.Linear``
of the active adapter through :func:`peft_lora_layers` (a finder registered in
:data:`selora.core.growable.FINDERS` when selora is imported) and drives each through a
:class:`PeftLoRALinear`, a view with the controller's interface (:class:`selora.core.growable.Growable`):

- Fisher capture (Eq. 3-4, exact per-sample, from the training backward): while armed, a forward
  hook on ``lora_A[adapter]`` keeps its input ``x`` (after PEFT's dropout and dtype cast) and
  ``u = x A^T``, and a forward hook on the layer hands its output ``y`` (gradient ``dL/dy``) to the
  capture. No extra pass; unarmed layers carry no hook. With ``lora_dropout > 0`` the kept ``x`` is
  the dropped-out input, so the per-sample gradients stay exact.
- growth (Eq. 2): ``lora_A[adapter].weight <- [A; K]`` ``(r + k, in)``, ``lora_B[adapter].weight <-
  [B, 0]`` ``(out, r + k)`` as NEW parameters; ``r`` grows and ``lora_alpha`` with it (``lora_alpha / r``
  constant) while ``scaling``, the scale the layer trains with, is left as it is: the output is unchanged.
- the saved config: the adapter's ``LoraConfig.rank_pattern`` / ``alpha_pattern`` give every adapted
  module its own r and lora_alpha under an anchored exact key (``"^" + re.escape(name)``, PEFT's pattern
  rule), kept current at every growth, so PEFT's ``save_pretrained`` and diffusers' ``save_lora_adapter``
  write what stock PEFT / diffusers load with the same outputs.

Refused with a one-line ValueError naming the module and the option: several active adapters, DoRA
(``use_dora``) and the other LoRA variants, rsLoRA (``use_rslora``, its scale moves with r),
``lora_bias`` (its gradient is outside Eq. 3-4), merged adapter weights, and every PEFT LoRA layer
but ``Linear`` (conv, embedding and quantized base layers: bitsandbytes, GPTQ, torchao, ...).
"""

from __future__ import annotations

import re
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from selora.core.growable import register_finder
from selora.core.layers import Capture, expanded_factors, kaiming_rows

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear, LoraLayer


class PeftLoRALinear:
    """The controller's view of one PEFT LoRA ``Linear`` and its adapter (module docstring).

    Args:
        module: the ``peft.tuners.lora.layer.Linear``.
        adapter: the adapter it grows (the active one).
        key: the module's name in PEFT's tuned model, the name a ``rank_pattern`` key matches.
        config: the adapter's ``LoraConfig``; :meth:`pin` writes the module's r and lora_alpha into it.
    """

    def __init__(self, module: Linear, adapter: str, key: str, config: LoraConfig) -> None:
        self.module, self.adapter, self.key, self.config = module, adapter, key, config
        self._armed: Capture | None = None
        self._hooks: list[Any] = []  # RemovableHandle of the two forward hooks while armed
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, u) of the current call

    @property
    def lora_A(self) -> nn.Parameter:
        """A ``(r, in)``: ``module.lora_A[adapter].weight``."""
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        """B ``(out, r)``: ``module.lora_B[adapter].weight``."""
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        """s of Eq. 1, PEFT's ``scaling[adapter]`` (``lora_alpha / r``)."""
        return self.module.scaling[self.adapter]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    # -- capture: the controller sets and clears it ---------------------------------------------------
    @property
    def _capture(self) -> Capture | None:
        return self._armed

    @_capture.setter
    def _capture(self, capture: Capture | None) -> None:
        """Arm (forward hooks on ``lora_A[adapter]`` and on the layer) or, with None, disarm."""
        for handle in self._hooks:
            handle.remove()
        self._armed, self._pending, self._hooks = capture, None, []
        if capture is not None:
            self._hooks = [
                self.module.lora_A[self.adapter].register_forward_hook(self._keep_input),
                self.module.register_forward_hook(self._record),
            ]

    def _keep_input(self, module: nn.Module, args: tuple[torch.Tensor, ...], u: torch.Tensor) -> None:
        self._pending = (args[0], u)  # x (N, ..., in) after dropout and cast, u = x A^T (N, ..., r)

    def _record(self, module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> None:
        if self._pending is not None and self._armed is not None:  # no lora_A call: adapters disabled
            (x, u), self._pending = self._pending, None
            self._armed.record(x, u, y, self.lora_B)  # dL/dy is the branch's output gradient

    # -- growth ---------------------------------------------------------------------------------------
    def draw_rows(self, k: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """k candidate rows K ``(k, in)``, Kaiming-uniform (:func:`selora.core.layers.kaiming_rows`, Eq. 2)."""
        return kaiming_rows(k, self.in_features, generator).to(self.lora_A)

    @torch.no_grad()
    def expand(
        self, k: int = 1, generator: torch.Generator | None = None, K: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Grow by ``k`` (Eq. 2, :func:`selora.core.layers.expanded_factors`); the output is unchanged.

        ``r`` and ``lora_alpha`` grow in proportion and the config's patterns follow (:meth:`pin`);
        the old parameters must be swapped in the optimizer (the controller does). Returns K ``(k, in)``.
        """
        A, B, r = self.module.lora_A[self.adapter], self.module.lora_B[self.adapter], self.rank
        draw = partial(self.draw_rows, generator=generator)
        A.weight, B.weight, K = expanded_factors(A.weight, B.weight, k, K, draw)
        A.out_features = B.in_features = self.module.r[self.adapter] = self.rank
        self.module.lora_alpha[self.adapter] = self.module.lora_alpha[self.adapter] * self.rank / r
        self.pin()
        return K

    def pin(self) -> None:
        """Write the module's r and lora_alpha under its anchored exact key into the config's patterns."""
        key = "^" + re.escape(self.key)
        self.config.rank_pattern[key] = self.rank
        self.config.alpha_pattern[key] = self.module.lora_alpha[self.adapter]


def _tuned(model: nn.Module) -> tuple[nn.Module, dict[str, LoraConfig]]:
    """PEFT's tuned model (whose module names the pattern keys match) and its ``{adapter: LoraConfig}``:
    a ``PeftModel``'s tuner's ``.model``, else the module holding ``peft_config`` (diffusers' and
    transformers' ``add_adapter``)."""
    from peft.tuners.tuners_utils import BaseTuner

    for m in model.modules():
        if isinstance(m, BaseTuner):
            return m.model, m.peft_config
    for m in model.modules():
        if isinstance(getattr(m, "peft_config", None), dict):
            return m, m.peft_config
    raise ValueError("SeLoRA on PEFT: the model has PEFT LoRA layers but no peft_config (use get_peft_model)")


def _active_adapter(name: str, module: LoraLayer) -> str:
    active = module.active_adapters
    if len(active) != 1:
        raise ValueError(f"SeLoRA on PEFT: module {name!r}: several active adapters {active} are not supported")
    return active[0]


def _uses_rslora(module: LoraLayer, adapter: str, config: LoraConfig) -> bool:
    """rsLoRA for ``adapter`` on ``module``: the layer's own record where peft keeps one, else the adapter's config
    (peft 0.17's layers keep only the scale rsLoRA gave them, and the config sets it for every module)."""
    per_module = getattr(module, "use_rslora", None)
    return bool(per_module.get(adapter, False) if per_module is not None else config.use_rslora)


def _refuse_unsupported(name: str, module: LoraLayer, adapter: str, config: LoraConfig) -> None:
    """ValueError naming ``module`` and the first option the view cannot grow exactly (module docstring)."""
    from peft.tuners.lora.layer import Linear

    refused = [
        (type(module) is not Linear, f"layer type {type(module).__name__} (only a plain LoRA Linear)"),
        (module.use_dora.get(adapter, False), "use_dora=True"),
        (adapter in module.lora_variant, f"LoRA variant {type(module.lora_variant.get(adapter)).__name__}"),
        (_uses_rslora(module, adapter, config), "use_rslora=True"),
        (module.lora_bias.get(adapter, False), "lora_bias=True"),
        (module.merged, "merged adapter weights (unmerge them first)"),
    ]
    for hit, what in refused:
        if hit:
            raise ValueError(f"SeLoRA on PEFT: module {name!r}: {what} is not supported")


@register_finder
def peft_lora_layers(model: nn.Module) -> dict[str, PeftLoRALinear]:
    """``{qualified name: view}`` of the PEFT LoRA layers of ``model`` (model order), for the active
    adapter, and their config patterns pinned (:meth:`PeftLoRALinear.pin`, the user's pattern keys
    replaced by one exact key per module, same ranks). ``{}`` when the model has no PEFT LoRA layer
    (always when peft was never imported). Raises ValueError for what is not supported."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora.layer import LoraLayer

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not found:
        return {}
    root, configs = _tuned(model)
    keys = {id(m): name for name, m in root.named_modules()}
    views = {}
    for name, module in found:
        adapter = _active_adapter(name, module)
        if adapter in module.r:  # else the module holds other adapters only
            _refuse_unsupported(name, module, adapter, configs[adapter])
            views[name] = PeftLoRALinear(module, adapter, keys.get(id(module), name), configs[adapter])
    for config in {id(v.config): v.config for v in views.values()}.values():
        config.rank_pattern, config.alpha_pattern = {}, {}
    for view in views.values():
        view.pin()
    return views
