"""Arena II convergence check (issue 22, item 1): is the LoRA baseline stable at a budget?

For each task, LoRA at the task recipe's rate runs seeds 0, 1, 2 at each step count given (e.g. 24, 48, 96):
budget B is *converged* when the metric's std over the seeds is <= 0.03 and its mean moves by <= 0.02 when the
steps double (B -> 2B, both in the list). The smallest converged B per task is the budget to use for the arena.

Runs go through ``lorakit.arena.run_arena`` (the same path as every arena run: resumable, one process per run),
one results directory per step count under ``--out``; rerunning the command only runs what is missing.

    PYTHONPATH=src python bench/arena_convergence.py --tasks sentiment-minilm --steps 24,48,96 \
        --set data.eval_size=300 --out /tmp/arena-convergence

Prints one table per task (steps, per-seed metrics, mean, std, change from the half budget, converged?) and the
smallest converged budget. Timings are not measured here; run it on an idle machine or note the load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from lorakit.arena import ArenaPlan, read_records, run_arena

STD_MAX = 0.03
MOVE_MAX = 0.02


def table(by_steps: dict[int, dict[int, float]]) -> tuple[list[list], int | None]:
    """Rows (steps, seeds' metrics, mean, std, change from steps/2, converged) and the smallest converged budget."""
    rows, best = [], None
    stats = {b: (statistics.fmean(m.values()), statistics.stdev(m.values()) if len(m) > 1 else float("nan"))
             for b, m in sorted(by_steps.items()) if m}
    for b, (mean, std) in stats.items():
        half = stats.get(b // 2) if b % 2 == 0 else None
        move = mean - half[0] if half else None
        double = stats.get(2 * b)
        ok = (len(by_steps[b]) >= 3 and std <= STD_MAX and double is not None and abs(double[0] - mean) <= MOVE_MAX)
        if ok and best is None:
            best = b
        rows.append([b, ", ".join(f"{v:.3f}" for _, v in sorted(by_steps[b].items())), f"{mean:.3f}", f"{std:.3f}",
                     "—" if move is None else f"{move:+.3f}",
                     "yes" if ok else ("?" if double is None else "no")])
    return rows, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sentiment-minilm,bbc-minilm,sentiment-smollm2")
    ap.add_argument("--steps", default="24,48,96", help="comma-separated step counts (B and 2B pairs)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--isolate", default="fork", choices=["fork", "spawn", "none"])
    ap.add_argument("--out", default="arena/convergence")
    a = ap.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    steps = sorted({int(s) for s in a.steps.split(",")})
    seeds = [int(s) for s in a.seeds.split(",")]
    for b in steps:
        plan = ArenaPlan(methods=["lora"], tasks=tasks, seeds=seeds, budget=str(b), out=Path(a.out) / f"steps-{b}",
                         lr_sweep=False, lr_policy="recipe", extra=list(a.set), isolate=a.isolate, diagnostics=False)
        run_arena(plan, progress=True)
    for task in tasks:
        by_steps = {}
        for b in steps:
            recs = [r for r in read_records(Path(a.out) / f"steps-{b}") if r["task"] == task
                    and r.get("status") == "ok" and r.get("metric") is not None]
            by_steps[b] = {r["seed"]: r["metric"] for r in recs}
        rows, best = table(by_steps)
        metric = next((r["metric_name"] for r in read_records(Path(a.out) / f"steps-{steps[0]}")
                       if r["task"] == task and r.get("metric_name")), "metric")
        print(f"\n{task} ({metric}): LoRA at the recipe rate, seeds {seeds}")
        print("| steps | per seed | mean | std | change from steps/2 | converged (std <= 0.03, moves <= 0.02 at 2x) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
        print(f"smallest converged budget: {best if best is not None else 'none in ' + a.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
