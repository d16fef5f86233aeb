"""SMT through the HF Trainer and lorakit's AdapterCallback: resuming from a checkpoint written after the selection
(the compact blocks, resized in place) reproduces the uninterrupted run's adapter."""
from __future__ import annotations

import shutil

import pytest
import torch

import lorakit

from .conftest import tiny_llama_model
from .test_hf_callback import _trainer

CFG = {"method": "smt", "targets": ["q_proj", "v_proj"], "block": 4, "blocks": 3, "warmup_steps": 1, "seed": 0}


def test_hf_trainer_resumes_after_the_selection(tmp_path, tiny_lm_dir):
    pytest.importorskip("accelerate")
    m1 = lorakit.attach(tiny_llama_model(tiny_lm_dir), CFG)
    _trainer(m1, tmp_path / "a", 4).train()
    assert sum(a.sparse_values.numel() for _, a in lorakit.adapters(m1)) == 3 * 16  # selected after step 1
    m2 = lorakit.attach(tiny_llama_model(tiny_lm_dir), CFG)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    _trainer(m2, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    a, b = lorakit.io.adapter_state(m1), lorakit.io.adapter_state(m2)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
