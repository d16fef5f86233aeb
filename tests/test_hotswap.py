"""Hot-swapping LoRA weights under torch.compile (lorakit.prepare_for_hotswap / lorakit.hotswap).

The oracle for a swapped model is the same base with the new adapter loaded normally (eager); a counting dynamo
backend records every compilation, so "no recompilation" is an assertion on a number that does change when the
graph is re-specialised (the control test shows it does without prepare_for_hotswap)."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError

from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


class CountingBackend:
    """A dynamo backend that runs the traced graph eagerly and counts how often it was asked to compile."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(11))


def saved_adapter(tmp_path, tag, seed, targets=TARGETS, **opts):
    """Save a LoRA with random (non-zero) factors; return its directory and the eager logits it gives."""
    m = tiny_llama(seed=0)
    lorakit.attach(m, {"method": "lora", "targets": targets, "seed": seed, **opts})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    d = tmp_path / tag
    lorakit.save_adapter(m, d)
    with torch.no_grad():
        want = m(_ids()).logits
    return d, want


def _loaded(directory):
    m = tiny_llama(seed=0)
    lorakit.load_adapter(m, directory)
    return m


def test_hotswap_under_compile_does_not_recompile(tmp_path):
    d1, want1 = saved_adapter(tmp_path, "a1", 1, r=4, alpha=8)
    d2, want2 = saved_adapter(tmp_path, "a2", 2, r=2, alpha=32)  # smaller rank, other scale
    d3, want3 = saved_adapter(tmp_path, "a3", 3, r=6, alpha=6, rslora=True)  # rsLoRA, another rank
    d4, want4 = saved_adapter(tmp_path, "a4", 4, targets=["q_proj"], r=3, alpha=4)  # fewer modules
    model = _loaded(d1)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    lorakit.prepare_for_hotswap(model, max_rank=6)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)  # padding changes nothing
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        assert torch.allclose(compiled(ids).logits, want1, atol=1e-5)
        compiled(ids)
        n = backend.compiles
        assert n >= 1
        for d, want in ((d2, want2), (d3, want3), (d4, want4), (d1, want1)):
            lorakit.hotswap(compiled, d)  # the compiled wrapper or the model itself: both accepted
            got = compiled(ids).logits
            assert torch.allclose(got, want, atol=1e-5), (d, (got - want).abs().max())
            assert backend.compiles == n, f"hot swap to {d.name} recompiled"
    torch._dynamo.reset()


def test_without_prepare_a_new_scale_recompiles(tmp_path):
    """The control: the counter sees the re-specialisation that prepare_for_hotswap avoids (same rank, other
    alpha: only the Python float scale differs), and the swap is still correct eagerly."""
    d1, _ = saved_adapter(tmp_path, "a1", 1, r=4, alpha=8)
    d2, want2 = saved_adapter(tmp_path, "a2", 2, r=4, alpha=16)
    model = _loaded(d1)
    ids = _ids()
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(ids)
        n = backend.compiles
        lorakit.hotswap(model, d2)
        assert torch.allclose(compiled(ids).logits, want2, atol=1e-5)
        assert backend.compiles > n
    torch._dynamo.reset()


def test_swapped_adapter_saves_as_itself(tmp_path):
    d1, _ = saved_adapter(tmp_path, "a1", 1, r=4, alpha=8)
    d2, want2 = saved_adapter(tmp_path, "a2", 2, r=2, alpha=32, targets=["q_proj", "v_proj"])
    model = _loaded(d1)
    lorakit.prepare_for_hotswap(model, max_rank=8)
    lorakit.hotswap(model, d2)
    lorakit.save_adapter(model, tmp_path / "out")
    again = _loaded(tmp_path / "out")  # unpadded factors at the swapped-in ranks (zeros where it has no module)
    with torch.no_grad():
        assert torch.allclose(again(_ids()).logits, want2, atol=1e-5)
    a = dict(lorakit.adapters(again))["model.layers.0.self_attn.q_proj"]
    assert a.lora_A.weight.shape[0] == 2
    # without prepare_for_hotswap (eager use): a smaller rank goes into the existing tensors, saved unpadded too
    model = _loaded(d1)
    lorakit.hotswap(model, d2)
    with torch.no_grad():
        assert torch.allclose(model(_ids()).logits, want2, atol=1e-5)
    lorakit.save_adapter(model, tmp_path / "out2")
    with torch.no_grad():
        assert torch.allclose(_loaded(tmp_path / "out2")(_ids()).logits, want2, atol=1e-5)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(s1, s2):
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_incompatible_adapters_raise_and_change_nothing(tmp_path):
    d1, _ = saved_adapter(tmp_path, "a1", 1, r=4, alpha=8)
    big, _ = saved_adapter(tmp_path, "big", 2, r=8)
    other, _ = saved_adapter(tmp_path, "other", 3, targets=["q_proj", "k_proj"], r=2)
    biased, _ = saved_adapter(tmp_path, "biased", 4, r=2, lora_bias=True)
    m = tiny_llama(seed=0)
    lorakit.attach(m, {"method": "vera", "targets": TARGETS, "r": 4})
    lorakit.save_adapter(m, tmp_path / "vera")
    model = _loaded(d1)
    lorakit.prepare_for_hotswap(model, max_rank=4)
    scales = [float(a.scale) for _, a in lorakit.adapters(model)]
    snap = _state(model)
    for d, msg in ((big, "rank 8"), (other, "does not hold"), (biased, "lora_bias"),
                   (tmp_path / "vera", "only plain low-rank")):
        with pytest.raises(ConfigError, match=msg):
            lorakit.hotswap(model, d)
        assert _same(snap, _state(model))
        assert scales == [float(a.scale) for _, a in lorakit.adapters(model)]
    with pytest.raises(ConfigError, match="no adapter named"):
        lorakit.hotswap(model, d1, name="nope")
    with pytest.raises(ConfigError, match="above max_rank"):
        lorakit.prepare_for_hotswap(_loaded(big), max_rank=4)
    vm = tiny_llama(seed=0)
    lorakit.attach(vm, {"method": "vera", "targets": TARGETS, "r": 4})
    with pytest.raises(ConfigError, match="cannot be hot-swapped"):
        lorakit.prepare_for_hotswap(vm, max_rank=4)
    with lorakit.merged(model):
        with pytest.raises(ConfigError, match="merged"):
            lorakit.hotswap(model, d1)


def test_hotswap_a_peft_written_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    d1, _ = saved_adapter(tmp_path, "a1", 1, r=4, alpha=8)
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(seed=0), LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                                      rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 7},
                                                      use_rslora=True, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    model = _loaded(d1)
    lorakit.prepare_for_hotswap(model, max_rank=4)
    lorakit.hotswap(model, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(model(_ids()).logits, pm(_ids()).logits, atol=1e-5)
