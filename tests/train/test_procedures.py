"""Procedures in the trainer and the HF Trainer: adamw gives exactly the loss curve of the trainer's original group
construction, `lorakit train optim.name=loraplus` trains with the LoRA+ rates, a procedure's hooks run and its state
is checkpointed (exact resume), and LoRA+ trains through the HF Trainer with AdapterCallback."""
from __future__ import annotations

import shutil

import pytest
import torch

import lorakit
from lorakit.core import ModulesToSave
from lorakit.errors import ConfigError
from lorakit.procedures import PROCEDURES, Procedure, register_procedure
from lorakit.procedures.loraplus import LoRAPlus
from lorakit.train import TrainingInterrupted, run_training

from .conftest import tiny_cfg, tiny_llama_model


@pytest.fixture
def legacy(monkeypatch):
    """The trainer's parameter groups as they were written before procedures existed (copied from the old loop)."""
    import lorakit.procedures.base as base

    @register_procedure("test_legacy")
    class Legacy(Procedure):
        model = None

        def build_optimizer(self, params):
            hp, model = self.hp, Legacy.model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            head = {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.copies.parameters()}
            head_lr = hp.trainable_lr if hp.trainable_lr is not None else hp.lr
            groups = [{"params": [p for n, p in named if p.ndim >= 2 and id(p) not in head],
                       "weight_decay": hp.weight_decay},
                      {"params": [p for n, p in named if p.ndim < 2 and id(p) not in head], "weight_decay": 0.0},
                      {"params": [p for n, p in named if id(p) in head], "weight_decay": hp.weight_decay,
                       "lr": head_lr}]
            return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)

    orig = base.trainable_parameters

    def spy(model):  # hand the legacy builder the model (a real procedure needs only its TrainParams)
        Legacy.model = model
        return orig(model)

    monkeypatch.setattr(base, "trainable_parameters", spy)
    yield "test_legacy"
    PROCEDURES.pop("test_legacy", None)


def _cfg(tiny_bert_dir, cls_data, out, name, **opts):
    cfg = tiny_cfg(tiny_bert_dir, cls_data, out, task="classify-encoder", steps=4, grad_accum=2)
    cfg["adapter"].update(method="dora", bias="lora_only")  # magnitudes, biases and the head: every group kind
    cfg["optim"].update(name=name, weight_decay=0.1, trainable_lr=3e-3, **opts)
    return cfg


def test_adamw_is_the_original_trainer_bit_for_bit_and_loraplus_ratio_1_too(tiny_bert_dir, cls_data, tmp_path,
                                                                             legacy):
    ref = run_training(_cfg(tiny_bert_dir, cls_data, tmp_path / "legacy", legacy))["loss_curve"]
    assert run_training(_cfg(tiny_bert_dir, cls_data, tmp_path / "adamw", "adamw"))["loss_curve"] == ref
    assert run_training(_cfg(tiny_bert_dir, cls_data, tmp_path / "lp1", "loraplus", ratio=1))["loss_curve"] == ref
    lp = run_training(_cfg(tiny_bert_dir, cls_data, tmp_path / "lp16", "loraplus"))["loss_curve"]
    assert lp[0] == ref[0] and lp != ref  # same start; the B side moves 16x faster afterwards


def test_lorakit_train_optim_name_loraplus(tiny_lm_dir, cls_data, tmp_path):
    from lorakit import cli
    from lorakit.train import resolve
    from lorakit.train.checkpoint import STATE_NAME

    out = tmp_path / "cli"
    args = ["train", f"model.name={tiny_lm_dir}", "data.task=classify-lm", f"data.path={cls_data}",
            "data.max_length=32", "data.eval_size=16", "adapter.targets=all-linear", "adapter.r=4", "optim.lr=0.01",
            "train.steps=3", "train.save_every=3", f"output.dir={out}", "optim.name=loraplus"]
    assert cli.main(args) == 0
    cfg = resolve(out / "config.yaml")
    assert cfg.optim.name == "loraplus" and cfg.optim.options["ratio"] == 16.0  # the paper default, written out
    st = torch.load(out / "checkpoints" / "step-000003" / STATE_NAME, weights_only=True)
    rates = {g["name"]: g["initial_lr"] for g in st["optimizer"]["param_groups"]}
    assert rates == {"base": 0.01, "fast": 0.16}
    assert st["procedure"] == {"name": "loraplus", "options": cfg.optim.options, "state": {}}
    assert cli.main([*args[:-1], "optim.name=loraplus", "optim.ratoi=2"]) == 2  # a typo is a config error


