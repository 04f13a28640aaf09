"""selora: Self-Expanding Low-Rank Adaptation (Mao et al. 2024, arXiv 2408.07196)."""
from selora.expansion import Decision, ExpansionController
from selora.inject import PRESETS, inject
from selora.layers import LoRALinear, SeLoRALinear, kaiming_rows, num_trainable, ranks, trainable_parameters
from selora.profile import device, profile, seed_everything, set_threads, setup

__version__ = "0.1.0"

__all__ = [
    "Decision",
    "ExpansionController",
    "LoRALinear",
    "PRESETS",
    "SeLoRALinear",
    "device",
    "inject",
    "kaiming_rows",
    "num_trainable",
    "profile",
    "ranks",
    "seed_everything",
    "set_threads",
    "setup",
    "trainable_parameters",
    "__version__",
]
