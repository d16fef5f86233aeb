"""The sparse methods through `lorakit train`'s loop: SMT interrupted in its warm-up (scores in the controller's
state) and LT-SFT interrupted in its full phase resume to the uninterrupted loss curve and file; so do SMT (both
warm-ups), LT-SFT and progressive SaRA interrupted after their selection (the compact supports, resized tensors and
optimiser state come back from the checkpoint); S2FT and SaRA train and save a file that reloads to the trained
function."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainingInterrupted, run_training

from .conftest import tiny_cfg

ADAPTERS = {
    "smt": {"targets": "all-linear", "block": 4, "blocks": 6, "warmup_steps": 4},
    "lt_sft": {"targets": "all-linear", "density": 0.05, "full_steps": 4},
    "s2ft": {"targets": ["down_proj"], "ratio": 0.1},
    "sara": {"targets": "all-linear", "threshold": 0.005},
}


def _cfg(name, model_dir, data, out, **extra):
    cfg = tiny_cfg(model_dir, data, out, steps=6)
    cfg["adapter"] = {"method": name, "seed": 0, **ADAPTERS[name], **extra}
    cfg["optim"]["lr"] = 1e-3
    return cfg


@pytest.mark.parametrize("name", ["smt", "lt_sft"])
def test_interrupted_before_the_selection_resumes_exactly(name, tiny_lm_dir, cls_data, tmp_path):
    full = run_training(_cfg(name, tiny_lm_dir, cls_data, tmp_path / "full"))

    class Stop:
        def on_step(self, step, logs):
            if step == 2:  # inside the warm-up / full phase
                raise KeyboardInterrupt

    cut = _cfg(name, tiny_lm_dir, cls_data, tmp_path / "cut")
    with pytest.raises(TrainingInterrupted):
        run_training(cut, callbacks=[Stop()])
    res = run_training(cut, resume=True)
    assert res["loss_curve"] == full["loss_curve"]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n = sum(v.numel() for k, v in a.items() if k.endswith("sparse_delta.indices"))
    total = sum(int(v[0] * v[1]) for k, v in a.items() if k.endswith("sparse_delta.shape"))
    assert 0 < n < total  # a sparse file


@pytest.mark.parametrize("name,extra", [("smt", {}), ("smt", {"warmup": "score"}), ("lt_sft", {}),
                                        ("sara", {"progressive_iter": 2})])
def test_interrupted_after_the_selection_resumes_exactly(name, extra, tiny_lm_dir, cls_data, tmp_path):
    full = run_training(_cfg(name, tiny_lm_dir, cls_data, tmp_path / "full", **extra))

    class Stop:
        def on_step(self, step, logs):
            if step == 5:  # after the selection (step 4) / the re-selection (step 3)
                raise KeyboardInterrupt

    cut = _cfg(name, tiny_lm_dir, cls_data, tmp_path / "cut", **extra)
    with pytest.raises(TrainingInterrupted):
        run_training(cut, callbacks=[Stop()])
    st = torch.load(tmp_path / "cut" / "checkpoints" / "step-000005" / "trainer_state.pt", weights_only=True)
    vals = [v for k, v in st["model"].items() if k.endswith("sparse_values")]
    assert vals and all(v.dim() != 2 for v in vals)  # the checkpoint holds the compact supports
    if name == "sara":  # the re-selection dropped entries (so the resumed run had to resize)
        assert any(v.numel() for k, v in st["model"].items() if k.endswith("frozen_indices"))
    res = run_training(cut, resume=True)
    assert res["loss_curve"] == full["loss_curve"]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["s2ft", "sara"])
def test_trains_and_saves(name, tiny_lm_dir, cls_data, tmp_path):
    r = run_training(_cfg(name, tiny_lm_dir, cls_data, tmp_path / name))
    assert r["status"] == "completed" and all(x == x for x in r["loss_curve"])
    assert r["trainable_params"] > 0
