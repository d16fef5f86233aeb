"""LS-LLaMA vs the generative (label-word) classifier on SmolLM2 at equal steps (docs/workflows.md).

Same adapter (LoRA r=8, alpha=16, q/k/v/o), rate, batch and steps; only the task kind differs: label-word
likelihood (``*-smollm2``) against a linear head on pooled hidden states (``*-smollm2-head``; LS-unLLaMA with
``data.attention=bidirectional``). Run: ``PYTHONPATH=src python bench/ls_llama.py [--steps 40] [--out runs/ls_llama]``.
"""
import argparse
import json
import time

from lorakit.train import resolve, run_training

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--out", default="runs/ls_llama")
ap.add_argument("--only", default="", help="comma-separated run names")
ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spinning on a shared machine)")
ap.add_argument("--eval-size", type=int, default=200)
a = ap.parse_args()
RUNS = [
    ("sentiment generative", "sentiment-smollm2-lora", []),
    ("sentiment LS-LLaMA last", "sentiment-smollm2-head-lora", []),
    ("bbc generative", "sentiment-smollm2-lora", ["data.task=bbc-smollm2"]),
    ("bbc LS-LLaMA last", "sentiment-smollm2-head-lora", ["data.task=bbc-smollm2-head"]),
    ("sentiment LS-unLLaMA mean", "sentiment-smollm2-head-lora", ["data.pooling=mean", "data.attention=bidirectional"]),
    ("bbc LS-unLLaMA mean", "sentiment-smollm2-head-lora", ["data.task=bbc-smollm2-head", "data.pooling=mean",
                                                             "data.attention=bidirectional"]),
    ("sentiment LS-LLaMA mean", "sentiment-smollm2-head-lora", ["data.pooling=mean"]),
]
only = set(filter(None, a.only.split(",")))
rows = []
for name, recipe, ov in RUNS:
    if only and name not in only:
        continue
    slug = name.replace(" ", "_")
    t = time.time()
    keep = name == "sentiment generative"  # Trans-LoRA's teacher (bench/trans_lora.py)
    r = run_training(resolve(recipe, ov + [f"train.steps={a.steps}", f"output.dir={a.out}/{slug}",
                                           f"output.save_adapter={str(keep).lower()}", f"train.threads={a.threads}",
                                           f"data.eval_size={a.eval_size}",
                                           f"train.eval_before={str('LS' not in name).lower()}"]))
    b, f = r["metrics_before"], r["metrics_after"]
    rows.append((name, b.get("accuracy", float("nan")), f["accuracy"], f["macro_f1"], time.time() - t))
    print(json.dumps({"run": name, "before": b.get("accuracy"), "after": f["accuracy"], "macro_f1": f["macro_f1"],
                      "wall_s": round(time.time() - t, 1)}), flush=True)
print("\n| run | accuracy before | accuracy after | macro-F1 after | wall s |\n|---|---|---|---|---|")
for n, b, f, m, w in rows:
    print(f"| {n} | {b:.3f} | {f:.3f} | {m:.3f} | {w:.0f} |")
