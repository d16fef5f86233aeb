"""Serving benchmark on SmolLM2-135M (offline asset), side by side in one run; prints ratios.

    PYTHONPATH=src python bench/serve.py [--threads 2] [--reps 5] [--out results.json]

1. forward, batch 32 rows x 32 tokens, 32 distinct r=16 all-linear adapters (bank) vs the base alone
2. the same batch: lorakit bank vs PEFT mixed batch (``adapter_names=``)
3. generation throughput: 64 concurrent requests over 64 adapters vs the same requests on one merged adapter
4. forward throughput with 1,000 adapters resident vs 8 (r=16 on q_proj/v_proj: 1,000 all-linear r=16 adapters
   would need 19.5 GB of RAM on this machine)
5. cold adapter load (read the safetensors file + prepare + install into the bank), r=16 all-linear
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorakit.serve.bank import ServedAdapter, install, read_served  # noqa: E402
from lorakit.serve.engine import Engine, SamplingParams  # noqa: E402
from lorakit.serve.server import load_base_model  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "lorakit-bench-smollm2"
DEVICE = torch.device("cpu")  # --device


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def base_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (CACHE / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(CACHE)
    m, tok = load_base_model("smollm2-135m")
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.save_pretrained(CACHE)
    tok.save_pretrained(CACHE)
    return m, tok


def rand_adapter(bank, name, r, g, paths=None, scale=0.02) -> ServedAdapter:
    sa = ServedAdapter(name, "lora")
    for p, lay in bank.layers.items():
        if paths and not any(p.endswith(s) for s in paths):
            continue
        d_out, d_in = lay.base_layer.weight.shape
        sa.layers[p] = ((torch.randn(r, d_in, generator=g) / d_in ** 0.5).to(DEVICE),
                        (torch.randn(d_out, r, generator=g) * scale).to(DEVICE), None)
    return sa


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peft_mixed(model0, adapters: list[ServedAdapter], r, ids, names):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(model0), cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    with torch.no_grad():  # copy the same factors so both sides compute the same thing
        for sa in adapters:
            for p, (A, sB, _) in sa.layers.items():
                mod = pm.base_model.model.get_submodule(p)
                mod.lora_A[sa.name].weight.copy_(A)
                mod.lora_B[sa.name].weight.copy_(sB)
    pm.eval()
    return pm


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--stages", default="12345", help="which measurements to run (digits 1-5)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU: bench/gpu.sh)")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res: dict = {"threads": a.threads, "torch": torch.__version__, "device": a.device}
    if DEVICE.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(DEVICE)
    t = time.perf_counter()
    model0, tok = base_model()
    model0 = model0.to(DEVICE)
    res["base_load_s"] = round(time.perf_counter() - t, 2)
    g = torch.Generator().manual_seed(0)
    B, T, R = 32, 32, 16
    ids = torch.randint(0, model0.config.vocab_size, (B, T), generator=g).to(DEVICE)

    # ---- 1 + 2: forward over a mixed batch ------------------------------------------------------------------
    plain = copy.deepcopy(model0)
    served = copy.deepcopy(model0)
    # no gathered-weight cache here: every forward of stages 1-2 pays the gather, as a new prefill batch does
    bank = install(served, gather_cache_mb=0)
    ads = [rand_adapter(bank, f"a{i}", R, g) for i in range(64)]
    for sa in ads:
        bank.add(sa)
    names = [f"a{i}" for i in range(B)]
    if "1" in a.stages:
        with torch.no_grad():
            def f_base():
                plain(ids)

            def f_bank():
                bank.set_adapters(names)
                served(ids)
                bank.set_ids(None)

            tb, tk = [], []
            for _ in range(a.reps):  # interleaved: the machine is shared
                tb.append(timeit(f_base, 1))
                tk.append(timeit(f_bank, 1))
            res["fwd_base_s"], res["fwd_bank_s"] = statistics.median(tb), statistics.median(tk)
            res["fwd_bank_over_base"] = res["fwd_bank_s"] / res["fwd_base_s"]
            print(f"[1] forward {B}x{T}, {B} adapters: bank {res['fwd_bank_s']*1e3:.1f} ms vs base "
                  f"{res['fwd_base_s']*1e3:.1f} ms -> {res['fwd_bank_over_base']:.3f}x (target <= 1.10x)", flush=True)
            if not a.skip_peft and "2" in a.stages:
                pm = peft_mixed(model0, ads[:B], R, ids, names)
                def f_peft():
                    pm(input_ids=ids, adapter_names=names)

                tp = []
                for _ in range(a.reps):
                    tp.append(timeit(f_peft, 1))
                    tk.append(timeit(f_bank, 1))
                res["fwd_peft_mixed_s"] = statistics.median(tp)
                res["fwd_bank_s2"] = statistics.median(tk[a.reps:])
                res["fwd_bank_over_peft"] = res["fwd_bank_s2"] / res["fwd_peft_mixed_s"]
                res["fwd_peft_over_base"] = res["fwd_peft_mixed_s"] / res["fwd_base_s"]
                bank.set_adapters(names[:4])
                out_bank = served(ids[:4]).logits
                bank.set_ids(None)
                out_peft = pm(input_ids=ids[:4], adapter_names=names[:4]).logits
                res["bank_vs_peft_max_abs_diff"] = float((out_bank - out_peft).abs().max())
                print(f"[2] same batch: bank {res['fwd_bank_s2']*1e3:.1f} ms vs PEFT adapter_names "
                      f"{res['fwd_peft_mixed_s']*1e3:.1f} ms -> {res['fwd_bank_over_peft']:.3f}x of PEFT's time "
                      f"(target <= 0.70x; PEFT/base {res['fwd_peft_over_base']:.2f}x; max |diff| "
                      f"{res['bank_vs_peft_max_abs_diff']:.2e})", flush=True)
                del pm

    # ---- 3: generation throughput ----------------------------------------------------------------------------
    if "3" in a.stages:
        prompts = [torch.randint(0, model0.config.vocab_size, (16,), generator=g).tolist() for _ in range(64)]
        sp = SamplingParams(max_tokens=a.gen_tokens, ignore_eos=True)
        eng = Engine(served, tok, None, max_loras=64, max_batch=64)

        def run_gen(engine, adapters):
            t = time.perf_counter()
            reqs = engine.generate(prompts, adapters, sp)
            dt = time.perf_counter() - t
            assert all(r.error is None for r in reqs)
            return sum(len(r.out_ids) for r in reqs) / dt

        merged = copy.deepcopy(model0)
        with torch.no_grad():  # merge adapter a0 into the weights (the single-adapter fast path a server could use)
            for p, (A, sB, _) in ads[0].layers.items():
                w = merged.get_submodule(p).weight
                w.add_(sB @ A)
        eng_m = Engine(merged, tok, None, max_loras=1, max_batch=64)
        tm, tx = [], []
        for _ in range(max(2, a.reps // 2)):
            tx.append(run_gen(eng, [f"a{i}" for i in range(64)]))
            tm.append(run_gen(eng_m, [None] * 64))
        res["gen_tok_s_64_adapters"], res["gen_tok_s_merged"] = statistics.median(tx), statistics.median(tm)
        res["gen_mixed_over_merged"] = res["gen_tok_s_64_adapters"] / res["gen_tok_s_merged"]
        print(f"[3] generation, 64 requests x {a.gen_tokens} tokens: 64 adapters {res['gen_tok_s_64_adapters']:.1f} tok/s "
              f"vs one merged adapter {res['gen_tok_s_merged']:.1f} tok/s -> {res['gen_mixed_over_merged']:.3f}x "
              "(target >= 0.8x)", flush=True)
        eng.stop()
        eng_m.stop()
        del eng_m, merged

    # ---- 4: 1,000 adapters resident vs 8 ---------------------------------------------------------------------
    if "4" in a.stages:
        for sa in ads:
            bank.remove(sa.name)
        del ads
        qv = ("q_proj", "v_proj")
        few = [rand_adapter(bank, f"f{i}", R, g, qv) for i in range(8)]
        for sa in few:
            bank.add(sa)
        for i in range(a.many - 8):
            bank.add(rand_adapter(bank, f"m{i}", R, g, qv))
        many_names = [f"f{i}" for i in range(8)] + [f"m{i}" for i in range(a.many - 8)]
        gi = torch.Generator().manual_seed(1)
        rows_few = [f"f{int(i)}" for i in torch.randint(0, 8, (B,), generator=gi)]
        rows_many = [many_names[int(i)] for i in torch.randint(0, a.many, (B,), generator=gi)]
        with torch.no_grad():
            def f_rows(rows):
                def f():
                    bank.set_adapters(rows)
                    served(ids)
                    bank.set_ids(None)
                return f

            t8, t1k = [], []
            for _ in range(a.reps):
                t8.append(timeit(f_rows(rows_few), 1))
                t1k.append(timeit(f_rows(rows_many), 1))
        res["fwd_8_adapters_s"], res["fwd_1000_adapters_s"] = statistics.median(t8), statistics.median(t1k)
        res["throughput_1000_over_8"] = res["fwd_8_adapters_s"] / res["fwd_1000_adapters_s"]
        print(f"[4] forward {B}x{T} with {a.many} adapters resident vs 8: throughput ratio "
              f"{res['throughput_1000_over_8']:.3f}x (target >= 0.9x)", flush=True)
        for n in many_names:
            bank.remove(n)

    # ---- 5: cold load ----------------------------------------------------------------------------------------
    if "5" in a.stages:
        import lorakit

        with tempfile.TemporaryDirectory() as td:
            m = copy.deepcopy(model0)
            lorakit.attach(m, {"method": "lora", "targets": "all-linear", "r": R, "alpha": 32}, "cold")
            lorakit.save_adapter(m, td, "cold")
            del m
            ts = []
            for i in range(a.reps + 1):
                t = time.perf_counter()
                sa = read_served(bank, td, f"cold{i}")
                bank.add(sa)
                ts.append(time.perf_counter() - t)
                bank.remove(sa.name)
            res["cold_load_ms"] = statistics.median(ts[1:]) * 1e3
            res["cold_load_mb"] = sa.nbytes / 2**20
        print(f"[5] cold adapter load (r=16 all-linear, {res['cold_load_mb']:.1f} MiB): {res['cold_load_ms']:.1f} ms "
              "(target <= 50 ms)", flush=True)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
