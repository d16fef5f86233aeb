"""Memory per rank: SmolLM2-135M + LoRA (the embedded default's adapter), one process vs FSDP2 / DDP with 2 ranks.

    PYTHONPATH=src python bench/fsdp_memory.py run --mode none --out /tmp/fsdp-mem
    PYTHONPATH=src python -m torch.distributed.run --nproc-per-node 2 bench/fsdp_memory.py run --mode fsdp --out /tmp/fsdp-mem
    PYTHONPATH=src python -m torch.distributed.run --nproc-per-node 2 bench/fsdp_memory.py run --mode ddp --out /tmp/fsdp-mem
    PYTHONPATH=src python bench/fsdp_memory.py report --out /tmp/fsdp-mem

Each rank records its peak RSS (``ru_maxrss``: includes loading the model, before sharding), its RSS after the
last training step (``/proc/self/statm``: the steady state while training) and the parameter elements it holds
(a sharded parameter counts its local shard). Same global batch (8 rows) and 5 steps in every mode.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def run(mode: str, out: Path, steps: int) -> None:
    from lorakit.train import run_training

    rank = int(os.environ.get("RANK", "0"))
    cfg = {
        "model": {"name": "smollm2-135m"},
        "adapter": {"method": "lora", "targets": "all-attention", "r": 8, "alpha": 16, "seed": 0},
        "optim": {"lr": 1e-3},
        "data": {"task": "sentiment-smollm2", "max_length": 64, "batch_size": 8, "eval_size": 16,
                 "eval_batch_size": 16},
        "train": {"steps": steps, "seed": 0, "eval_before": False, "distributed": mode, "threads": 1},
        "output": {"dir": str(out / f"run-{mode}")},
    }
    r = run_training(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rec = {"mode": mode, "world": world, "rank": rank, "peak_rss_mb": r["peak_rss_mb"],
           "rss_after_train_mb": r["rss_after_train_mb"], "params_this_rank": r.get("params_this_rank",
                                                                                    r["total_params"]),
           "total_params": r["total_params"], "loss_curve": r["loss_curve"], "time_per_step_s": r["time_per_step_s"]}
    (out / f"mem-{mode}-rank{rank}.json").write_text(json.dumps(rec))


def report(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("mem-*-rank*.json"))]
    print("| mode | ranks | rank | peak RSS (MB) | RSS after training (MB) | parameters held | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (["none", "ddp", "fsdp"].index(r["mode"]), r["rank"])):
        print(f"| {r['mode']} | {r['world']} | {r['rank']} | {r['peak_rss_mb']:.0f} | {r['rss_after_train_mb']:.0f} "
              f"| {r['params_this_rank'] / 1e6:.1f} M of {r['total_params'] / 1e6:.1f} M | {r['time_per_step_s']:.2f} |")
    curves = {r["mode"]: r["loss_curve"] for r in rows if r["rank"] == 0}
    if "none" in curves:
        for m, c in curves.items():
            print(f"{m}: max |loss - one process| over the steps = "
                  f"{max(abs(a - b) for a, b in zip(c, curves['none'])):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("--mode", default="none", choices=["none", "ddp", "fsdp"])
    ap.add_argument("--out", default="/tmp/fsdp-mem")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run(a.mode, out, a.steps) if a.what == "run" else report(out)


if __name__ == "__main__":
    main()
