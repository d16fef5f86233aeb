"""LongLoRA's long-context run: fine-tune SmolLM2-135M-Instruct on concatenated Shakespeare/Milton text at a context
4x a base window, with S²-Attn (LongLoRA) and with full attention (plain LoRA), at equal steps, and compare the
held-out perplexity at the long context with full attention (how both are used at inference) and the time per step.

    python bench/longlora.py --steps 30 --seq 1024 --out bench/results/longlora.json

Both runs: LoRA r=8, alpha=16 on q/k/v/o plus trainable embeddings and norms (the paper's "LoRA+"), AdamW, the same
seed, batches and learning rate; the only difference is the training attention (LongLoRA group ratio 1/4). Each run
is a fresh process-local copy of the model; the machine state is printed (run it idle for timings).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

import lorakit
from lorakit import assets

TRAINABLE = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]


def blocks(tok, docs, seq, n, seed):
    ids = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
    n_all = ids.numel() // seq
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_all, generator=g)[:n]
    return [ids[i * seq:(i + 1) * seq] for i in pick.tolist()]


@torch.no_grad()
def perplexity(model, chunks):
    model.eval()
    nll, count = 0.0, 0
    for c in chunks:
        out = model(c[None], labels=c[None])
        nll += out.loss.item() * (c.numel() - 1)
        count += c.numel() - 1
    return math.exp(nll / count)


def run(method, base, train, evals, steps, lr, seed):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    lorakit.attach(model, {"method": method, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 8,
                           "alpha": 16, "trainable": TRAINABLE, "seed": seed})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    times = []
    for s in range(steps):
        x = train[s % len(train)][None]
        t0 = time.perf_counter()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    ppl = perplexity(model, evals)
    return {"method": method, "ppl_long": ppl, "sec_per_step": sum(times[1:]) / max(1, len(times) - 1),
            "trainable": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--base-window", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval", type=int, default=6, help="held-out chunks of --seq tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base, tok = assets.load_causal_lm("smollm2-135m")
    text = assets.load_text("shakespeare")
    train = blocks(tok, text["train"], a.seq, a.steps, a.seed)
    evals = blocks(tok, text["validation"], a.seq, a.eval, 1)
    short = [c[i:i + a.base_window] for c in evals for i in range(0, a.seq, a.base_window)]
    res = {"seq": a.seq, "base_window": a.base_window, "steps": a.steps, "lr": a.lr,
           "load_avg": os.getloadavg(), "threads": a.threads,
           "base_ppl_long": perplexity(base, evals), "base_ppl_window": perplexity(base, short)}
    res["runs"] = [run(m, base, train, evals, a.steps, a.lr, a.seed) for m in ("lora", "longlora")]
    res["load_avg_after"] = os.getloadavg()
    lo, ll = res["runs"]
    res["ppl_ratio_longlora_vs_lora"] = ll["ppl_long"] / lo["ppl_long"]
    res["time_ratio_longlora_vs_lora"] = ll["sec_per_step"] / lo["sec_per_step"]
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
