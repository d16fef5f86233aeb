"""Combining adapters: merge functions on tensors, ``lorakit.combine`` (a new adapter from attached ones),
LoRA-LEGO, Twin-Merging, aTLAS and the ``lorakit merge`` YAML. ``lorakit.merge`` (folding the active adapters into
the base) is a different thing and lives in ``lorakit/merge.py``. See docs/merging.md."""
from .combine import METHODS, attach_factors, combine, merge_deltas, merge_factors, sources
from .functions import (dare_linear, dare_ties, magnitude_prune, merge_tensors, prune_magnitude, prune_random,
                        svd_factors, task_arithmetic, ties)

__all__ = ["METHODS", "combine", "merge_deltas", "merge_factors", "attach_factors", "sources", "merge_tensors",
           "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "prune_magnitude",
           "prune_random", "svd_factors"]
