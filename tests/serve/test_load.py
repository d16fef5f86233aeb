"""CI-sized load test: 60 HTTP requests at concurrency 8 over random adapters with adapters unloaded and an alias
loaded during the run; zero errors and every output equal to the merged-model reference."""
import copy
import shutil

import torch

from helpers import load_base, make_adapter, make_base
from lorakit.serve.engine import Engine
from lorakit.serve.loadtest import reference_texts, run_load_test


def test_load_small(tmp_path):
    from transformers import AutoTokenizer

    base_dir = make_base(tmp_path / "base")
    base = load_base(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ad = tmp_path / "adapters"
    specs = [("lora", 4), ("lora", 8), ("dora", 2), ("pissa", 3), ("lora", 2)]
    dirs = {f"a{i}": make_adapter(base, ad / f"a{i}", m, r=r, seed=i) for i, (m, r) in enumerate(specs)}
    shutil.copytree(dirs["a1"], ad / "pool" / "x")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(2, 10, (4,), generator=g)]
    refs = reference_texts(base, tok, {**dirs, "tiny": None}, prompts, max_tokens=6)
    eng = Engine(copy.deepcopy(base), tok, ad, max_loras=3, max_batch=8, base_name="tiny")
    try:
        res = run_load_test(eng, refs, prompts, list(dirs) + ["tiny"], n_requests=60, concurrency=8, max_tokens=6,
                            churn_every=7, alias=("alias", "pool/x", "a1"), timeout_s=240)
    finally:
        eng.stop()
    assert res["errors"] == 0, res["error_examples"]
    assert res["mismatches"] == 0, res["mismatch_examples"]
    assert res["unloads"] >= 1 and res["adapter_evictions"] >= 1
