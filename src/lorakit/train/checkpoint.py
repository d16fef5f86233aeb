"""Checkpoints: ``<out>/checkpoints/step-N/`` holds the adapter (PEFT format, usable as is) and
``trainer_state.pt`` (adapter tensors, optimizer, scheduler, RNG states, controller states, loss curve).

A checkpoint is written into a temporary directory and renamed into place, then ``checkpoints/latest`` is
replaced atomically, so a crash mid-save never leaves a half-written "latest" checkpoint.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import Adapter
from ..errors import LorakitError
from ..io import save_adapter

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the adapters own (parameters and buffers, frozen or not) plus trainable base parameters."""
    stash = {id(p) for p, _ in (model.__dict__.get("_lorakit") or {}).get("bias_stash", {}).values()}
    stash |= {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
    # trained base parameters: those that require grad now, and every base parameter trained in place (bias=all,
    # method full's weights and rest), even while a procedure has frozen it for a while (LISA's unsampled layers)
    grads = {n for n, p in model.named_parameters() if p.requires_grad or id(p) in stash}
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
            if ".adapters." in f".{k}" or ".copies." in f".{k}" or k in grads}


_TMP = re.compile(r"^\.(?:step-\d+|latest)\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def clean_stale(ckdir: Path) -> list[Path]:
    """Remove the temporaries (``.step-N.tmpPID`` directories, ``.latest.tmpPID`` files) that a writer killed
    mid-save (kill -9, power loss) left behind. Only those of processes that no longer run are removed, so a
    concurrent writer's temporaries are kept. Returns what was removed."""
    gone: list[Path] = []
    if not ckdir.is_dir():
        return gone
    for p in ckdir.iterdir():
        m = _TMP.match(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    if gone:
        log.info("removed %d stale checkpoint temporar%s in %s", len(gone), "y" if len(gone) == 1 else "ies", ckdir)
    return gone


def save_checkpoint(out: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    clean_stale(ckdir)
    final = ckdir / f"step-{step:06d}"
    tmp = ckdir / f".step-{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp)
        torch.save({"step": step, "model": adapter_tensors(model), **state}, tmp / STATE_NAME)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = ckdir / f".latest.tmp{os.getpid()}"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, ckdir / "latest")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    olds = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p != final)
    for p in olds[:max(len(olds) - max(keep, 1) + 1, 0)]:
        shutil.rmtree(p, ignore_errors=True)
    log.info("checkpoint saved: %s", final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    ckdir = out / "checkpoints"
    clean_stale(ckdir)  # a resume after kill -9 starts by removing what the killed run left half-written
    pointer = ckdir / "latest"
    if pointer.is_file():
        p = ckdir / pointer.read_text().strip()
        if (p / STATE_NAME).is_file():
            return p
    cands = sorted(p for p in ckdir.glob("step-*") if (p / STATE_NAME).is_file())
    return cands[-1] if cands else None


def fit_saved_tensors(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Let each adapter adopt the sizes of its checkpointed tensors (:meth:`lorakit.Adapter.fit_state`: supports
    selected during training) before they are copied in."""
    for name, m in model.named_modules():
        if isinstance(m, Adapter) and type(m).fit_state is not Adapter.fit_state:
            pre = f"{name}." if name else ""
            m.fit_state({k[len(pre):]: v for k, v in saved.items() if k.startswith(pre)})


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Restore the adapter tensors into ``model`` and return the rest of the trainer state."""
    try:
        st = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise LorakitError(f"cannot read checkpoint {path / STATE_NAME}: {e}") from None
    saved = st.pop("model")
    fit_saved_tensors(model, saved)
    own = model.state_dict(keep_vars=True)  # the live parameters and buffers
    bad = [k for k, v in saved.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise LorakitError(f"checkpoint {path} does not fit this model/adapter (tensor {bad[0]!r}); was the "
                           "config changed since it was written?")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)
    return st
