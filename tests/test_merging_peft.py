"""PEFT parity: lorakit.combine asked for PEFT's behaviour gives PEFT's add_weighted_adapter result (per module ΔW)
on the same two LoRA files (peft is a test dependency only). The DARE variants draw random masks after PEFT has
drawn the new adapter's init, so their draws cannot line up; tensor-level DARE parity is in test_merging_functions."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.inject import adapters as adapters_of

from conftest import tiny_llama

peft = pytest.importorskip("peft")

# PEFT combination_type -> lorakit.combine options
CASES = {
    "cat": {"method": "cat"},
    "linear": {"method": "linear", "space": "factors"},
    "svd": {"method": "svd"},
    "ties": {"method": "ties", "space": "factors", "density": 0.5},
    "magnitude_prune": {"method": "magnitude_prune", "space": "factors", "density": 0.5},
    "ties_svd": {"method": "ties_svd", "density": 0.5},
    "magnitude_prune_svd": {"method": "magnitude_prune_svd", "density": 0.5},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("peft")
    base = tiny_llama()
    paths = {}
    for i, (name, alpha) in enumerate([("a", 8), ("b", 2)]):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"]))
        g = torch.Generator().manual_seed(7 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(d / name)
        paths[name] = d / name
    return base, paths


@pytest.mark.parametrize("ctype", list(CASES))
def test_combine_equals_add_weighted_adapter(files, ctype):
    from peft import PeftModel

    base, paths = files
    w = [0.8, -1.3]
    pm = PeftModel.from_pretrained(copy.deepcopy(base), paths["a"], adapter_name="a")
    pm.load_adapter(paths["b"], adapter_name="b")
    opts = dict(CASES[ctype])
    pm.add_weighted_adapter(["a", "b"], w, "m", combination_type=ctype, density=opts.get("density"))
    ref = {}
    for n, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "m" in getattr(mod, "lora_A", {}):
            ref[n.removeprefix("base_model.model.")] = mod.get_delta_weight("m").detach()
    assert ref

    m = copy.deepcopy(base)
    lorakit.load_adapter(m, paths["a"], "a")
    lorakit.load_adapter(m, paths["b"], "b")
    lorakit.combine(m, ["a", "b"], w, name="m", **opts)
    ours = {p: a.delta_weight().detach() for p, a in adapters_of(m, "m")}
    assert set(ours) == set(ref)
    for p in ref:
        torch.testing.assert_close(ours[p], ref[p], atol=2e-5, rtol=1e-4)
