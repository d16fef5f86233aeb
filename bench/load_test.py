"""Full loopback load test of ``lorakit serve``: 500 requests at concurrency 32 over random adapters, with adapters
unloaded (and reloaded on demand) during the run and one adapter registered through ``/v1/load_lora_adapter``.
Every greedy output is checked against its reference (adapter merged into its own copy of the base, run alone).

    PYTHONPATH=src:tests python bench/load_test.py                      # tiny random Llama (fast, default)
    PYTHONPATH=src:tests python bench/load_test.py --base smollm2-135m --adapters 12 --max-tokens 8

Prints errors, mismatches, p50/p99 latency, requests/s, adapter loads/evictions as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests"), str(root / "tests" / "serve")]

from lorakit.serve.engine import Engine  # noqa: E402
from lorakit.serve.loadtest import reference_texts, run_load_test  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="tiny", help="'tiny' (random Llama built in code), a HF dir, or smollm2-135m")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from helpers import load_base, make_adapter, make_base

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        if a.base == "tiny":
            from transformers import AutoTokenizer

            bd = make_base(td / "base", layers=4, hidden=64)
            base, tok = load_base(bd), AutoTokenizer.from_pretrained(bd)
            scale, name = 0.3, "tiny"
        else:
            from lorakit.serve.server import load_base_model

            base, tok = load_base_model(a.base)
            scale, name = 0.01, Path(a.base).name
        ad = td / "adapters"
        kinds = [("lora", 16), ("lora", 8), ("dora", 8), ("pissa", 4), ("lora", 4)]
        dirs = {}
        for i in range(a.adapters):
            m, r = kinds[i % len(kinds)]
            dirs[f"ad{i}"] = make_adapter(base, ad / f"ad{i}", m, r=r, seed=i, scale=scale,
                                          **({"niter": 2} if m == "pissa" else {}))
        shutil.copytree(dirs["ad0"], ad / "pool" / "x")
        g = torch.Generator().manual_seed(0)
        vocab = base.config.vocab_size
        prompts = [torch.randint(3, min(vocab, 250), (int(n),), generator=g).tolist()
                   for n in torch.randint(4, 24, (a.prompts,), generator=g)]
        refs = reference_texts(base, tok, {**dirs, name: None}, prompts, a.max_tokens)
        eng = Engine(copy.deepcopy(base), tok, ad, max_loras=a.max_loras, max_batch=a.concurrency, base_name=name)
        try:
            res = run_load_test(eng, refs, prompts, list(dirs) + [name], n_requests=a.requests,
                                concurrency=a.concurrency, max_tokens=a.max_tokens, churn_every=10,
                                alias=("alias", "pool/x", "ad0"), timeout_s=a.timeout)
        finally:
            eng.stop()
    res["base"] = a.base
    print(json.dumps(res, indent=1, default=str))
    return 0 if res["errors"] == 0 and res["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
