"""Continuous batching: every request of a mixed batch equals greedy generation on its merged model."""
import copy

import pytest
import torch

from helpers import load_base, make_adapter, make_base, merged_model
from lorakit.serve.engine import AdapterNotFound, Engine, EngineError, SamplingParams


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eng")
    base_dir = make_base(d / "base")
    base = load_base(base_dir)
    ad = d / "adapters"
    ads = {
        "lo4": make_adapter(base, ad / "lo4", "lora", r=4, seed=1),
        "lo8": make_adapter(base, ad / "lo8", "lora", r=8, seed=2),
        "do2": make_adapter(base, ad / "do2", "dora", r=2, seed=3),
        "pi3": make_adapter(base, ad / "pi3", "pissa", r=3, seed=4),
    }
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    return base, ads, ad, tok


def _reference(base, adapter_dir, prompt_ids, n):
    m = base if adapter_dir is None else merged_model(base, adapter_dir)
    out = m.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                     pad_token_id=2, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def test_mixed_batch_greedy_equals_merged(env):
    base, ads, ad, tok = env
    eng = Engine(copy.deepcopy(base), tok, ad, max_loras=3, max_batch=4)
    g = torch.Generator().manual_seed(0)
    names = ["lo4", None, "do2", "pi3", "lo8", "lo4", "do2", "lo8"]
    prompts = [torch.randint(3, 250, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in names]
    lens = [5, 9, 3, 7, 6, 4, 8, 5]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lens]
    reqs = [eng.submit(p, a, q) for p, a, q in zip(prompts, names, params)]
    while not all(r.done.is_set() for r in reqs):  # max_batch 4 < 8 requests and max_loras 3 < 4: joins, leaves,
        eng.step()                                  # evictions and reloads all happen
    for r, p, a, n in zip(reqs, prompts, names, lens):
        assert r.error is None, r.error
        assert r.out_ids == _reference(base, None if a is None else ads[a], p, n), (a, p)
    m = eng.metrics()
    assert m["adapter_evictions"] >= 1 and m["generated_tokens"] == sum(lens)
    eng.stop()


def test_sampling_seed_stop_and_errors(env):
    base, ads, ad, tok = env
    eng = Engine(copy.deepcopy(base), tok, ad, max_loras=2, max_new_tokens=32)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    a, b = eng.generate(["hello", "hello"], ["lo4", "lo4"], [sp, sp])
    assert a.out_ids == b.out_ids and len(a.out_ids) == 12  # same seed, same tokens
    (g,) = eng.generate(["hello"], ["lo4"], SamplingParams(max_tokens=12, ignore_eos=True))
    for stop in (g.text[3:5], g.text[6:10]):  # stop strings spanning 2 and 4 tokens (one byte per token here)
        (s,) = eng.generate(["hello"], ["lo4"], SamplingParams(max_tokens=12, ignore_eos=True,
                                                                stop=["\x00never", stop]))
        assert s.finish_reason == "stop" and s.text == g.text[:g.text.find(stop)]
    with pytest.raises(AdapterNotFound):
        eng.submit("x", "nope")
    with pytest.raises(AdapterNotFound):
        eng.submit("x", "../adapters/lo4")
    with pytest.raises(EngineError, match="max_tokens"):
        eng.submit("x", None, SamplingParams(max_tokens=1000))
    with pytest.raises(EngineError, match="outside"):
        eng.load_adapter("evil", "/etc")
    eng.stop()


def test_bad_adapter_fails_only_its_requests(env, tmp_path):
    base, ads, ad, tok = env
    bad = ad / "corrupt"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((ads["lo4"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    eng = Engine(copy.deepcopy(base), tok, ad, max_loras=2).start()
    try:
        ok = eng.submit([5, 6, 7], "lo4", SamplingParams(max_tokens=4, ignore_eos=True))
        badr = eng.submit([5, 6, 7], "corrupt", SamplingParams(max_tokens=4, ignore_eos=True))
        assert ok.result(60).error is None and len(ok.out_ids) == 4
        assert "safetensors" in badr.result(60).error
    finally:
        eng.stop()
        import shutil

        shutil.rmtree(bad)
