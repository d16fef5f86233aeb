"""PEFT's options through ``lorakit train`` with no special code: an EVA init gets calibration batches from the
training set (``calibration_kind``), trainable tokens train beside the LoRA, and the saved adapter says so."""
from __future__ import annotations

import lorakit
from lorakit.train import run_training

from .conftest import tiny_cfg


def test_eva_and_trainable_tokens_train_through_the_loop(tiny_lm_dir, cls_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "run", steps=3, calibration_batches=2)
    cfg["adapter"] = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2, "init": "eva", "seed": 0,
                      "trainable_token_indices": [1, 2, 3]}
    cfg["optim"]["lr"] = 1e-3
    r = run_training(cfg)
    assert r["status"] == "completed" and all(x == x for x in r["loss_curve"])
    conf = lorakit.read_adapter_config(r["adapter_dir"])
    assert conf["init_lora_weights"] == "eva" and conf["trainable_token_indices"] == [1, 2, 3]
    from safetensors.torch import load_file

    keys = load_file(f"{r['adapter_dir']}/adapter_model.safetensors")
    assert any(k.endswith("token_adapter.trainable_tokens_delta") for k in keys)
