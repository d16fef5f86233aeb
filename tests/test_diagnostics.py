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


# ---- the reference is the model as loaded (not the adapted model's current base) ----------------------------------
TEXTS = ["to be or not to be that is the question " * 20]


def _spike(n, seed):
    """A rank-1 update far from every singular direction of a random matrix: 50 u v^T (a constructed intruder)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(n, generator=g), dim=0)
    return 50 * torch.outer(u, v)


def test_a_residual_init_is_measured_against_the_weights_it_replaced(caplog):
    import copy

    from lorakit.inject import hosts

    m = tiny_llama()
    as_loaded = copy.deepcopy(m)
    lorakit.attach(m, {"method": "pissa", "targets": ["q_proj", "v_proj"], "r": 2})
    for path, h in hosts(m):  # PiSSA wrote W - B0 A0 into the base ...
        W = as_loaded.get_submodule(path).weight
        assert not torch.allclose(h.base_layer.weight, W)
        a = h.adapters["default"]  # ... and the reference is W itself, with or without the loaded copy
        assert torch.equal(Dg.reference_matrix(h, a, path), W) and torch.equal(Dg.reference_matrix(h, a, path, as_loaded), W)
    # untrained, the adapted model is the loaded one: no intruders, no forgetting
    assert set(Dg.intruder_report(m).values()) == {0} and set(Dg.intruder_report(m, base=as_loaded).values()) == {0}
    r = Dg.forgetting_perplexity(m, _Tok(), seq=32, chunks=3, texts=TEXTS, base=as_loaded)
    assert r["ratio"] == pytest.approx(1.0, abs=1e-4) and r["reference"] == "base model"
    # with adapters off the "base" is W - B0 A0, another model: the ratio is off, and a warning says so
    with caplog.at_level(logging.WARNING, logger="lorakit.diagnostics"):
        off = Dg.forgetting_perplexity(m, _Tok(), seq=32, chunks=3, texts=TEXTS)
    assert off["reference"] == "adapters off" and off["ratio"] != pytest.approx(1.0, abs=1e-3)
    assert "not the base model" in caplog.text
    # "trained" factors: the count is against the loaded W, of the weight the layer really applies (read off its
    # forward on the identity, independently of delta_weight)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_A.weight.normal_(std=3.0)
            a.lora_B.weight.normal_(std=3.0)
    rep = Dg.intruder_report(m, base=as_loaded)
    for path, h in hosts(m):
        with torch.no_grad():
            W_applied = h(torch.eye(32)).t()
        expect = len(Dg.find_intruders(as_loaded.get_submodule(path).weight, W_applied)[0])
        assert rep[path] == expect == Dg.intruder_report(m)[path]
    assert sum(rep.values()) > 0


def test_full_fine_tuning_is_measured_only_against_the_loaded_model(caplog):
    import copy

    m = tiny_llama()
    as_loaded = copy.deepcopy(m)
    lorakit.attach(m, {"method": "full", "targets": ["q_proj"], "rest": False})
    q0 = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():  # "training": the weight itself changes in place
        m.get_submodule(q0).weight.add_(_spike(32, 2))
    rep = Dg.intruder_report(m, base=as_loaded)
    W0 = as_loaded.get_submodule(q0).weight
    assert rep[q0] == len(Dg.find_intruders(W0, W0 + _spike(32, 2))[0]) > 0
    assert rep["model.layers.1.self_attn.q_proj"] == 0
    assert Dg.intruder_report(m) == {}  # no reference of its own (keep_original is the detach copy): not measured
    r = Dg.forgetting_perplexity(m, _Tok(), seq=32, chunks=3, texts=TEXTS, base=as_loaded)
    ref = Dg.forgetting_perplexity(as_loaded, _Tok(), seq=32, chunks=3, texts=TEXTS)  # nothing attached: itself
    assert r["base_ppl"] == pytest.approx(ref["adapted_ppl"]) and abs(r["ratio"] - 1.0) > 1e-4
    with caplog.at_level(logging.WARNING, logger="lorakit.diagnostics"):
        off = Dg.forgetting_perplexity(m, _Tok(), seq=32, chunks=3, texts=TEXTS)
    assert off["ratio"] == pytest.approx(1.0) and "trains the base weights" in caplog.text  # the wrong answer, flagged


def test_a_routed_mixture_has_no_intruder_count_rather_than_zero():
    m = tiny_llama()
    lorakit.attach(m, {"method": "mola", "targets": ["q_proj", "v_proj"], "r": 2, "num_experts": 3, "top_k": 2})
    assert Dg.intruder_report(m) == {}
    cb = Dg.IntruderCallback(every=1)
    cb.on_attach(m)
    logs = {}
    cb.on_step(1, logs)
    assert cb.history[-1][1] is None and "intruders" not in logs


def test_intruder_callback_loads_its_reference_once(tiny_lm_dir, cls_data, tmp_path):
    from lorakit.train.loop import run_training

    from train.conftest import tiny_llama_model

    calls = []

    def as_loaded():
        calls.append(1)
        return tiny_llama_model(tiny_lm_dir)

    cfg = tiny_cfg(tiny_lm_dir, cls_data, tmp_path / "d", steps=4)
    cfg["adapter"] = {"method": "pissa", "targets": "all-linear", "r": 2}
    cb = Dg.IntruderCallback(every=2, base=as_loaded)
    run_training(cfg, callbacks=[cb])
    assert len(calls) == 1 and [s for s, _, _ in cb.history][:2] == [2, 4]
    assert all(isinstance(n, int) for _, n, _ in cb.history)


@pytest.mark.parametrize("method", ["full", "pissa"])
def test_arena_diagnostics_measure_against_a_second_copy_as_loaded(method, tiny_lm_dir, cls_data, tmp_path):
    """The arena's per-run diagnostics (worker._Diagnostics): full fine-tuning and a residual init, whose "adapters
    off" model is not the loaded one, get an intruder count and a forgetting ratio against a second loaded copy."""
    from lorakit.arena.worker import DIAGNOSTICS_VERSION, _Diagnostics
    from lorakit.train.config import resolve
    from lorakit.train.loop import run_training

    cfg = resolve(base=tiny_cfg(tiny_lm_dir, cls_data, tmp_path / method, steps=4))
    cfg.adapter = {"method": method, "targets": ["q_proj", "v_proj"], "r": 2} if method == "pissa" else \
        {"method": "full", "targets": ["q_proj", "v_proj"], "rest": False}
    cfg.optim.lr = 5e-2
    res = run_training(cfg, callbacks=[_Diagnostics(cfg)])
    assert res["diagnostics_version"] == DIAGNOSTICS_VERSION and "diagnostics_error" not in res
    assert isinstance(res["intruders"], int)  # full fine-tuning counted, not skipped
    f = res["forgetting"]
    if "error" in f:
        pytest.skip(f"the general-text asset is not cached here: {f['error']}")
    assert f["reference"] == "base model" and f["ratio"] != 1.0  # adapters off would give exactly 1 for full
