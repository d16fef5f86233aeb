"""I-LoRA vs sequential LoRA vs replay-only LoRA over sentiment -> BBC News -> GSM8K on SmolLM2-135M-Instruct (the same
adapter, steps, batches, learning rate and seed for the three), writing the accuracy matrices and the summary.

    python bench/continual.py --steps 40 --eval-size 100 --out bench/results/continual.json

Each mode runs in its own process (a fresh model). GSM8K is scored by its SFT evaluation (token accuracy of the
completion under teacher forcing, lorakit's sft metric) so that every task has an accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-size", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/continual.json")
    a = ap.parse_args()
    res = {"steps_per_task": a.steps, "batch_size": a.batch_size, "lr": a.lr, "eval_size": a.eval_size,
           "load_avg_start": os.getloadavg(), "runs": {}}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for mode in ("sequential", "replay", "ilora"):
        tmp = Path(a.out).with_suffix(f".{mode}.json")
        cmd = [sys.executable, "-m", "lorakit", "continual", "--mode", mode, "--steps", str(a.steps),
               "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--eval-size", str(a.eval_size),
               "--max-length", str(a.max_length), "--out", str(tmp)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        res["runs"][mode] = json.loads(tmp.read_text())
        tmp.unlink()
    res["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    for mode, r in res["runs"].items():
        print(f"{mode:10s} avg acc {r['avg_acc']:.3f}  forgetting {r['forgetting']:.3f}  R={r['R']}")


if __name__ == "__main__":
    main()
