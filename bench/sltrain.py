"""SLTrain against full-rank and plain low-rank pre-training at equal parameter count, on the Shakespeare pre-training
task (a 4x256 Llama built in code, trained from scratch; validation perplexity).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/sltrain.py --steps 300 --threads 1 --out /tmp/sltrain.json

(about 25 minutes on one core of the shared machine at load ~3: ~1.5 s per step of 8x128 tokens, three runs; the
results are in docs/benchmarks.md, "SLTrain vs full-rank vs low-rank pre-training").

Three runs of the recipe shakespeare-pretrain-full with the same data, steps, batch and seed:
* full-rank: method `full` (every weight trains), lr 1e-3 (the recipe's), and the same at lr 3e-3 (the low-rank runs'
  learning rate: the control for it);
* low-rank: `sltrain` with `init=replace` and `sp_ratio=0` (W = s·BA), r=32;
* SLTrain: `sltrain` `init=replace`, r=28, `sp_ratio=0.0247`, chosen so that r·(m+n) + δ·m·n over the 28 linear
  layers equals the low-rank run's count (624,640 vs 624,636);
the embedding, the output head and the norms train in full in all three (the paper trains them too). In the low-rank and
SLTrain runs they train as `adapter.trainable` copies (PEFT's modules_to_save), which unties the model's tied
embedding/head: input embedding and head each get their own trainable copy (both start from the tied weight), so these
two runs train 12.6M more embedding parameters than full-rank (25.8M trainable vs 15.7M); the linear layers, where the
three differ, are what is compared. Without `lm_head` in the list the head stayed the frozen random original (the
first measurement, recorded in docs/benchmarks.md, was wrong for that reason). Low-rank and
SLTrain at lr 3e-3 (the official README's example and scripts/llm_pretrain/sltrain60m.sh), alpha 32. B = 0 and A
kaiming-uniform at the start, as the official SpLoRaLinear: the low-rank run starts from W = 0 in every block, SLTrain
from its random sparse S (the official initialisation of the values).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

TRAIN_REST = "[embed_tokens,lm_head,norm,input_layernorm,post_attention_layernorm]"
RUNS = {
    "full-rank": [],
    "full-rank lr=3e-3": ["optim.lr=3e-3"],  # the control at the low-rank runs' learning rate
    "low-rank r=32": ["adapter.method=sltrain", "adapter.targets=all-linear", "adapter.init=replace", "adapter.r=32",
                      "adapter.alpha=32", "adapter.sp_ratio=0.0", f"adapter.trainable={TRAIN_REST}", "optim.lr=3e-3"],
    "SLTrain r=28 d=0.0247": ["adapter.method=sltrain", "adapter.targets=all-linear", "adapter.init=replace",
                              "adapter.r=28", "adapter.alpha=32", "adapter.sp_ratio=0.0247",
                              f"adapter.trainable={TRAIN_REST}", "optim.lr=3e-3"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/sltrain.json")
    ap.add_argument("--only", default=None,
                    help="comma-separated run indices (0 full-rank, 1 full-rank at lr 3e-3, 2 low-rank, 3 SLTrain)")
    a = ap.parse_args()
    from lorakit.train.config import RECIPES_DIR, resolve
    from lorakit.train.loop import run_training

    out = {"steps": a.steps, "batch": a.batch, "load_avg_start": os.getloadavg(), "runs": {}}
    names = list(RUNS) if a.only is None else [list(RUNS)[int(i)] for i in a.only.split(",")]
    for name in names:
        over = RUNS[name]
        with tempfile.TemporaryDirectory() as d:
            cfg = resolve(RECIPES_DIR / "shakespeare-pretrain-full.yaml",
                          [*over, f"train.steps={a.steps}", f"data.batch_size={a.batch}", f"train.threads={a.threads}",
                           "train.eval_before=false", f"output.dir={d}"])
            res = run_training(cfg)
        m = res["metrics_after"]
        n_lin = res["trainable_params"]
        out["runs"][name] = {"trainable_params": n_lin, "val_perplexity": m.get("perplexity"),
                             "val_loss": m.get("loss"), "time_per_step_s": res.get("time_per_step_s"),
                             "peak_rss_mb": res.get("peak_rss_mb")}
        print(name, out["runs"][name], flush=True)
    out["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
