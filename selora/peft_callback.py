"""SeLoRA in a transformers ``Trainer``: a callback that runs the expansion controller (Algorithm 1)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from selora.core.expansion import Decision, ExpansionController


class SeLoRACallback(TrainerCallback):
    """``Trainer(model=peft_model, ..., callbacks=[SeLoRACallback()])`` grows the model's LoRA ranks
    (:mod:`selora.peft_lora`); keyword arguments go to :class:`ExpansionController`. One process only
    (a DDP wrapper would have to be rebuilt after each growth). ``decisions``: every test step's list."""

    def __init__(self, **controller_kwargs: Any) -> None:
        self.controller_kwargs = controller_kwargs
        self.controller: ExpansionController | None = None
        self.decisions: list[list[Decision]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self.controller = ExpansionController(model, inner, **self.controller_kwargs)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any):
        if decisions := self.controller.step():
            self.decisions.append(decisions)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self.controller.close()
