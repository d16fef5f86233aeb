"""Intruder dimensions (detector on a constructed intruder, PEFT parity of the mitigation), forgetting perplexity and
the safety-drift callback with a keyword refusal stand-in on canned strings."""
import logging

import pytest
import torch

import lorakit
from lorakit import diagnostics as Dg
from conftest import tiny_llama
from train.conftest import cls_data, tiny_cfg, tiny_lm_dir  # noqa: F401


def test_constructed_intruder_is_found_and_zero_update_has_none():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(64, 64, generator=g) / 8
    assert Dg.find_intruders(W0, W0)[0] == []
    u = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    idx, cos = Dg.find_intruders(W0, W0 + 50 * torch.outer(u, v))
    assert 0 in idx and float(cos[0]) < 0.5
    idx2, _ = Dg.find_intruders(W0, W0 - 50 * torch.outer(u, v))  # the sign of a singular vector does not matter
    assert idx2 == idx


def _lora_with_intruders(seed=0):
    m = tiny_llama()
    torch.manual_seed(seed)
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2, "alpha": 4})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_A.weight.normal_(std=3.0)
            a.lora_B.weight.normal_(std=3.0)
    return m


def test_reduce_intruders_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    m = _lora_with_intruders()
    rep = Dg.intruder_report(m)
    assert sum(rep.values()) > 0
    lorakit.save_adapter(m, tmp_path / "ad")
    counts = Dg.reduce_intruders(m, lam=0.75)
    assert counts == rep
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ad"))
    reduce_intruder_dimension(pm, mitigation_lambda=0.75, logging_sink=None)
    mine = dict(lorakit.adapters(m, "intruder_reduced"))
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_B") and "intruder_reduced" in getattr(mod, "lora_B", {}):
            path = name.replace("base_model.model.", "")
            a = mine[path]
            ref = mod.get_delta_weight("intruder_reduced")
            assert torch.allclose(a.delta_weight(), ref, atol=1e-4), path
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.allclose(m(x).logits, pm(x).logits, atol=1e-4)


def test_lambda_one_keeps_the_update():
    m = _lora_with_intruders(1)
    before = {p: a.delta_weight().clone() for p, a in lorakit.adapters(m, "default")}
    Dg.reduce_intruders(m, lam=1.0)
    for p, a in lorakit.adapters(m, "intruder_reduced"):
        assert torch.allclose(a.delta_weight(), before[p], atol=1e-4)
    with pytest.raises(lorakit.LorakitError, match="lam"):
        Dg.reduce_intruders(m, lam=1.5)


class _Tok:
    def __call__(self, text, return_tensors=None):
        return type("E", (), {"input_ids": torch.tensor([[3 + (ord(c) % 60) for c in text]])})()


def test_forgetting_perplexity_ratio():
    m = tiny_llama()
    lorakit.attach(m, {"method": "lora", "targets": "all-linear", "r": 2})
    texts = ["to be or not to be that is the question " * 20]
    r = Dg.forgetting_perplexity(m, _Tok(), seq=32, chunks=3, texts=texts)
    assert r["ratio"] == pytest.approx(1.0, abs=1e-6)  # B = 0: the base model
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_(std=2.0)
    r2 = Dg.forgetting_perplexity(m, _Tok(), seq=32, chunks=3, texts=texts)
    assert r2["base_ppl"] == pytest.approx(r["base_ppl"]) and r2["ratio"] != pytest.approx(1.0)


def test_keyword_refusal_is_deterministic():
    assert Dg.keyword_refusal("I'm sorry, but I can't help with that.")
    assert Dg.keyword_refusal("As an AI, I must decline.")
    assert not Dg.keyword_refusal("Sure! Here is a recipe for bread.")


def _respond(model, prompts):
    """Canned stand-in: the base model refuses, any active adapter complies."""
    from lorakit.inject import hosts

    active = any(h.active for _, h in hosts(model))
    return ["Sure, here it is." if active else "I'm sorry, I can't help with that." for _ in prompts]


def test_safety_drift_callback_warns_and_stops(tiny_lm_dir, cls_data, tmp_path, caplog):
    from lorakit.train.loop import run_training

    cb = Dg.SafetyDriftCallback(prompts=["p1", "p2"], respond=_respond, every=2, threshold=0.5)
    with caplog.at_level(logging.WARNING, logger="lorakit.diagnostics"):
        run_training(tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "a", steps=4), callbacks=[cb])
    assert cb.base_rate == 1.0 and [s for s, _ in cb.history] == [2, 4] and cb.history[0][1] == 0.0
    assert "refusal rate fell" in caplog.text
    stop = Dg.SafetyDriftCallback(prompts=["p"], respond=_respond, every=1, threshold=0.5, action="stop")
    with pytest.raises(Dg.SafetyDriftError, match="training stopped"):
        run_training(tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "b", steps=4), callbacks=[stop])
    with pytest.raises(lorakit.LorakitError, match="prompt set"):
        Dg.SafetyDriftCallback(prompts=[], respond=_respond)


def test_intruder_callback_logs_during_training(tiny_lm_dir, cls_data, tmp_path):
    from lorakit.train.loop import run_training

    cb = Dg.IntruderCallback(every=2)
    res = run_training(tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "c", steps=4), callbacks=[cb])
    assert [s for s, _, _ in cb.history][:2] == [2, 4] and "intruders" in res
    assert all(isinstance(n, int) for _, n, _ in cb.history)
