"""Sparse fine-tuning (S2FT, SMT, SaRA, LT-SFT) side by side with LoRA at equal trainable parameters on
SmolLM2-135M: trainable parameters, adapter bytes on disk, peak memory and step time (ratio to LoRA).

    python bench/sparse.py [--r 8] [--batch 2] [--seq 64] [--steps 5] [--threads 2]

The budget is LoRA's trainable count at rank ``--r`` on every linear layer of the decoder (all-linear). Each sparse
method is sized to it: SaRA's threshold is the quantile of |W| that leaves that many entries below it, SMT's block
count (64x64 blocks), LT-SFT's density, and S2FT's channel ratio (down_proj only, the paper's default unit);
``s2ft_heads`` is S2FT with attention heads as the released LLaMA-2 scripts train them (o_proj heads at o_ratio
0.052 drawn over all layers, ``select: global``; on SmolLM2's GQA a unit is a kv group, 192 o_proj columns) plus
down_proj channels filling the rest of the budget. Every
method runs in its own subprocess (so peak memory is its own): load the model, attach, run the method's selection
phase where it has one (SMT's warm-up and LT-SFT's full phase: 2 steps, through the method's controller, as the
trainer runs it), then time ``--steps`` optimiser steps (forward + backward + AdamW) on fixed random tokens, and save
the adapter. "trainable" counts the entries that can change, "held" the adapter parameter elements in memory after
the run and "state" the optimiser-state elements (SMT and LT-SFT hold only their selected support after the
selection). Peak memory is the child's peak RSS from the attach to the end (SMT's and LT-SFT's dense first phase
included), its growth over the RSS just before the attach (model loaded, budget sized, free heap handed back with
``malloc_trim``), and "phase MB": the peak RSS growth during the timed steps only (the freed first phase handed back
with ``malloc_trim`` and the peak reset through ``/proc/self/clear_refs`` after the selection; Linux/glibc; the
peak resets fall back to getrusage elsewhere). ``--smt-warmup``
picks SMT's warm-up (``train``: dense, the default; ``score``: gradient scores only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["lora", "s2ft", "s2ft_heads", "sara", "smt", "lt_sft"]


def _hwm_mb() -> float | None:
    """Peak RSS since the last reset (VmHWM), None where /proc does not give it."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _peak(since_reset: bool) -> float:
    """Peak RSS in MB: since the last reset where /proc gives it, else the process's (getrusage)."""
    hwm = _hwm_mb() if since_reset else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trim() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): without it the RSS after SMT's or LT-SFT's
    selection still counts the freed dense first phase (glibc keeps freed mid-size blocks mapped)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def s2ft_heads_config(model, budget: int, o_ratio: float = 0.052) -> dict:
    """S2FT on o_proj heads (the official draw: int(o_ratio * all kv groups) over every layer) and down_proj
    channels (the same global draw) sized so that the two together hold ``budget`` trainable entries."""
    layers = model.model.layers
    at = layers[0].self_attn
    n_kv = at.k_proj.out_features // at.head_dim
    n_o = max(1, int(o_ratio * n_kv * len(layers)))
    o_params = n_o * at.o_proj.out_features * (at.o_proj.in_features // n_kv)
    downs = [m for n, m in layers.named_modules() if n.endswith("down_proj")]
    n_ch = max(1, (budget - o_params) // downs[0].out_features)
    total = sum(m.in_features for m in downs)
    return {"method": "s2ft", "targets": ["down_proj", "o_proj"], "select": "global",
            "ratio": (n_ch + 0.5) / total, "overrides": {"o_proj": {"ratio": o_ratio}}}


def child(method: str, a: argparse.Namespace) -> dict:
    import torch

    import lorakit
    from lorakit.assets import load_causal_lm

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    loaded = load_causal_lm("smollm2-135m")
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.train()
    lin = [m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    n_lin = sum(m.weight.numel() for m in lin)
    budget = sum(a.r * (m.in_features + m.out_features) for m in lin)
    mt = a.masked_targets if a.masked_targets == "all-linear" else [a.masked_targets]
    if method == "lora":
        cfg = {"method": "lora", "targets": "all-linear", "r": a.r, "alpha": 2 * a.r}
    elif method == "sara":
        w = torch.cat([m.weight.detach().abs().flatten() for m in lin])
        theta = float(w.kthvalue(budget).values) + 1e-12  # |W| < theta keeps ~budget entries
        del w  # the sizing copy is the bench's, not the method's
        cfg = {"method": "sara", "targets": "all-linear", "threshold": theta}
    elif method == "smt":
        cfg = {"method": "smt", "targets": mt, "block": 64, "blocks": round(budget / 64 ** 2),
               "warmup_steps": 2, "warmup": a.smt_warmup}
    elif method == "lt_sft":
        n_t = sum(m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
                  and (mt == "all-linear" or n.endswith("." + a.masked_targets)))
        cfg = {"method": "lt_sft", "targets": mt, "density": budget / n_t, "full_steps": 2}
    elif method == "s2ft_heads":
        cfg = s2ft_heads_config(model, budget)
    else:
        downs = [m for n, m in model.model.layers.named_modules() if n.endswith("down_proj")]
        cfg = {"method": "s2ft", "targets": ["down_proj"],
               "ratio": budget / sum(m.out_features for m in downs) / downs[0].in_features}
    _trim()
    rss_loaded = _rss_mb()  # the baseline: model loaded, budget sized, nothing attached
    peak_reset = _reset_peak()  # the whole-run peak then starts here too
    lorakit.attach(model, {**cfg, "seed": 0})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ctrls = lorakit.training_controllers(model)
    pre = 2 if method in ("smt", "lt_sft") else 1  # selection phase (or one untimed warm-up step)
    for c in ctrls:
        c.on_train_begin(model, opt, pre + a.steps)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g)
    times = []
    reset, peak_before = False, 0.0
    for step in range(pre + a.steps):
        if step == pre:
            _trim()
            peak_before = _peak(peak_reset)
            reset = _reset_peak()  # the reset lowers ru_maxrss too
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        extra = lorakit.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        for c in ctrls:
            c.before_step(step, model, opt)
        opt.step()
        for c in ctrls:
            c.step(step, model, opt)
        opt.zero_grad(set_to_none=True)
        if step >= pre:
            times.append(time.perf_counter() - t)
    phase = _hwm_mb() if reset else None
    held = sum(p.numel() for p in params)
    state = sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    trainable = sum(p.numel() for _, ad in lorakit.adapters(model) for p in ad.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as d:
        lorakit.save_adapter(model, Path(d) / "a")
        size = sum(f.stat().st_size for f in (Path(d) / "a").iterdir())
        weights = (Path(d) / "a" / "adapter_model.safetensors").stat().st_size
    peak = max(peak_before, _peak(peak_reset))
    return {"method": method, "config": cfg, "budget": budget, "trainable": trainable, "held": held, "state": state,
            "phase_growth_mb": None if phase is None else phase - rss_loaded, "adapter_bytes": size,
            "weights_bytes": weights, "peak_rss_mb": peak, "peak_growth_mb": peak - rss_loaded,
            "step_s": statistics.median(times), "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--masked-targets", default="all-linear",
                    help="targets of SMT and LT-SFT (dense first phase): all-linear, or one module name such as "
                         "down_proj (their support is still sized to the budget)")
    ap.add_argument("--smt-warmup", default="train", choices=["train", "score"],
                    help="SMT's warm-up: train (dense, the official schedule) or score (gradient scores only)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)))
        return
    rows = []
    for m in a.methods.split(","):
        cmd = [sys.executable, __file__, "--child", m, "--r", str(a.r), "--batch", str(a.batch), "--seq", str(a.seq),
               "--steps", str(a.steps), "--threads", str(a.threads), "--masked-targets", a.masked_targets,
               "--smt-warmup", a.smt_warmup]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            why = "killed (out of memory?)" if out.returncode == -9 else f"exit {out.returncode}"
            print(f"{m}: failed, {why}\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[0][7:]))
    if not rows:
        return
    base = next((r for r in rows if r["method"] == "lora"), rows[0])
    print(f"budget (LoRA r={a.r}, all-linear): {base['budget']:,} trainable; batch {a.batch}x{a.seq} tokens, "
          f"{a.steps} timed steps, {a.threads} threads")
    print(f"{'method':8} {'trainable':>10} {'held':>10} {'state':>10} {'file MB':>8} {'peak RSS MB':>11} "
          f"{'growth MB':>9} {'phase MB':>8} {'step s':>7} {'step/LoRA':>9} {'bytes/LoRA':>10}")
    for r in rows:
        ph = "n/a" if r["phase_growth_mb"] is None else f"{r['phase_growth_mb']:.0f}"
        print(f"{r['method']:8} {r['trainable']:>10,} {r['held']:>10,} {r['state']:>10,} "
              f"{r['adapter_bytes'] / 2**20:>8.2f} {r['peak_rss_mb']:>11.0f} {r['peak_growth_mb']:>9.0f} {ph:>8} "
              f"{r['step_s']:>7.2f} "
              f"{r['step_s'] / base['step_s']:>9.2f} {r['adapter_bytes'] / base['adapter_bytes']:>10.2f}")
    print(json.dumps([{k: r[k] for k in ("method", "config")} for r in rows]))


if __name__ == "__main__":
    main()
