"""Where the unmerged LoRA eval overhead goes (issue 2's <= 1.04x target), on SmolLM2-135M-Instruct.

    python bench/lora_eval.py [--threads 2] [--reps 9] [--batch 4] [--seq 128] [--rank 16] [--profile]

Times, interleaved in one process (median of ``--reps``): the base model; the same model with LoRA r=16 on every
linear layer, unmerged (lorakit's eval path: ``h = x Aᵀ`` (q/k/v and gate/up fused into one GEMM each,
``lorakit.fusion``), then one in-place ``addmm_`` of ``s h Bᵀ`` into the base output); the same without the
fusion; and a prototype that is NOT in the library: A stacked under W (``[W; A]``, one GEMM gives the base
output and ``h`` together, then ``addmm`` of ``s h Bᵀ`` into a contiguous output). The prototype keeps its own copy
of ``[W; A]`` (2x the base weights), which is why it is only an experiment. With ``--profile`` it prints the
operator profile of the base and the LoRA forward.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
from torch.nn import functional as F

import lorakit
from lorakit.core import Adapted


def stacked_forward(self, x):
    d = self._d
    x2 = x.reshape(-1, x.shape[-1])
    ye = x2 @ self._cat.t()
    return torch.addmm(ye[:, :d], ye[:, d:], self._Bt, alpha=self._s).view(*x.shape[:-1], d)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lorakit.assets import load_causal_lm

    base, _ = load_causal_lm("smollm2-135m")
    base.eval()
    lm = copy.deepcopy(base)
    lorakit.attach(lm, {"method": "lora", "r": a.rank, "targets": "all-linear"}, "a")
    lm.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    st = copy.deepcopy(lm)
    for mod in st.modules():
        if isinstance(mod, Adapted):
            ad = mod.adapters["a"]
            w = mod.base_layer.weight
            mod._cat = torch.cat([w, ad.lora_A.weight]).detach()
            mod._d, mod._Bt, mod._s = w.shape[0], ad.lora_B.weight.t().detach(), ad.scale
            mod.forward = types.MethodType(stacked_forward, mod)
    unf = copy.deepcopy(lm)  # the same adapter without horizontal fusion (lorakit before issue 23)
    for _, ad in lorakit.inject.adapters(unf):
        ad.__dict__.pop("_fuse", None)
    batch = torch.randint(0, base.config.vocab_size, (a.batch, a.seq), generator=g)
    models = {"base": base, "lora": lm, "lora, no fusion": unf, "stacked [W;A] prototype": st}
    with torch.no_grad():
        ref = lm(batch).logits
        diff = float((st(batch).logits - ref).abs().max())
        fdiff = float((unf(batch).logits - lm(batch).logits).abs().max())  # the 2nd call runs fused
        t = {k: [] for k in models}
        c = {k: [] for k in models}  # CPU time of this process (with 1 thread: less sensitive to a busy machine)
        for _ in range(a.reps):
            for k, m in models.items():
                s, cs = time.perf_counter(), time.process_time()
                m(batch)
                t[k].append(time.perf_counter() - s)
                c[k].append(time.process_time() - cs)
    med = {k: statistics.median(v) for k, v in t.items()}
    cmed = {k: statistics.median(v) for k, v in c.items()}
    for k, v in med.items():
        print(f"{k:<26} {v * 1e3:8.1f} ms   {v / med['base']:.3f}x base   cpu {cmed[k] * 1e3:8.1f} ms   "
              f"{cmed[k] / cmed['base']:.3f}x base", flush=True)
    print(f"prototype vs lora logits: max |diff| {diff:.2e}; fused vs unfused: max |diff| {fdiff:.2e}")
    if a.profile:
        from torch.profiler import profile

        for k in ("base", "lora"):
            with torch.no_grad(), profile() as p:
                for _ in range(3):
                    models[k](batch)
            print(k)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
