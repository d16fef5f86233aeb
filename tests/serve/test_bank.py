import copy

import pytest
import torch

from helpers import load_base, make_adapter, make_base, merged_model
from lorakit.errors import AdapterFileError
from lorakit.serve.bank import install, read_served


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    base = load_base(make_base(d / "base"))
    ads = {
        "lo4": make_adapter(base, d / "lo4", "lora", r=4, seed=1),
        "lo8": make_adapter(base, d / "lo8", "lora", r=8, seed=2, rslora=True),
        "do2": make_adapter(base, d / "do2", "dora", r=2, seed=3),
        "pi3": make_adapter(base, d / "pi3", "pissa", r=3, seed=4),
        "qv": make_adapter(base, d / "qv", "lora", r=4, seed=5, targets=["q_proj", "v_proj"]),
    }
    return base, ads


def test_mixed_batch_equals_merged(setup):
    base, ads = setup
    served = copy.deepcopy(base)
    bank = install(served)
    for n, p in ads.items():
        bank.add(read_served(bank, p, n))
    ids = torch.randint(3, 250, (7, 6), generator=torch.Generator().manual_seed(0))
    names = ["lo4", None, "do2", "pi3", "lo8", "qv", "lo4"]
    bank.set_adapters(names)
    with torch.no_grad():
        out = served(ids).logits
        for i, n in enumerate(names):
            ref_m = base if n is None else merged_model(base, ads[n])
            ref = ref_m(ids[i:i + 1]).logits[0]
            torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=1e-4, msg=f"row {i} ({n})")
    # bank layout: one bucket per rank, no padding (pissa serves rank 2r = 6 on the original base)
    lay = bank.layers["model.layers.0.self_attn.q_proj"]
    assert sorted(lay.A) == [2, 4, 6, 8]
    assert len(bank.layouts) == 2  # q/v layers (qv adapter present) vs the others


