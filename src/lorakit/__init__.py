"""lorakit: the whole LoRA family of parameter-efficient fine-tuning, one API, PEFT-compatible files."""
__version__ = "0.1.0"

from .controllers import Controller
from .config import AttachConfig
from .core import REGISTRY, Adapter, Adapted, LowRank, LowRankConfig, PeftSpec, register
from .errors import AdapterFileError, AssetError, ConfigError, LorakitError, MergeError, TargetError
from .attachments import Attachment, Member
from .inject import (active_names, adapter_stats, adapters, attach, attached, attachment, batch_context, calibrate,
                     detach, disabled, extra_loss, hosts, output_loss, init_adapters, set_active, summary)
from .inject import controllers as training_controllers
from .extract import extract_lora
from .hotswap import hotswap, prepare_for_hotswap
from .io import load_adapter, read_adapter_config, save_adapter
from .merge import merge, merge_and_unload, merged, unmerge
from .merging import combine
from . import controllers, formats, methods, rank  # noqa: E402  the modules, never shadowed by functions


def list_methods() -> list[dict]:
    """Every registered method: name, family, paper, mergeable, PEFT type, init, layers, calibration."""
    return [{"name": n, "family": c.family, "paper": c.paper, "mergeable": c.mergeable,
             "peft_type": c.peft.peft_type if c.peft else None, "init": c.init,
             "layers": list(c.layers), "calibration": c.calibration}
            for n, c in sorted(REGISTRY.items())]


__all__ = [
    "__version__", "attach", "detach", "set_active", "disabled", "summary", "merge_and_unload", "merged", "merge",
    "unmerge", "save_adapter", "load_adapter", "read_adapter_config", "list_methods", "extra_loss", "output_loss",
    "adapter_stats", "batch_context", "training_controllers", "calibrate", "init_adapters", "hosts", "adapters",
    "attached", "attachment", "Attachment", "Member", "active_names", "AttachConfig", "Adapter", "Adapted", "LowRank",
    "LowRankConfig", "PeftSpec", "register", "REGISTRY", "Controller", "LorakitError", "ConfigError", "TargetError",
    "AdapterFileError", "MergeError", "AssetError", "extract_lora", "hotswap",
    "prepare_for_hotswap", "combine",
]
