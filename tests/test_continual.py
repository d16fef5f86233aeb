"""I-LoRA (arXiv:2402.18865) and its baselines: the EMA rule, reservoir sampling, the consistency loss (formulas written
here), forgetting, and a two-task run on a tiny model with any method as the adapter."""
import random

import pytest
import torch

import lorakit
from lorakit import continual as C
from train.conftest import cls_data, sft_data, tiny_lm_dir, tiny_llama_model  # noqa: F401


def test_ema_rule():
    assert C.ema_coefficient(1, 0.25) == 0.25 and C.ema_coefficient(1, 0.9) == 0.5  # min(1 - 1/(t+1), cap)
    s, f = [torch.ones(3)], [torch.zeros(3)]
    C.ema_update(s, f, 0.25)
    assert torch.allclose(s[0], torch.full((3,), 0.25))
    C.ema_update(s, [torch.full((3,), 7.0)], 0.0)  # cap 0: slow = fast
    assert torch.equal(s[0], torch.full((3,), 7.0))
    C.ema_update(s, [torch.zeros(3)], 1.0)  # a = 1: never moves
    assert torch.equal(s[0], torch.full((3,), 7.0))


def test_reservoir_keeps_each_item_with_equal_probability():
    counts = [0] * 20
    for seed in range(2000):
        b = C.ReservoirBuffer(5, seed=seed)
        for i in range(20):
            b.add(i)
        assert len(b) == 5
        for i in b.items:
            counts[i] += 1
    expected = 2000 * 5 / 20
    assert all(abs(c - expected) < 0.15 * expected for c in counts), counts


def test_consistency_loss():
    hf = [torch.tensor([1.0, 2.0, 3.0])]
    assert float(C.consistency_loss(hf, [torch.tensor([0.0, 2.0, -1.0])])) == 0.0  # h_f >= h_s everywhere
    hs = [torch.tensor([2.0, 0.0, 5.0])]
    ref = ((1.0 - 2.0) ** 2 + 0 + (3.0 - 5.0) ** 2) / 3
    assert abs(float(C.consistency_loss(hf, hs)) - ref) < 1e-6


def test_forgetting():
    R = [[0.9, 0.1], [0.6, 0.8]]
    assert abs(C.forgetting(R) - 0.3) < 1e-9 and C.forgetting([[0.5]]) == 0.0


@pytest.mark.parametrize("mode,method", [("ilora", "lora"), ("replay", "dora"), ("sequential", "lora")])
def test_two_task_run(mode, method, tiny_lm_dir, cls_data, sft_data):
    from transformers import AutoTokenizer

    from lorakit.tasks import get_task
    from lorakit.train.config import DataSection

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = tiny_llama_model(tiny_lm_dir)
    tasks = [get_task("classify-lm", DataSection(task="classify-lm", path=str(cls_data), max_length=32,
                                                 eval_size=8)),
             get_task("sft", DataSection(task="sft", path=str(sft_data), max_length=32, eval_size=8))]
    cfg = C.ContinualConfig(mode=mode, steps_per_task=3, batch_size=4, lr=1e-2, buffer_size=10, eval_size=8)
    res = C.run_continual(model, tok, tasks, {"method": method, "targets": "all-linear", "r": 2}, cfg)
    assert len(res["R"]) == 2 and all(len(r) == 2 for r in res["R"]) and res["steps"] == 6
    names = set(lorakit.attached(model))
    assert names == ({"fast", "slow"} if mode == "ilora" else {"fast"})
    if mode == "ilora":  # the slow adapter followed the fast one, but lags it
        fast = torch.cat([p.flatten() for p in C._params(model, "fast")])
        slow = torch.cat([p.flatten() for p in C._params(model, "slow")])
        assert not torch.equal(fast, slow) and (slow - fast).norm() < fast.norm()
    with pytest.raises(lorakit.LorakitError, match="mode"):
        C.run_continual(model, tok, tasks, {"method": "lora"}, C.ContinualConfig(mode="nope"))
