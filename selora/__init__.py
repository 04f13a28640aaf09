"""selora: Self-Expanding Low-Rank Adaptation (Mao et al. 2024, arXiv 2408.07196).

The core (layers, injection, Fisher scoring, the expansion controller) imports only torch; the
training and sharing API (config, trainer, runs, export) loads diffusers/transformers on first use.
"""

from __future__ import annotations

from importlib import import_module

from selora.core.expansion import Decision, ExpansionController
from selora.core.inject import PRESETS, inject
from selora.core.layers import LoRALinear, SeLoRALinear, kaiming_rows, num_trainable, ranks, trainable_parameters
from selora.distributed import default_device as device
from selora.peft_lora import PeftLoRALinear, peft_lora_layers  # registers PEFT LoRA layers with the controller
from selora.profile import profile, seed_everything, set_threads, setup

__version__ = "0.1.0"

#: Public names that load on first use (PEP 562): ``selora.Trainer`` imports diffusers only then.
_LAZY = {
    "TrainConfig": "selora.config",
    "load_config": "selora.config",
    "METHODS": "selora.methods",
    "Trainer": "selora.trainer",
    "load_run": "selora.rundir",
    "read_records": "selora.rundir",
    "save_diffusers_lora": "selora.export",
    "save_peft_adapter": "selora.export",
    "save_merged": "selora.export",
    "load_selora": "selora.export",
    "save_kohya_lora": "selora.kohya",
    "SeLoRACallback": "selora.peft_callback",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'selora' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Decision",
    "ExpansionController",
    "LoRALinear",
    "PRESETS",
    "PeftLoRALinear",
    "SeLoRACallback",
    "SeLoRALinear",
    "TrainConfig",
    "Trainer",
    "device",
    "inject",
    "kaiming_rows",
    "load_config",
    "load_run",
    "load_selora",
    "num_trainable",
    "peft_lora_layers",
    "profile",
    "ranks",
    "read_records",
    "save_diffusers_lora",
    "save_kohya_lora",
    "save_merged",
    "save_peft_adapter",
    "seed_everything",
    "set_threads",
    "setup",
    "trainable_parameters",
    "__version__",
]