def test_remove_and_reuse_slot(setup):
    base, ads = setup
    served = copy.deepcopy(base)
    bank = install(served)
    for n in ("lo4", "do2"):
        bank.add(read_served(bank, ads[n], n))
    bank.remove("lo4")
    bank.add(read_served(bank, ads["lo8"], "lo8"))
    ids = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(1))
    bank.set_adapters(["lo8", "do2"])
    with torch.no_grad():
        out = served(ids).logits
        torch.testing.assert_close(out[0], merged_model(base, ads["lo8"])(ids[:1]).logits[0], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(out[1], merged_model(base, ads["do2"])(ids[1:]).logits[0], atol=2e-4, rtol=1e-4)
        bank.set_ids(None)
        torch.testing.assert_close(served(ids).logits, base(ids).logits)


def test_refusals(setup, tmp_path):
    base, ads = setup
    bank = install(copy.deepcopy(base))
    with pytest.raises(AdapterFileError, match="not found"):
        read_served(bank, tmp_path / "nope", "x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((ads["lo4"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="safetensors"):
        read_served(bank, bad, "bad")
    other = make_adapter(load_base(make_base(tmp_path / "b2", hidden=48)), tmp_path / "other", "lora", r=2)
    with pytest.raises(AdapterFileError, match="another base"):
        read_served(bank, other, "other")


def test_method_without_lowrank_is_refused(setup, tmp_path):
    """A registered method whose lowrank() is None is refused with an error naming it."""
    from dataclasses import dataclass

    import lorakit
    from lorakit.core import REGISTRY, Adapter, Factor, register

    @register("_served_gate_test", family="test", paper="none")
    class Gate(Adapter):
        @dataclass
        class Config:
            r: int = 2

        def __init__(self, base, cfg, view=None):
            super().__init__(base, cfg, view)
            self.g = Factor(self.view.d_out)

        def reset_parameters(self):
            torch.nn.init.ones_(self.g.weight)

        def delta(self, x):
            return torch.zeros(*x.shape[:-1], self.view.d_out)

    try:
        base, _ = setup
        m = copy.deepcopy(base)
        lorakit.attach(m, {"method": "_served_gate_test", "targets": ["q_proj"]}, "a")
        lorakit.save_adapter(m, tmp_path / "g", "a")
        bank = install(copy.deepcopy(base))
        with pytest.raises(AdapterFileError, match="_served_gate_test"):
            read_served(bank, tmp_path / "g", "g")
    finally:
        REGISTRY.pop("_served_gate_test", None)


def test_reused_plan_keeps_gathered_weights_and_add_remove_invalidate(setup):
    """Decode steps of an unchanged batch reuse the plan and its gathered per-row weights (no copy per step);
    changing the adapters in the bank drops every stale copy, and the outputs stay those of the merged models."""
    base, ads = setup
    served = copy.deepcopy(base)
    bank = install(served)
    for n in ("lo4", "lo8", "do2"):
        bank.add(read_served(bank, ads[n], n))
    lay = bank.layers["model.layers.0.self_attn.q_proj"]
    ids = torch.randint(3, 250, (3, 4), generator=torch.Generator().manual_seed(2))
    names = ["lo4", "lo8", "do2"]

    def check(out, names):
        for i, n in enumerate(names):
            ref = merged_model(base, ads[n])(ids[i:i + 1]).logits[0]
            torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=1e-4, msg=f"row {i} ({n})")

    with torch.no_grad():
        bank.set_adapters(names)
        first = bank.plan
        served(ids)
        assert lay._gcache is None  # used once: nothing kept
        bank.set_adapters(names)
        assert bank.plan is first  # same ids: the plan is reused
        out = served(ids).logits
        assert lay._gcache is not None and lay._gcache[0] is first
        kept = {r: a.data_ptr() for r, (a, _) in lay._gcache[1].items()}
        served(ids)
        assert {r: a.data_ptr() for r, (a, _) in lay._gcache[1].items()} == kept  # no new gather
        check(out, names)
        # a different id vector: a new plan, the old copies are freed at the first forward
        bank.set_adapters(["lo8", "lo4", "do2"])
        assert bank.plan is not first
        served(ids)
        assert lay._gcache is None
        # replacing an adapter in place (same slot) must not serve its stale gathered weights
        bank.set_adapters(names)
        served(ids)
        old = bank.plan
        assert lay._gcache[0] is old
        bank.remove("lo4")
        assert lay._gcache is None and old not in bank._plans
        bank.add(read_served(bank, ads["pi3"], "lo4"))  # another adapter under the freed slot and name
        bank.set_adapters(names)
        served(ids)
        out = served(ids).logits
        ref = merged_model(base, ads["pi3"])(ids[:1]).logits[0]
        torch.testing.assert_close(out[0], ref, atol=2e-4, rtol=1e-4)


def test_gather_cache_budget_zero_never_keeps_copies(setup):
    base, ads = setup
    served = copy.deepcopy(base)
    bank = install(served, gather_cache_mb=0)
    bank.add(read_served(bank, ads["lo4"], "lo4"))
    ids = torch.randint(3, 250, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(3):
            bank.set_adapters(["lo4", None])
            served(ids)
    assert all(lay._gcache is None for lay in bank.layers.values())


def test_declared_fast_serve_gets_the_fast_path(setup, tmp_path, monkeypatch):
    """The fast path is a declared capability: a user method registered with fast_serve="lowrank" is read
    straight from its factors (no adapter is built), one that does not declare it goes through lowrank(), even
    when it subclasses LoRA (the capability is not inherited)."""
    import lorakit
    from lorakit.core import REGISTRY, register
    from lorakit.methods.lora import LoRA
    from lorakit.serve import bank as bank_mod

    @register("_fast_user_lora", family="test", paper="none", fast_serve="lowrank")
    class Fast(LoRA):
        pass

    @register("_slow_user_lora", family="test", paper="none")
    class Slow(LoRA):
        pass

    built = []
    real = bank_mod._generic_lowrank
    monkeypatch.setattr(bank_mod, "_generic_lowrank", lambda *a, **k: built.append(a[1].name) or real(*a, **k))
    try:
        base, ads = setup
        bank = install(copy.deepcopy(base))
        read_served(bank, ads["lo8"], "lo8")  # plain LoRA: declared fast
        assert built == []
        for method in ("_fast_user_lora", "_slow_user_lora"):
            out = make_adapter(base, tmp_path / method, method, r=8, seed=2, rslora=True)
            sa = read_served(bank, out, method)
            m = copy.deepcopy(base)
            lorakit.load_adapter(m, out)
            want = {p: a.lowrank() for p, a in lorakit.adapters(m)}
            assert sa.layers.keys() == want.keys()
            for p, (A, sB, g) in sa.layers.items():
                torch.testing.assert_close(A, want[p].A)
                torch.testing.assert_close(sB, want[p].B * want[p].scale)
                assert g is None
        assert set(built) == {"_slow_user_lora"}  # only the undeclared method built adapters
    finally:
        REGISTRY.pop("_fast_user_lora", None)
        REGISTRY.pop("_slow_user_lora", None)


def test_fast_serve_must_be_a_known_kind_on_a_low_rank_config():
    from dataclasses import dataclass

    from lorakit.core import REGISTRY, Adapter, register

    with pytest.raises(TypeError, match="fast_serve"):
        @register("_bad_fast", family="test", paper="none", fast_serve="lora")
        class Bad(Adapter):
            @dataclass
            class Config:
                r: int = 2

    with pytest.raises(TypeError, match="LowRankConfig"):
        @register("_bad_fast2", family="test", paper="none", fast_serve="lowrank")
        class Bad2(Adapter):
            @dataclass
            class Config:
                r: int = 2
    assert "_bad_fast" not in REGISTRY and "_bad_fast2" not in REGISTRY


def test_lora_bias_adapter_is_refused(setup, tmp_path):
    """lowrank() has no bias term: an adapter with lora_bias would be served without its bias, so it is refused."""
    base, _ = setup
    out = make_adapter(base, tmp_path / "lb", "lora", r=2, targets=["q_proj"], lora_bias=True)
    with pytest.raises(AdapterFileError, match="lora_bias"):
        read_served(install(copy.deepcopy(base)), out, "lb")
