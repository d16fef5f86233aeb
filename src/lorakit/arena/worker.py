"""One arena run, in its own process: ``python -m lorakit.arena.worker`` reads a JSON spec on stdin and prints
``ARENA_RESULT {json}`` on its last line."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

BUDGETS = {"smoke": 4}  # optimiser steps; "default" keeps the recipe's own budget


def _recipe(task: str) -> Path:
    from ..train.config import recipe_path

    return recipe_path(f"{task}-lora")


def execute(spec: dict) -> dict:
    import torch

    from ..train.config import load_run_config
    from ..train.loop import run_training

    overrides = [f"train.seed={spec['seed']}", f"output.dir={spec['out']}", *spec.get("extra", [])]
    budget = spec.get("budget", "default")
    if budget != "default":
        steps = BUDGETS.get(budget, None) or int(budget)
        overrides += [f"train.max_steps={steps}"]
        if budget == "smoke":
            overrides += ["data.max_eval=16", "train.eval_every=0"]
    cfg = load_run_config(_recipe(spec["task"]), overrides, method=spec["method"])
    info: dict = {}
    if spec.get("lr_mult", 1.0) != 1.0:
        cfg.optim.lr = cfg.optim.lr * spec["lr_mult"]
    if spec.get("match_params") and spec["method"] != "lora":
        from .budget import match_budget, trainable_count
        from ..train.loop import meta_model_factory

        make_meta = meta_model_factory(cfg)
        lora_ref = {**cfg.adapter, "method": "lora"}
        lora_ref = {k: v for k, v in lora_ref.items() if k in ("method", "targets", "exclude", "r", "alpha",
                                                                   "layers", "trainable")}
        try:
            target = trainable_count(make_meta, lora_ref)
            cfg.adapter, info = match_budget(make_meta, dict(cfg.adapter), target)
        except Exception as e:
            info = {"matched": False, "reason": f"could not probe: {type(e).__name__}: {e}"}
    t0 = time.time()
    res = run_training(cfg, quiet=True)
    wall = time.time() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "metric_name": res.get("metric_name"),
        "metric": res.get("metric"),
        "metric_before": res.get("metric_before"),
        "metrics": res.get("metrics_after", {}),
        "metrics_before": res.get("metrics_before", {}),
        "trainable_params": res.get("trainable_params"),
        "adapter_bytes": res.get("adapter_bytes"),
        "time_per_step_s": res.get("time_per_step_s"),
        "tokens_per_s": res.get("tokens_per_s"),
        "loss_curve": res.get("loss_curve", []),
        "steps": res.get("steps"),
        "wall_s": wall,
        "peak_rss_mb": rss_kb / 1024.0,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "budget_info": info,
        "config": res.get("config"),
    }
    return out


def main() -> None:
    spec = json.loads(sys.stdin.read())
    res = execute(spec)
    sys.stdout.write("ARENA_RESULT " + json.dumps(res, default=str) + "\n")


if __name__ == "__main__":
    main()
