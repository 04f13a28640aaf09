"""The export formats: how a run's adapters can leave the package (``python -m selora.export --format``).

- ``diffusers``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``;
- ``peft``: a PEFT adapter folder per component;
- ``merged``: a full diffusers pipeline with W0 + s B A folded into the weights;
- ``kohya``: one kohya-ss / A1111 / ComfyUI ``.safetensors`` file.

:mod:`selora.export` writes each and :mod:`selora.modelcard` describes each; both take the names from here.
"""

from __future__ import annotations

FORMATS = ("diffusers", "peft", "merged", "kohya")

__all__ = ["FORMATS"]
