"""Per-step cost and a short-budget outcome of the LoRA-aware procedures (issue 17 part 2) against adamw, side by side
in one run on the same task, model, data order and seed.

    PYTHONPATH=src python bench/loraopt.py --steps 12 --eval-size 50

Runs `lorakit train` (run_training) on the demo recipe (SmolLM2-135M-Instruct, sentiment, LoRA r=8 on q/k/v/o) once
per procedure and prints the median step time (steps 2..N), its ratio to adamw, the last training loss, the
accuracy after training and, for lorapro, the logged equivalent-gradient errors. ALLoRA runs with alpha = r (it is
scaling-free) and so does its adamw control `adamw(s=1)`. Timings on a shared CPU are noisy: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from lorakit.train import resolve, run_training

RUNS = [("adamw", "sentiment-smollm2-lora", []),
        ("adamw(s=1)", "sentiment-smollm2-lora", ["adapter.alpha=8"]),
        ("allora", "sentiment-smollm2-allora", []),
        ("lorapro", "sentiment-smollm2-lorapro", ["adapter.rslora=false"]),
        ("ggpo", "sentiment-smollm2-ggpo", []),
        ("mgpo", "sentiment-smollm2-mgpo", []),
        ("flexora", "sentiment-smollm2-flexora", [])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eval-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe, extra in RUNS:
            if a.only and label not in a.only:
                continue
            out = Path(tmp) / label
            cfg = resolve(recipe, [*extra, f"train.steps={a.steps}", f"data.eval_size={a.eval_size}",
                                   f"train.threads={a.threads}", "train.eval_before=false",
                                   f"data.batch_size={a.batch}", f"data.max_length={a.max_length}", "train.log_every=1",
                                   "optim.log_every=1" if label == "lorapro" else "train.log_every=1",
                                   f"output.dir={out}", "output.save_adapter=false"])
            r = run_training(cfg)
            recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
            train = [x for x in recs if x.get("event") == "train"]
            t = statistics.median(x["step_time_s"] for x in train[1:])
            err = [x["procedure/equiv_grad_rel_error"] for x in train if "procedure/equiv_grad_rel_error" in x]
            lerr = [x["procedure/lora_grad_rel_error"] for x in train if "procedure/lora_grad_rel_error" in x]
            rows.append((label, t, r["loss_curve"][-1], r["metrics_after"].get("accuracy", float("nan")),
                         (statistics.mean(err), statistics.mean(lerr)) if err else None))
    base = next(t for label, t, *_ in rows if label == "adamw")
    print(f"load average: {os.getloadavg()}")
    print(f"{'procedure':12s} {'s/step':>8s} {'x adamw':>8s} {'last loss':>10s} {'acc':>6s}  notes")
    for label, t, loss, acc, err in rows:
        note = f"equiv-grad rel. error {err[0]:.3f} (plain LoRA {err[1]:.3f})" if err else ""
        print(f"{label:12s} {t:8.3f} {t / base:8.2f} {loss:10.4f} {acc:6.3f}  {note}")


if __name__ == "__main__":
    main()
