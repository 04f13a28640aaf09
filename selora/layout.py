"""The names of the files and folders the package writes: a run folder, its checkpoints, an experiment folder.

Light on purpose (no imports): the trainer, the CLIs and :mod:`selora.results` (which must not pull in
the model libraries) all name files from here. A run folder (:mod:`selora.rundir` describes each)::

    config.yaml  metrics.jsonl  rank_history.jsonl  samples/  best/  adapters.safetensors  ranks.json
    checkpoints/last/  checkpoints/previous/  checkpoints/last.bad/

A checkpoint folder (``checkpoints/last``, ``best``; :mod:`selora.checkpoint`) holds ``adapters.safetensors``,
``ranks.json``, ``state.safetensors`` and ``state.json``. An experiment folder
(``python -m selora.evaluate --out DIR``) holds ``results.json``, ``results.md`` and ``runs/<run>/``,
each a run folder plus ``evaluation.json`` and ``test-samples.{png,safetensors}``.
"""

from __future__ import annotations

# a run folder
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RANK_HISTORY = "rank_history.jsonl"
SAMPLES = "samples"
BEST = "best"
CHECKPOINTS = "checkpoints"
LAST = f"{CHECKPOINTS}/last"
PREVIOUS = f"{CHECKPOINTS}/previous"
BAD = f"{CHECKPOINTS}/last.bad"
# a checkpoint folder
ADAPTERS = "adapters.safetensors"
RANKS = "ranks.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
# a finished run's adapters, beside config.yaml: named as in a checkpoint, so a run folder loads like one
FINAL_ADAPTERS = ADAPTERS
FINAL_RANKS = RANKS
# an experiment folder
RUNS = "runs"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RUN_RESULT = "evaluation.json"
TEST_SAMPLES = "test-samples.safetensors"
TEST_SAMPLES_GRID = "test-samples.png"

__all__ = [
    "ADAPTERS",
    "BAD",
    "BEST",
    "CHECKPOINTS",
    "CONFIG",
    "FINAL_ADAPTERS",
    "FINAL_RANKS",
    "LAST",
    "METRICS",
    "PREVIOUS",
    "RANKS",
    "RANK_HISTORY",
    "RESULTS_JSON",
    "RESULTS_MD",
    "RUNS",
    "RUN_RESULT",
    "SAMPLES",
    "STATE_JSON",
    "STATE_TENSORS",
    "TEST_SAMPLES",
    "TEST_SAMPLES_GRID",
]
