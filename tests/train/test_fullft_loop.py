"""Full fine-tuning through `lorakit train` (every procedure of issue 17 part 1, exact --resume), its weights file,
the HF Trainer, the arena spec, and the pre-training task."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.train import TrainingInterrupted, run_training

from .conftest import tiny_cfg, tiny_llama_model

PROCS = {"adamw": {}, "galore": {"rank": 4, "update_proj_gap": 2, "scale": 0.25},
         "fira": {"rank": 4, "update_proj_gap": 2, "scale": 0.25}, "lisa": {"layers": 1, "interval": 2},
         "frugal": {"density": 0.25, "update_gap": 2},
         "owlore": {"layers": 1, "interval": 2, "rank": 4, "update_proj_gap": 2, "outlier_m": 5.0},
         "gradnormlorp": {"rank": 4, "update_proj_gap": 2, "scale": 0.25}}


def _full_cfg(tiny_lm_dir, cls_data, out, name, **opts):
    cfg = tiny_cfg(tiny_lm_dir, cls_data, out, steps=6, save_every=2)
    cfg["adapter"] = {"method": "full", "targets": ".*", "keep_original": False}
    cfg["optim"].update(name=name, **opts)
    cfg["train"]["eval_before"] = False
    return cfg


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, step, logs):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", sorted(PROCS))
def test_full_finetuning_trains_and_resumes_bit_exactly(tiny_lm_dir, cls_data, tmp_path, name):
    cfg = _full_cfg(tiny_lm_dir, cls_data, tmp_path / "a", name, **PROCS[name])
    whole = run_training(cfg)
    base = tiny_llama_model(tiny_lm_dir)
    assert whole["trainable_params"] == whole["total_params"] == sum(p.numel() for p in base.parameters())
    cut = dict(cfg, output={"dir": str(tmp_path / "b")})
    with pytest.raises(TrainingInterrupted):
        run_training(cut, callbacks=[StopAt(3)])
    again = run_training(cut, resume=True)
    assert again["loss_curve"] == whole["loss_curve"]  # bit-exact
    lorakit.load_adapter(base, whole["adapter_dir"])
    a = {n: p.detach().clone() for n, p in base.named_parameters()}
    other = lorakit.load_adapter(tiny_llama_model(tiny_lm_dir), again["adapter_dir"])
    assert all(torch.equal(a[n], p) for n, p in other.named_parameters())


def test_full_finetuning_changes_every_parameter_and_its_file_round_trips(tiny_lm_dir, cls_data, tmp_path):
    res = run_training(_full_cfg(tiny_lm_dir, cls_data, tmp_path / "a", "adamw"))
    ad = tmp_path / "a" / "adapter"
    conf = json.loads((ad / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORAKIT" and conf["lorakit"]["method"] == "full"
    from safetensors.torch import load_file

    tensors = load_file(ad / "adapter_model.safetensors")
    base = tiny_llama_model(tiny_lm_dir)
    names = {n.replace(".base_layer", "") for n, _ in base.named_parameters()}
    # every parameter of the model is in the file, under the base model's own names (a weights file)
    assert {k.removeprefix("base_model.model.").replace(".base_layer", "") for k in tensors} == names
    x = torch.randint(5, 30, (2, 7))
    ref = base(input_ids=x).logits
    tuned = lorakit.load_adapter(tiny_llama_model(tiny_lm_dir), ad)
    orig = dict(base.named_parameters())
    for n, p in tuned.named_parameters():
        key = n.replace(".base_layer", "")
        assert not torch.equal(p, orig[key]), f"{n} did not train"
    out = tuned(input_ids=x).logits
    assert not torch.allclose(out, ref)
    merged = lorakit.merge_and_unload(tuned)
    torch.testing.assert_close(merged(input_ids=x).logits, out)
    # another base (other hidden size): refused naming the tensor, the model left as it was
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig.from_pretrained(tiny_lm_dir)
    c.hidden_size, c.intermediate_size = 48, 96
    other = LlamaForCausalLM(c)
    with pytest.raises(AdapterFileError, match="shape"):
        lorakit.load_adapter(other, ad)
    assert not lorakit.attached(other)
    assert res["status"] == "completed"


def test_full_finetuning_with_galore_through_the_hf_trainer(tiny_lm_dir, tmp_path):
    pytest.importorskip("accelerate")
    from .test_procedures import _hf

    m = lorakit.attach(tiny_llama_model(tiny_lm_dir), {"method": "full", "targets": ".*", "keep_original": False})
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer, opt = _hf(m, tmp_path / "hf", 3, "galore", rank=4, update_proj_gap=2)
    trainer.train()
    q = m.model.layers[0].self_attn.q_proj.base_layer.weight  # 32x32: right projector, moments (32, 4)
    assert opt.state[q]["exp_avg"].shape == (32, 4)
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_arena_spec_can_select_the_procedures():
    from lorakit.train.config import resolve

    for name, opts in PROCS.items():
        extra = [f"optim.name={name}"] + [f"optim.{k}={v}" for k, v in opts.items()]
        cfg = resolve(base={"adapter": {"method": "full", "targets": ".*"}}, overrides=extra)
        assert cfg.optim.procedure().name == name
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="loraplus.*weight"):
        resolve(base={"adapter": {"method": "full", "targets": ".*"}}, overrides=["optim.name=loraplus"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_pretraining_task_runs_from_scratch(tmp_path, method):
    from lorakit.train.config import resolve

    cfg = resolve("shakespeare-pretrain-full", method=None if method == "full" else method, overrides=[
        "train.steps=2", "data.max_length=32", "data.batch_size=2", "data.train_size=8",
        "data.eval_size=2", "data.eval_batch_size=2", f"output.dir={tmp_path}", "train.log_every=1"]
        + (["adapter.r=4"] if method == "lora" else []))
    res = run_training(cfg)
    before, after = res["metrics_before"], res["metrics_after"]
    import math

    assert set(after) >= {"loss", "perplexity"} and math.isclose(after["perplexity"], math.exp(after["loss"]))
    assert before["perplexity"] > 1000  # random init over a 49152-token vocabulary
    assert after["loss"] < before["loss"]
    assert res["trainable_params"] == res["total_params"] if method == "full" else res["trainable_params"] < 10 ** 6
