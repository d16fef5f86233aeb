"""AdapterCallback with a real (tiny) transformers Trainer run: adapter files in each checkpoint, controllers run,
and resuming from a checkpoint reproduces the uninterrupted run's final adapter."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.integrations.hf import AdapterCallback

from .conftest import tiny_llama_model


class DS(torch.utils.data.Dataset):
    def __init__(self, n=32, vocab=40, seq=12):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(5, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(model, out, steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=DS(), callbacks=[AdapterCallback()])


def test_trainer_checkpoints_hold_adapters_and_resume(tmp_path, tiny_lm_dir):
    pytest.importorskip("accelerate")
    seen, grads = [], []

    class Ctl(lorakit.Controller):
        def step(self, step, model, optimizer):  # after optimizer.step(), before zero_grad() (AdaLoRA needs grads)
            seen.append(step)
            grads.append(all(p.grad is not None for _, a in lorakit.adapters(model) for p in a.parameters()))

    from lorakit.methods.lora import LoRA

    orig = LoRA.controller
    LoRA.controller = classmethod(lambda cls, att: Ctl())
    try:
        m1 = lorakit.attach(tiny_llama_model(tiny_lm_dir), {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2,
                                                            "seed": 0})
        _trainer(m1, tmp_path / "a", 4).train()
        assert seen == [0, 1, 2, 3] and all(grads)
        for n in (2, 4):
            assert (tmp_path / "a" / f"checkpoint-{n}" / "adapter_model.safetensors").is_file()
        m2 = lorakit.attach(tiny_llama_model(tiny_lm_dir), {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2,
                                                            "seed": 0})
        import shutil

        shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
        _trainer(m2, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    finally:
        LoRA.controller = orig
    a = lorakit.io.adapter_state(m1)
    b = lorakit.io.adapter_state(m2)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_load_state_dict_on_an_adapted_model(tiny_lm_dir):
    """core fix: the Adapted pre-hook needs with_module=True (Trainer resume calls model.load_state_dict)."""
    base = tiny_llama_model(tiny_lm_dir)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    m = lorakit.attach(base, {"method": "lora", "targets": ["q_proj"], "r": 2})
    m.load_state_dict(m.state_dict())  # own keys
    res = m.load_state_dict(plain, strict=False)  # a plain base checkpoint maps onto base_layer
    assert not res.unexpected_keys


def test_callback_adds_the_adapters_losses_to_the_trainers_loss(tiny_lm_dir):
    """SoRA's L1 on its gate (an extra_loss) reaches the HF Trainer's loss through the callback's hook."""
    from types import SimpleNamespace

    model = tiny_llama_model(tiny_lm_dir)
    lorakit.attach(model, {"method": "sora", "targets": ["q_proj", "v_proj"], "r": 2, "l1": 0.5})
    batch = DS()[0]
    batch = {k: v[None] for k, v in batch.items()}
    model.train()
    plain = model(**batch).loss
    extra = lorakit.extra_loss(model)
    assert extra is not None and float(extra) > 0
    cb = AdapterCallback()
    args = SimpleNamespace(output_dir="/nonexistent")
    cb.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=3), None, model=model, optimizer=None)
    hooked = model(**batch).loss
    assert torch.allclose(hooked, plain + extra)
    with torch.no_grad():  # evaluation is left alone
        assert torch.allclose(model(**batch).loss, plain)
    model.eval()
    assert torch.allclose(model(**batch).loss, plain)
    cb.on_train_end(args, None, None)
    model.train()
    assert torch.allclose(model(**batch).loss, plain)  # the hook is removed at the end of training
