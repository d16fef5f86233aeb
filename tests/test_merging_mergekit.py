"""mergekit as the oracle of full-model merges: two tiny "fine-tuned" models (a base with a LoRA merged in), merged by
mergekit's run_merge from local directories (offline), against lorakit's merge_deltas on the same LoRAs added to the
base (flavor="mergekit"). mergekit is a test dependency only."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.merging import merge_deltas
from lorakit.inject import adapters as adapters_of

from conftest import tiny_llama

pytest.importorskip("mergekit")

CASES = [
    ("task_arithmetic", "linear", {"lambda": 0.7}, {}),
    ("ties", "ties", {}, {"density": 0.5}),
    ("dare_linear", "dare_linear", {}, {"density": 1.0}),  # mergekit's draws follow its own tensor order: density 1
    ("dare_ties", "dare_ties", {}, {"density": 1.0}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mk")
    base = tiny_llama(layers=1)
    base.save_pretrained(d / "base")
    tuned = {}
    for i, name in enumerate(["a", "b"]):
        m = copy.deepcopy(base)
        lorakit.attach(m, {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"],
                           "seed": i}, name)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for _, a in adapters_of(m, name):
                a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.2)
        tuned[name] = copy.deepcopy(m)
        merged = lorakit.merge_and_unload(m)
        merged.save_pretrained(d / name)
    return base, tuned, d


@pytest.mark.parametrize("mk_method,ours,params,per_model", CASES)
def test_full_model_merge_equals_mergekit(models, mk_method, ours, params, per_model):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    base, tuned, d = models
    w = [1.0, 0.6]
    cfg = MergeConfiguration.model_validate({
        "merge_method": mk_method, "base_model": str(d / "base"), "dtype": "float32",
        "parameters": dict(params),
        "models": [{"model": str(d / n), "parameters": {"weight": wi, **per_model}} for n, wi in zip("ab", w)]})
    out = d / f"out-{mk_method}"
    run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, lazy_unpickle=False, write_model_card=False,
                                          quiet=True, random_seed=0))
    mk = {}
    for f in out.glob("*.safetensors"):
        mk.update(load_file(f))

    model = copy.deepcopy(tuned["a"])
    # carry b's adapter over to the same model (same base weights)
    lorakit.attach(model, lorakit.attachment(tuned["b"], "b").config, "b")
    with torch.no_grad():
        src = dict(adapters_of(tuned["b"], "b"))
        for p, a in adapters_of(model, "b"):
            for q, t in zip(a.parameters(), src[p].parameters()):
                q.copy_(t)
    deltas = merge_deltas(model, ["a", "b"], w, ours, flavor="mergekit", lam=params.get("lambda", 1.0), **per_model)
    checked = 0
    for key, W in base.state_dict().items():
        path = key.removesuffix(".weight")
        want = W + deltas[path] if path in deltas else W
        torch.testing.assert_close(mk[key], want, atol=1e-5, rtol=1e-5)
        checked += path in deltas
    assert checked == 3  # q, v and up_proj of the one layer