@pytest.fixture
def halving():
    """A procedure with state: gradients scaled by a factor that halves after every step (exact resume needs the
    factor back from the checkpoint); it records its hook calls."""

    @register_procedure("test_halving")
    class Halving(LoRAPlus):
        calls: list = []

        def __init__(self, cfg=None, hp=None):
            super().__init__(cfg, hp)
            self.factor = 1.0

        def before_step(self, step, model, optimizer):
            Halving.calls.append(("before", step))
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.mul_(self.factor)

        def after_step(self, step, model, optimizer):
            Halving.calls.append(("after", step))
            self.factor *= 0.5

        def state_dict(self):
            return {"factor": self.factor}

        def load_state_dict(self, state):
            self.factor = state["factor"]

    yield Halving
    PROCEDURES.pop("test_halving", None)


def test_a_procedures_hooks_run_and_its_state_resumes_exactly(tiny_bert_dir, cls_data, tmp_path, halving):
    # (plain loraplus resume: tests/train/test_loop.py::test_resume_repeats_the_uninterrupted_loss_curve_exactly)
    base = tiny_cfg(tiny_bert_dir, cls_data, tmp_path / "full", task="classify-encoder", steps=6, save_every=2)
    base["optim"].update(name="test_halving", ratio=4)
    full = run_training(base)
    assert halving.calls == [(w, s) for s in range(6) for w in ("before", "after")]

    class StopAt:
        def on_step(self, step, logs):
            if step == 3:
                raise KeyboardInterrupt

    cut = dict(base, output={"dir": str(tmp_path / "cut")})
    with pytest.raises(TrainingInterrupted):
        run_training(cut, callbacks=[StopAt()])
    assert run_training(cut, resume=True)["loss_curve"] == full["loss_curve"]  # bit-exact
    other = dict(cut, optim={**cut["optim"], "ratio": 8})
    with pytest.raises(ConfigError, match="resume with the same procedure and options"):
        run_training(other, resume=True)


# ------------------------------------------------------------------------------------------------- HF Trainer
class DS(torch.utils.data.Dataset):
    def __init__(self, n=32, vocab=40, seq=12):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(5, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _hf(model, out, steps, procedure, **opts):
    from transformers import Trainer, TrainingArguments

    from lorakit.integrations.hf import AdapterCallback, create_optimizer

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant")
    opt = create_optimizer(model, args, procedure, **opts)
    return Trainer(model=model, args=args, train_dataset=DS(), optimizers=(opt, None),
                   callbacks=[AdapterCallback()]), opt


def _lora(tiny_lm_dir):
    return lorakit.attach(tiny_llama_model(tiny_lm_dir), {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2,
                                                          "seed": 0})


def test_loraplus_trains_through_the_hf_trainer(tiny_lm_dir, tmp_path, halving):
    pytest.importorskip("accelerate")
    from lorakit.integrations.hf import create_optimizer, procedure_of

    m = _lora(tiny_lm_dir)
    trainer, opt = _hf(m, tmp_path / "lp", 4, "loraplus", ratio=4)
    assert procedure_of(opt).cfg.ratio == 4
    trainer.train()
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert len(rates) == len(named) == 8
    assert all(rates[id(p)] == (4e-2 if "lora_B" in n else 1e-2) for n, p in named)
    assert all(p.abs().sum() > 0 for n, p in named if "lora_B" in n)  # B trained (from zero)
    with pytest.raises(ConfigError, match="method 'vera'"):
        create_optimizer(lorakit.attach(tiny_llama_model(tiny_lm_dir), {"method": "vera", "targets": ["q_proj"],
                                                                        "r": 2}), None, "loraplus")
    with pytest.raises(ConfigError, match=r"create_optimizer.ratoi"):
        create_optimizer(m, None, "loraplus", ratoi=2)


def test_hf_callback_runs_the_procedures_hooks_and_checkpoints_its_state(tiny_lm_dir, tmp_path, halving):
    pytest.importorskip("accelerate")
    m1 = _lora(tiny_lm_dir)
    _hf(m1, tmp_path / "a", 4, "test_halving", ratio=4)[0].train()
    assert halving.calls == [(w, s) for s in range(4) for w in ("before", "after")]
    st = torch.load(tmp_path / "a" / "checkpoint-2" / "lorakit_state.pt", weights_only=True)
    assert st["procedure"] == {"factor": 0.25}
    m2 = _lora(tiny_lm_dir)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    halving.calls.clear()
    trainer, _ = _hf(m2, tmp_path / "b", 4, "test_halving", ratio=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert halving.calls == [(w, s) for s in (2, 3) for w in ("before", "after")]
    a, b = lorakit.io.adapter_state(m1), lorakit.io.adapter_state(m2)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the factor came back: same final adapter
