"""``lorakit arena run``: every (method, task, seed) trained through the same path as ``lorakit train``.

Each run happens in its own subprocess (so peak RSS is the run's own and a crash cannot take the arena down) and
is appended as one JSON object to ``<out>/runs.jsonl``. Runs already recorded are skipped, so an interrupted
arena resumes where it stopped; failures are recorded with their error and the arena goes on.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..core import REGISTRY, get_method
from ..errors import ConfigError

log = logging.getLogger(__name__)

TASKS = ("sentiment-minilm", "bbc-minilm", "sentiment-smollm2", "gsm8k-smollm2")
DEFAULT_TASKS = ("sentiment-minilm", "bbc-minilm", "sentiment-smollm2")
LORA_LR_SWEEP = (0.5, 1.0, 2.0)  # multiples of the recipe's learning rate, for the LoRA baseline


@dataclass
class ArenaPlan:
    methods: list[str]
    tasks: list[str]
    seeds: list[int]
    budget: str = "default"  # "default" | "smoke" | an integer number of optimiser steps
    out: Path = Path("arena/results")
    match_params: bool = True
    lr_sweep: bool = True
    extra: list[str] = field(default_factory=list)  # key=value overrides for every run


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[3], timeout=5).stdout.strip() or None
    except Exception:
        return None


def environment() -> dict:
    versions = {}
    for pkg in ("lorakit", "torch", "transformers", "safetensors", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    hw = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
          "python": platform.python_version()}
    try:
        import torch

        hw["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            hw["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return {"git_rev": git_revision(), "versions": versions, "hardware": hw}


def read_records(out: Path) -> list[dict]:
    f = Path(out) / "runs.jsonl"
    if not f.is_file():
        return []
    recs = []
    for line in f.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a corrupt line in %s", f)
    return recs


def _append(out: Path, rec: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def expand(plan: ArenaPlan) -> list[dict]:
    """The list of runs: one per (task, method variant, seed). LoRA gets the learning-rate sweep."""
    runs = []
    for task in plan.tasks:
        for method in plan.methods:
            variants = [("", 1.0)]
            if method == "lora" and plan.lr_sweep:
                variants = [(f"lr x{m:g}" if m != 1.0 else "", m) for m in LORA_LR_SWEEP]
            for vname, lr_mult in variants:
                for seed in plan.seeds:
                    variant = method + (f" ({vname})" if vname else "")
                    runs.append({"key": f"{task}|{variant}|{seed}", "task": task, "method": method,
                                 "variant": variant, "seed": seed, "lr_mult": lr_mult})
    return runs


def run_arena(plan: ArenaPlan, *, inprocess: bool = False, progress=None) -> list[dict]:
    unknown = [m for m in plan.methods if m not in REGISTRY]
    if unknown:
        get_method(unknown[0])  # raises with the registered list
    bad = [t for t in plan.tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"unknown arena task '{bad[0]}'; tasks: {', '.join(TASKS)}")
    done = {r["key"] for r in read_records(plan.out)}
    env = environment()
    todo = [r for r in expand(plan) if r["key"] not in done]
    new = []
    for i, run in enumerate(todo):
        if progress:
            progress(i, len(todo), run)
        t0 = time.time()
        spec = {**run, "budget": plan.budget, "match_params": plan.match_params, "extra": plan.extra,
                "out": str(plan.out / "adapters" / run["key"].replace("|", "__").replace(" ", "_"))}
        try:
            res = _run_inprocess(spec) if inprocess else _run_subprocess(spec)
            rec = {**run, "status": "ok", **res}
        except Exception as e:  # recorded, the arena goes on
            rec = {**run, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
        rec.update(env)
        rec["wall_s"] = rec.get("wall_s", time.time() - t0)
        rec["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _append(plan.out, rec)
        new.append(rec)
    return new


def _run_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "lorakit.arena.worker"], input=json.dumps(spec), text=True,
                          capture_output=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ARENA_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"run failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len("ARENA_RESULT "):])


def _run_inprocess(spec: dict) -> dict:
    from .worker import execute

    return execute(spec)
