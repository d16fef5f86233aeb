"""Where a run's scalars go besides ``metrics.jsonl``: ``train.report_to: [jsonl, tensorboard, wandb]``.

``metrics.jsonl`` is always written (resume and the arena read it); ``jsonl`` in the list only says so. Every
other reporter receives exactly the numeric scalars of the ``train`` and ``eval`` records of ``metrics.jsonl``:

* a ``train`` record's keys (``loss``, ``lr``, ``grad_norm``, ``step_time_s``, ``tokens_per_s``, ``adapter/*``,
  task metrics) as ``train/<key>`` at its ``step``;
* an ``eval`` record's metrics as ``eval/<metric>`` at its ``step`` (``before`` is step 0, ``after`` the last step).

Backends are imported only when a run asks for them; :func:`check_report_to` (called when the config is resolved)
turns a missing package or an unknown name into a :class:`ConfigError`. wandb runs offline unless ``WANDB_MODE``
says otherwise (``wandb sync DIR`` uploads an offline run later).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["REPORTERS", "check_report_to", "Reporters", "scalars"]

# name -> (import to check, pip package)
REPORTERS: dict[str, tuple[str | None, str | None]] = {
    "jsonl": (None, None),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def check_report_to(names: Any) -> list[str]:
    """Validate ``train.report_to``: a list of known reporter names whose packages are installed."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"train.report_to must be a list of names from {list(REPORTERS)}, got {names!r}")
    out: list[str] = []
    for n in names:
        if n not in REPORTERS:
            from ..config import _suggest

            raise ConfigError(f"train.report_to: unknown reporter '{n}'{_suggest(n, list(REPORTERS))}; valid: "
                              f"{', '.join(REPORTERS)}")
        mod, pkg = REPORTERS[n]
        if mod is not None and importlib.util.find_spec(mod) is None:
            raise ConfigError(f"train.report_to: '{n}' needs the '{pkg}' package, which is not installed; install "
                              f"it with: python -m pip install {pkg}")
        if n not in out:
            out.append(n)
    return out


def scalars(rec: dict) -> tuple[str, int, dict[str, float]] | None:
    """``(prefix, step, {name: value})`` for a ``train``/``eval`` record of metrics.jsonl, else None."""
    ev = rec.get("event")
    if ev not in ("train", "eval"):
        return None
    skip = {"event", "step", "phase"}
    vals = {k: float(v) for k, v in rec.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    return ev, int(rec.get("step", 0)), vals


class Reporters:
    """Fans the ``train``/``eval`` records out to the configured backends (rank 0 only)."""

    def __init__(self, names: list[str], out: Path, config: dict, resume_step: int | None = None):
        self.tb = None
        self.wandb = None
        self.run = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # a resume discards what the interrupted run wrote after its checkpoint, as metrics.jsonl does
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        if "wandb" in names:
            import wandb

            self.wandb = wandb
            mode = os.environ.get("WANDB_MODE", "offline")
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=out.name, dir=str(out),
                                  config=config, mode=mode, reinit="finish_previous")
            log.info("wandb run in %s mode under %s", mode, out / "wandb")

    def __call__(self, rec: dict) -> None:
        got = scalars(rec)
        if got is None:
            return
        prefix, step, vals = got
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        if self.run is not None and vals:
            self.run.log({f"{prefix}/{k}": v for k, v in vals.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.run is not None:
            self.run.finish()
            self.wandb.teardown()  # waits until the service has written the run (finish alone may return first)
            self.run = None
