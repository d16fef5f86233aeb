"""PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``, for every ``peft_type``.

Tensor keys are ``base_model.model.<module path>.<param>`` (the adapter name removed), as PEFT writes them. Nothing
is ever unpickled: a directory holding only ``adapter_model.bin`` is refused with the conversion to use. Writes go
to temporaries in the target directory and are renamed into place, so an interrupted write never leaves a
half-written adapter.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
from torch import Tensor

from ..errors import AdapterFileError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "confined", "read_adapter_config", "read_tensors",
           "atomic_dir_write", "write_adapter_dir"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def confined(path: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """``path`` with every symlink resolved, refused (:class:`AdapterFileError`) unless it lies inside ``root``.

    ``root=None`` confines nothing and returns ``path`` unchanged. Check right before reading: a symlink inside
    ``root`` pointing outside is refused before the file is opened, and nothing about the outside file is
    reported (the message names the link, never its target)."""
    p = Path(path)
    if root is None:
        return p
    try:
        rp = p.resolve()
        rootp = Path(root).resolve()
    except (OSError, RuntimeError, ValueError):
        raise AdapterFileError(f"cannot resolve '{p.name}' (a symlink loop or an invalid path)") from None
    if not rp.is_relative_to(rootp):
        raise AdapterFileError(f"'{p.name}' in adapter '{p.parent.name}' resolves to a place outside the adapter "
                               "directory (a symlink pointing outside?): refused")
    return rp


def read_adapter_config(directory: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """The parsed ``adapter_config.json`` of an adapter directory (any ``peft_type``).

    ``root``: refuse (before reading) a directory or config file whose real path lies outside ``root``."""
    d = confined(directory, root)
    if not d.is_dir():
        raise AdapterFileError(f"adapter directory not found: {d}")
    cp = confined(d / CONFIG_NAME, root)
    if not cp.is_file():
        raise AdapterFileError(f"{d} has no {CONFIG_NAME}: not an adapter directory")
    try:
        conf = json.loads(cp.read_text())
    except UnicodeDecodeError:
        raise AdapterFileError(f"{cp} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{cp} is not valid JSON: {e}") from None
    except ValueError:  # an integer over Python's digit limit
        raise AdapterFileError(f"{cp} is not valid JSON: a number is too long") from None
    except RecursionError:
        raise AdapterFileError(f"{cp} is nested too deeply to be an adapter config") from None
    if not isinstance(conf, dict) or "peft_type" not in conf:
        raise AdapterFileError(f"{cp} has no 'peft_type': not a PEFT/lorakit adapter config")
    return conf


def read_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of ``adapter_model.safetensors`` (never a pickle). A floating-point tensor holding NaN or ±inf
    is refused (AdapterFileError naming it): such a file would poison every output it touches."""
    directory = Path(directory)
    wp = directory / WEIGHTS_NAME
    if not wp.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterFileError(f"{directory} holds only adapter_model.bin (a pickle). lorakit never unpickles "
                                   "files; convert it once, in a trusted environment, with PEFT's "
                                   "save_pretrained(..., safe_serialization=True)")
        raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(wp))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{wp} is not a valid safetensors file: {e}") from None
    for k, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise AdapterFileError(f"{wp}: tensor '{k}' holds non-finite values ({bad}); refusing the file")
    return tensors


def atomic_dir_write(directory: Path, files: dict[str, Callable[[str], Any]]) -> None:
    """Write each ``{file name: writer(tmp_path)}`` to a temporary in ``directory`` and rename it into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for fname, writer in files.items():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{fname}.", suffix=".tmp")
        os.close(fd)
        try:
            writer(tmp)
            os.replace(tmp, directory / fname)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_adapter_dir(directory: str | os.PathLike, conf: dict, state: dict[str, Tensor]) -> Path:
    """Write ``conf`` and ``state`` (full file keys) as an adapter directory, atomically per file."""
    directory = Path(directory)
    seen: set[int] = set()
    state = dict(state)
    for k, v in list(state.items()):  # tied tensors must be separate storages for safetensors
        v = v.detach().contiguous().cpu()
        state[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    try:
        atomic_dir_write(directory, {
            WEIGHTS_NAME: lambda p: save_file(state, p, metadata={"format": "pt"}),
            CONFIG_NAME: lambda p: Path(p).write_text(json.dumps(conf, indent=2, sort_keys=True, default=str)),
        })
    except OSError as e:
        raise AdapterFileError(f"cannot write adapter to {directory}: {e}") from None
    return directory
