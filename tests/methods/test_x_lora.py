"""X-LoRA mechanism: one-hot λ = that LoRA alone, two base passes per forward, λ = softmax(c(h)/T) of the base
model's last hidden state, scalings shape, top-k, stats, file round trip, building from LoRA dirs, PEFT parity."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.methods.x_lora import XLoRA, latest_scalings, xlora_from_loras

from conftest import _ids, run, tiny_llama

T = ["q_proj", "v_proj"]


def _xlora(**opts):
    m = tiny_llama()
    lorakit.attach(m, {"method": "x_lora", "targets": T, "r": 2, "num_experts": 3, "seed": 0, **opts})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.experts_A.copy_(torch.randn(a.experts_A.shape, generator=g) * 0.3)
            a.experts_B.copy_(torch.randn(a.experts_B.shape, generator=g) * 0.3)
    return m.eval()


def _owner(m) -> XLoRA:
    return next(a for _, a in lorakit.adapters(m))


def _one_hot(m, j):
    last = _owner(m).xlora_classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[j] = 1.0


def _lora_of(m, j, x):
    """Logits of the tiny Llama with expert j of every module as a plain LoRA (λ = 1)."""
    ref = tiny_llama()
    lorakit.attach(ref, {"method": "lora", "targets": T, "r": 2, "alpha": 16.0})
    src = dict(lorakit.adapters(m))
    with torch.no_grad():
        for p, a in lorakit.adapters(ref):
            a.lora_A.weight.copy_(src[p].experts_A[j])
            a.lora_B.weight.copy_(src[p].experts_B[j])
    return run(ref.eval(), x)


@pytest.mark.parametrize("j", [0, 2])
def test_one_hot_scalings_equal_that_lora(j):
    m, x = _xlora(enable_softmax=False), _ids()
    _one_hot(m, j)
    assert torch.allclose(run(m, x), _lora_of(m, j, x), atol=1e-5)
    assert torch.equal(latest_scalings(m)[..., j], torch.ones(2, 7, 4))


def test_exactly_two_base_passes_and_detach_restores():
    m, x = _xlora(), _ids()
    calls = []
    m.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    run(m, x)
    assert len(calls) == 2
    lorakit.detach(m)
    assert "forward" not in m.__dict__
    calls.clear()
    run(m, x)
    assert len(calls) == 1
    with lorakit.disabled(_xlora()) as m2:  # disabled: the base alone, one pass
        m2.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
        calls.clear()
        run(m2, x)
        assert len(calls) == 1


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_scalings_are_softmax_of_classifier_on_base_hidden_state(layerwise, temp):
    m, x = _xlora(layerwise_scalings=layerwise, softmax_temperature=temp), _ids()
    run(m, x)
    lam = latest_scalings(m)
    assert lam.shape == (2, 7, 4, 3)  # (B, T, L = 2 layers x 2 modules, N)
    base = tiny_llama()
    h = base(x, output_hidden_states=True).hidden_states[-1]  # scaling_pass_value = 0: the base model
    logits = _owner(m).xlora_classifier(h).reshape(2, 7, -1, 3).expand(2, 7, 4, 3)
    assert torch.allclose(lam, torch.softmax(logits / temp, -1), atol=1e-6)
    if not layerwise:
        assert torch.equal(lam[:, :, 0], lam[:, :, 3])


def test_lower_temperature_is_sharper():
    ent = {}
    for temp in (0.25, 4.0):
        m = _xlora(softmax_temperature=temp)
        with torch.no_grad():
            _owner(m).xlora_classifier[-1].weight.mul_(50)
        m.train()
        run(m, _ids())
        ent[temp] = lorakit.adapter_stats(m)["moe_router_entropy"]
    assert ent[0.25] < ent[4.0]


def test_top_k_keeps_the_largest_lambda():
    m, x = _xlora(top_k_lora=1, enable_softmax=False), _ids()
    with torch.no_grad():
        last = _owner(m).xlora_classifier[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.1, 0.7, 0.3]))
    want = _lora_of(m, 1, x)  # λ = (0, 0.7, 0) -> 0.7 · expert 1: compare against scaled B
    for _, a in lorakit.adapters(m):
        with torch.no_grad():
            a.experts_B[1].mul_(1 / 0.7)
    assert torch.allclose(run(m, x), want, atol=1e-5)


def test_stats_and_not_mergeable():
    m = _xlora()
    m.train()
    run(m, _ids())
    st = lorakit.adapter_stats(m)
    assert abs(sum(st[f"moe_load_e{i}"] for i in range(3)) - 1) < 1e-5 and 0 < st["moe_router_entropy"] <= 1
    with pytest.raises(lorakit.MergeError):
        lorakit.merge_and_unload(m)


def test_save_load_round_trip(tmp_path):
    m, x = _xlora(layerwise_scalings=True, top_k_lora=2, enable_softmax_topk=True), _ids()
    out = run(m, x)
    lorakit.save_adapter(m, tmp_path / "x")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "x")
    assert torch.allclose(run(fresh, x), out, atol=1e-6)
    assert lorakit.read_adapter_config(tmp_path / "x")["peft_type"] == "LORAKIT"


def _lora_dirs(tmp_path):
    dirs = []
    for i, r in enumerate((2, 4)):
        m = tiny_llama()
        lorakit.attach(m, {"method": "lora", "targets": T, "r": r, "alpha": 3.0 * (i + 1), "seed": i})
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, a in lorakit.adapters(m):
                a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.3)
        lorakit.save_adapter(m, tmp_path / f"l{i}")
        dirs.append((tmp_path / f"l{i}", run(m.eval(), _ids()).detach()))
    return dirs


def test_from_lora_dirs_one_hot_is_that_lora(tmp_path):
    dirs = _lora_dirs(tmp_path)
    m = xlora_from_loras(tiny_llama(), [d for d, _ in dirs], enable_softmax=False).eval()
    assert all(not p.requires_grad for _, a in lorakit.adapters(m) for p in (a.experts_A, a.experts_B))
    for j, (_, want) in enumerate(dirs):
        _one_hot(m, j)
        assert torch.allclose(run(m, _ids()), want, atol=1e-5)


def test_peft_xlora_parity(tmp_path):
    peft = pytest.importorskip("peft")
    dirs = _lora_dirs(tmp_path)
    m = xlora_from_loras(tiny_llama(), [d for d, _ in dirs], xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0,
                         layerwise_scalings=True, softmax_temperature=0.7).eval()
    base = tiny_llama()
    base.config.use_cache = False
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={str(i): str(d) for i, (d, _) in
                           enumerate(dirs)}, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0,
                           layerwise_scalings=True, softmax_temperature=0.7)
    pm = peft.get_peft_model(base, cfg).eval()
    clf = pm.base_model.internal_xlora_classifier.layers
    with torch.no_grad():
        for ours, theirs in zip(_owner(m).xlora_classifier, clf):
            if isinstance(ours, torch.nn.Linear):
                ours.weight.normal_(0, 0.5)
                theirs.weight.copy_(ours.weight)
                theirs.bias.copy_(ours.bias)
    x = _ids()
    got, want = run(m, x), pm(input_ids=x).logits
    assert torch.allclose(latest_scalings(m), pm.base_model.get_latest_scalings(), atol=1e-6)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, run(tiny_llama(), x), atol=1e-3)  # the experts do contribute
