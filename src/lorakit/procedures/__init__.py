"""Training procedures: how the adapters' parameters are grouped and updated (see :mod:`lorakit.procedures.base`).

``optim.name=adamw`` (default) and ``optim.name=loraplus`` are built in; register your own with
``@register_procedure("name")`` on a :class:`Procedure` subclass.
"""
from __future__ import annotations

from .base import (DEFAULT_PROCEDURE, PROCEDURES, ROLES, Hyper, Procedure, TrainParam, adapter_roles, check_role_optim, get_procedure,
                   make_procedure, options_dict, list_procedures, procedures_markdown, role_settings, preflight, probe_parameters, register_procedure, setup, trainable_parameters)
from . import adamw as _adamw  # noqa: F401  (registers "adamw")
from . import loraplus as _loraplus  # noqa: F401  (registers "loraplus")
from . import allora as _allora  # noqa: F401  (registers "allora")
from . import lorapro as _lorapro  # noqa: F401  (registers "lorapro")
from . import ggpo as _ggpo  # noqa: F401  (registers "ggpo" and "mgpo")
from . import flexora as _flexora  # noqa: F401  (registers "flexora")
from . import galore as _galore  # noqa: F401  (registers "galore", "fira")
from . import lisa as _lisa  # noqa: F401  (registers "lisa")
from . import frugal as _frugal  # noqa: F401  (registers "frugal")
from . import owlore as _owlore  # noqa: F401  (registers "owlore")
from . import gradnormlorp as _gradnormlorp  # noqa: F401  (registers "gradnormlorp")

__all__ = ["DEFAULT_PROCEDURE", "PROCEDURES", "ROLES", "Hyper", "Procedure", "TrainParam", "adapter_roles", "get_procedure",
           "make_procedure", "options_dict", "list_procedures", "procedures_markdown", "preflight", "probe_parameters", "register_procedure", "setup",
           "trainable_parameters", "check_role_optim", "role_settings"]
