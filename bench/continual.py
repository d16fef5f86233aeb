"""I-LoRA vs sequential LoRA vs replay-only LoRA over sentiment -> BBC News -> GSM8K on SmolLM2-135M-Instruct (the same
adapter, steps, batches, learning rate and seed for the three), writing the accuracy matrices and the summary.

    python bench/continual.py --steps 40 --eval-size 100 --out bench/results/continual.json

Each mode runs in its own process (a fresh model); the output file is rewritten after each mode (a cut run keeps the
finished modes) and ``--modes`` runs a subset, merged into an existing ``--out`` file with the same settings. GSM8K
is scored by its SFT evaluation, the completion's loss under teacher forcing (``lorakit continual`` falls back to the
loss where a task has no accuracy; it is left out of the average accuracy and forgetting).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
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
    ap.add_argument("--modes", default="sequential,replay,ilora", help="comma-separated subset, run in this order")
    a = ap.parse_args()
    res = {"steps_per_task": a.steps, "batch_size": a.batch_size, "lr": a.lr, "eval_size": a.eval_size,
           "max_length": a.max_length, "threads": a.threads, "load_avg_start": os.getloadavg(), "runs": {},
           "wall_seconds": {}}
    if Path(a.out).is_file():  # merge with the finished modes of an earlier run of the same settings
        old = json.loads(Path(a.out).read_text())
        if all(old.get(k) == res[k] for k in ("steps_per_task", "batch_size", "lr", "eval_size", "max_length")):
            res["runs"], res["wall_seconds"] = old.get("runs", {}), old.get("wall_seconds", {})
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for mode in a.modes.split(","):
        tmp = Path(a.out).with_suffix(f".{mode}.json")
        cmd = [sys.executable, "-m", "lorakit", "continual", "--mode", mode, "--steps", str(a.steps),
               "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--eval-size", str(a.eval_size),
               "--max-length", str(a.max_length), "--out", str(tmp)]
        print(" ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        res["wall_seconds"][mode] = round(time.perf_counter() - t0, 1)
        res["runs"][mode] = json.loads(tmp.read_text())
        tmp.unlink()
        res["load_avg_end"] = os.getloadavg()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        part = Path(a.out).with_suffix(f".tmp{os.getpid()}")
        part.write_text(json.dumps(res, indent=1) + "\n")
        os.replace(part, a.out)
    for mode, r in res["runs"].items():
        print(f"{mode:10s} avg acc {r['avg_acc']:.3f}  forgetting {r['forgetting']:.3f}  R={r['R']}")


if __name__ == "__main__":
    main()
