"""``optim.name=adamw`` (the default): plain AdamW over lorakit's classic parameter groups.

Groups (see :meth:`lorakit.procedures.Procedure.param_groups`): parameters of 2 or more dimensions with
``optim.weight_decay``, vectors and scalars without, ``adapter.trainable`` copies (role "head") with weight decay
at ``optim.trainable_lr``. Every method trains this way; the loss curve is bit-identical to the trainer before
procedures existed (tests/train/test_procedures.py).
"""
from __future__ import annotations

from .base import Procedure, register_procedure

__all__ = ["AdamW"]


@register_procedure("adamw")
class AdamW(Procedure):
    paper = "Loshchilov & Hutter 2019, arXiv:1711.05101"
    """AdamW (decoupled weight decay, Loshchilov & Hutter, arXiv:1711.05101) with the default groups. No options."""
