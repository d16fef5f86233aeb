"""Every registered method that needs the trainer's generic hooks (calibration data, controllers, extra losses)
trains through the loop with no per-method code, and controller methods resume exactly."""
from __future__ import annotations

import dataclasses
import importlib

import pytest

from lorakit import Adapter
from lorakit.core import REGISTRY
from lorakit.train import TrainingInterrupted, run_training

from .conftest import tiny_cfg

importlib.import_module("lorakit.methods")


def _needs_hooks(c) -> bool:
    return bool(c.calibration) or c.controller.__func__ is not Adapter.controller.__func__ \
        or c.extra_loss is not Adapter.extra_loss or c.output_loss.__func__ is not Adapter.output_loss.__func__


HOOKED = sorted(n for n, c in REGISTRY.items() if _needs_hooks(c) and "linear" in c.layers)
CONTROLLED = sorted(n for n in HOOKED if REGISTRY[n].controller.__func__ is not Adapter.controller.__func__)


def _cfg(name, model_dir, data, out, **train):
    cfg = tiny_cfg(model_dir, data, out, **train)
    opts = dict(REGISTRY[name].example)
    if "r" in {f.name for f in dataclasses.fields(REGISTRY[name].Config)}:
        opts.setdefault("r", 2)  # paper defaults (e.g. r=128) exceed the tiny model's width
    cfg["adapter"] = {**opts, "method": name, "targets": ["q_proj", "v_proj"], "seed": 0}
    cfg["optim"]["lr"] = 1e-3
    return cfg


@pytest.mark.parametrize("name", HOOKED)
def test_method_trains_through_the_loop(name, tiny_lm_dir, cls_data, tmp_path):
    r = run_training(_cfg(name, tiny_lm_dir, cls_data, tmp_path / name, steps=3, calibration_batches=2))
    assert r["status"] == "completed" and len(r["loss_curve"]) == 3
    assert all(x == x for x in r["loss_curve"])  # finite


@pytest.mark.parametrize("name", CONTROLLED)
def test_controller_method_resumes_exactly(name, tiny_lm_dir, cls_data, tmp_path):
    full = run_training(_cfg(name, tiny_lm_dir, cls_data, tmp_path / "full", steps=6))

    class Stop:
        def on_step(self, step, logs):
            if step == 3:
                raise KeyboardInterrupt

    cut = _cfg(name, tiny_lm_dir, cls_data, tmp_path / "cut", steps=6)
    with pytest.raises(TrainingInterrupted):
        run_training(cut, callbacks=[Stop()])
    assert run_training(cut, resume=True)["loss_curve"] == full["loss_curve"]
