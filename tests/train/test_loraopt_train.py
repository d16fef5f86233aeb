"""ALLoRA, LoRA-Pro, LoRA-GGPO and Flexora in the trainer (two tasks), with exact --resume (Flexora: from the middle
of its search and after its selection), through `lorakit train`, through the HF Trainer (AdapterCallback +
create_optimizer; Flexora's validation batches) and as an arena axis."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import TrainingInterrupted, run_training

from .conftest import tiny_cfg, tiny_llama_model
from .test_procedures import _hf

OPTS = {"allora": {}, "lorapro": {"log_every": 1}, "ggpo": {"rho": 0.1}, "mgpo": {"rho": 0.1},
        "flexora": {"search_fraction": 0.5, "keep": 0.5, "gate_lr": 0.05}}


def _cfg(model_dir, data, out, name, task="classify-lm", **train):
    cfg = tiny_cfg(model_dir, data, out, task=task, **train)
    cfg["optim"].update(name=name, **OPTS[name])
    if name == "allora":  # dropout-free, scaling-free
        cfg["adapter"].update(alpha=cfg["adapter"]["r"], dropout=0.0)
    return cfg


class StopAt:
    def __init__(self, at):
        self.at = at

    def on_step(self, step, logs):
        if step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", sorted(OPTS))
def test_trains_and_resumes_exactly(tiny_lm_dir, cls_data, tmp_path, name):
    base = _cfg(tiny_lm_dir, cls_data, tmp_path / "full", name, steps=6, save_every=3, eval_before=False)
    full = run_training(base)
    assert all(torch.isfinite(torch.tensor(full["loss_curve"])))
    cut = dict(base, output={"dir": str(tmp_path / "cut")})
    stops = [2, 5] if name == "flexora" else [4]  # flexora: inside the search (3 steps), then after the selection
    for at in stops:
        with pytest.raises(TrainingInterrupted):
            run_training(cut, resume=at != stops[0], callbacks=[StopAt(at)])
    resumed = run_training(cut, resume=True)
    assert resumed["loss_curve"] == full["loss_curve"]  # bit-exact
    a = lorakit.io._read_tensors(tmp_path / "full" / "adapter")
    b = lorakit.io._read_tensors(tmp_path / "cut" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if r.get("event") == "train"]
    if name == "lorapro":  # the equivalent-gradient error is logged, and beats plain LoRA's
        assert all(0 <= r["procedure/equiv_grad_rel_error"] < r["procedure/lora_grad_rel_error"] for r in train)
    if name == "flexora":
        start = next(r for r in logs if r.get("event") == "start")
        n = start["train_rows"] + start["validation_rows"]  # held out of the training rows, not the eval split
        assert start["validation_rows"] == round(0.1 * n)
        assert [r["procedure/selected_layers"] for r in train] == [0, 0, 1, 1, 1, 1]
        zero = [k for k, v in a.items() if "lora_B" in k and not v.any()]
        assert zero and all(k.startswith(("base_model.model.model.layers.0", "base_model.model.model.layers.1"))
                            for k in zero)  # one of the two layers holds zero updates


@pytest.mark.parametrize("name", sorted(OPTS))
def test_second_task_sft(tiny_lm_dir, sft_data, tmp_path, name):
    r = run_training(_cfg(tiny_lm_dir, sft_data, tmp_path / name, name, task="sft", steps=4))
    assert r["status"] == "completed" and len(r["loss_curve"]) == 4


def test_lorakit_train_cli_logs_the_lorapro_error(tiny_lm_dir, cls_data, tmp_path):
    from lorakit import cli

    out = tmp_path / "cli"
    args = ["train", f"model.name={tiny_lm_dir}", "data.task=classify-lm", f"data.path={cls_data}",
            "data.max_length=32", "data.eval_size=16", "adapter.targets=all-linear", "adapter.r=4", "train.steps=2",
            f"output.dir={out}", "optim.name=lorapro", "optim.log_every=1", "train.log_every=1"]
    assert cli.main(args) == 0
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("procedure/equiv_grad_rel_error" in r for r in rec)
    assert cli.main(args[:-3] + ["optim.name=flexora", "optim.keep=1.5"]) == 2  # bad option: a config error


@pytest.mark.parametrize("name", sorted(OPTS))
def test_hf_trainer(tiny_lm_dir, tmp_path, name):
    pytest.importorskip("accelerate")
    from lorakit.integrations.hf import create_optimizer, procedure_of

    m = lorakit.attach(tiny_llama_model(tiny_lm_dir), {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2,
                                                       "alpha": 2, "seed": 0})
    opts = dict(OPTS[name])
    if name == "flexora":
        g = torch.Generator().manual_seed(5)
        x = torch.randint(5, 40, (4, 12), generator=g)
        opts["validation"] = [{"input_ids": x, "labels": x}]
        with pytest.raises(ConfigError, match="validation="):
            create_optimizer(m, None, "flexora")
    trainer, opt = _hf(m, tmp_path / name, 4, name, **opts)
    trainer.train()
    proc = procedure_of(opt)
    assert all(p.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n and p.requires_grad)
    if name == "lorapro":
        assert any("procedure/equiv_grad_rel_error" in r for r in trainer.state.log_history)
    if name == "flexora":
        assert proc.selected is not None and len(proc.selected) == 1


def test_arena_spec_selects_the_procedures():
    from lorakit.arena.worker import run_config

    spec = {"task": "sentiment-minilm", "method": "lora", "seed": 0, "budget": "smoke"}
    for name in ("lorapro", "ggpo", "mgpo", "flexora"):
        assert run_config({**spec, "extra": [f"optim.name={name}"]}).optim.name == name
    cfg = run_config({**spec, "extra": ["optim.name=allora", "adapter.alpha=8", "adapter.r=8"]})
    assert cfg.optim.name == "allora"
    with pytest.raises(ConfigError, match="scaling-free"):
        run_config({**spec, "extra": ["optim.name=allora", "adapter.alpha=16", "adapter.r=8"]})
    with pytest.raises(ConfigError, match="method 'vera'"):
        run_config({**spec, "method": "vera", "extra": ["optim.name=lorapro"]})
