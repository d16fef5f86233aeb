"""One arena run: the recipe of the task + the method's paper settings + the arena's budget, trained by
:func:`lorakit.train.run_training` (exactly what ``lorakit train`` runs), measured and summarised as one record."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError

# Per task: the step/data budget of an arena run, as `key=value` overrides of the task's recipe.
#   default: the recipe's own budget (each run ~1-3 min on 2 CPU cores)
#   quick:   the budget of the committed arena (~4x shorter than default: ~15-40 s per run on 2 cores, so every
#            method x 3 tasks x 3 seeds fits in a few hours; enough to rank methods, not their best accuracy)
#   smoke:   a handful of steps on a few rows (CI: checks that records and the report are produced)
BUDGETS: dict[str, dict[str, list[str]]] = {
    # converged (Arena II, docs/arena.md "Convergence check"): the smallest budget where LoRA at the recipe rate has
    # std <= 0.03 over seeds 0-2 and moves <= 0.02 when the steps double. sentiment-minilm: 192 (0.822 +- 0.004;
    # 384: 0.809, -0.013); bbc-minilm: 96 (192: +0.005); sentiment-smollm2: 32 (64: +0.018).
    "sentiment-minilm": {"default": [], "quick": ["train.steps=24", "data.eval_size=300"],
                         "converged": ["train.steps=192", "data.eval_size=300"],
                         "smoke": ["train.steps=3", "data.train_size=96", "data.eval_size=24"]},
    "bbc-minilm": {"default": [], "quick": ["train.steps=24", "data.max_length=128", "data.eval_size=200"],
                   "converged": ["train.steps=96", "data.max_length=128", "data.eval_size=200"],
                   "smoke": ["train.steps=3", "data.train_size=96", "data.eval_size=24", "data.max_length=64"]},
    "sentiment-smollm2": {"default": [], "quick": ["train.steps=14", "data.eval_size=100"],
                          "converged": ["train.steps=32", "data.eval_size=200"],
                          "smoke": ["train.steps=3", "data.train_size=48", "data.eval_size=16"]},
    # the GSM8K recipe is a real SFT run (150 x 2 micro-batches of 320 tokens, 20 greedy answers: ~20 min on 2
    # cores); the arena's default cuts it to ~3 min: 12 steps of 4 rows (~7 s each), completion loss on 40 rows,
    # exact match on 4 greedy answers of <= 160 tokens
    "gsm8k-smollm2": {"default": ["train.steps=12", "train.grad_accum=1", "data.eval_size=40", "data.gen_samples=4",
                                  "data.max_new_tokens=160"],
                      "quick": ["train.steps=6", "train.grad_accum=1", "data.eval_size=32", "data.gen_samples=2",
                                "data.max_new_tokens=160"],
                      "smoke": ["train.steps=2", "data.train_size=16", "data.eval_size=8", "data.gen_samples=2",
                                "data.max_new_tokens=32"]},
    # sizes are per part (sentiment, BBC, GSM8K); not in the default arena: run with --tasks multitask-smollm2
    "multitask-smollm2": {"default": [], "quick": ["train.steps=10", "data.eval_size=16"],
                          "smoke": ["train.steps=2", "data.train_size=8", "data.eval_size=4"]},
}
# 2: intruders and forgetting measured against the model as loaded (a second copy), not the adapted model with
# adapters off; intruders None when no matrix has a dense update. Records without it predate that (arena run
# --rediagnose re-runs the ones it changes).
DIAGNOSTICS_VERSION = 2

# The task metric the arena ranks by (the others are recorded too).
PRIMARY = {"sentiment-minilm": "accuracy", "bbc-minilm": "macro_f1", "sentiment-smollm2": "accuracy",
           "gsm8k-smollm2": "loss", "multitask-smollm2": "mean_accuracy"}


def recipe(task: str) -> Path:
    from ..train.config import RECIPES_DIR

    p = RECIPES_DIR / f"{task}-lora.yaml"  # packaged: a wheel install has it
    if p.is_file():
        return p
    raise ConfigError(f"no recipe for arena task '{task}' (looked for {p})")


def budget_overrides(task: str, budget: str) -> list[str]:
    table = BUDGETS[task]
    if budget in table:
        return list(table[budget])
    try:
        steps = int(budget)
    except ValueError:
        raise ConfigError(f"unknown arena budget '{budget}'; use {', '.join(table)} or a number of steps") from None
    if steps < 1:
        raise ConfigError(f"arena budget must be >= 1 step, got {steps}")
    return [f"train.steps={steps}"]


def run_config(spec: dict):
    """The :class:`RunConfig` of one arena run (recipe < method file < budget < arena overrides < matched adapter)."""
    from ..train.config import resolve

    overrides = [*budget_overrides(spec["task"], spec.get("budget", "default")), f"train.seed={spec['seed']}",
                 f"adapter.seed={spec['seed']}", *spec.get("extra", [])]
    cfg = resolve(recipe(spec["task"]), overrides, method=spec["method"])
    if spec.get("lr_policy", "paper") == "recipe":  # every method at the task's (LoRA-tuned) rate
        cfg.optim.lr = resolve(recipe(spec["task"]), overrides).optim.lr
    if spec.get("adapter"):
        cfg.adapter = dict(spec["adapter"])
        cfg.adapter["seed"] = spec["seed"]
    if spec.get("lr") is not None:  # an explicit rate (the --tune-lr sweep and its chosen rate)
        cfg.optim.lr = float(spec["lr"])
    if spec.get("lr_mult", 1.0) != 1.0:
        cfg.optim.lr *= spec["lr_mult"]
    cfg.train.eval_before = bool(spec.get("eval_before", True))
    cfg.train.save_every = 0
    return cfg


def _dir_bytes(path: str | None) -> int | None:
    if not path or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def reference_seconds(threads: int | None = None, n: int = 256, reps: int = 30) -> float:
    """A fixed CPU/GPU workload timed in this process right before the run (median of ``reps`` (n x n) matmuls,
    after one untimed warm-up) at the run's torch thread count ``threads`` (None: the process's):
    ``time_per_step_s / reference_s`` compares methods across runs made under different machine load.

    The thread count matters: a run that trains on 1 thread (``train.threads=1``, one per core for N shards) but is
    referenced with torch's default pool times a multi-threaded matmul competing with the other shards for the
    cores, which is up to ~100x slower and varies from run to run; the ratio is then noise."""
    import statistics

    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)
    return statistics.median(times)


class _Diagnostics:
    """Arena diagnostics at the end of a run, both against the model *as loaded* (a second copy read after training,
    once the run's peak memory is taken): the intruder count over the adapted matrices (None when no matrix has a
    dense update: routed mixtures) and, for causal LMs, the perplexity ratio on the held-out general text. The model
    with adapters off is not that reference for a residual init, a quantised or compressed base, or weights trained
    in place (``lorakit.diagnostics``, "The reference is the model as loaded")."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = self.tok = None

    def on_attach(self, model, tok=None):
        self.model, self.tok = model, tok

    def _as_loaded(self):
        from ..tasks import get_task
        from ..train.loop import load_fresh

        base, _ = load_fresh(get_task(self.cfg.data.task, self.cfg.data), self.cfg.model.name, self.cfg.model.dtype)
        return base.to(next(self.model.parameters()).device).eval()

    def on_train_end(self, result: dict) -> None:
        from ..diagnostics import forgetting_perplexity, intruder_report

        m = self.model
        if m is None:
            return
        try:
            base = self._as_loaded()
        except Exception as e:  # noqa: BLE001 - a diagnostic never fails a run
            result["diagnostics_error"] = f"{type(e).__name__}: {e}"[:200]
            return
        try:
            rep = intruder_report(m, base=base)
            result["intruders"] = sum(rep.values()) if rep else None
        except Exception as e:  # noqa: BLE001
            result["diagnostics_error"] = f"intruders: {type(e).__name__}: {e}"[:200]
        if self.tok is not None and hasattr(m, "generate") and type(m).__name__.endswith("CausalLM"):
            try:
                result["forgetting"] = forgetting_perplexity(m, self.tok, seq=128, chunks=4, base=base)
            except Exception as e:  # noqa: BLE001 - the asset may be missing
                result["forgetting"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        result["diagnostics_version"] = DIAGNOSTICS_VERSION


class _AlsoEvaluate:
    """Arena ``--tune-lr``: a sweep run (scored on the validation split) also scores ``split`` after training, so the
    tune seed's test run at the chosen rate is that same trained model, not a second training of the same config."""

    def __init__(self, data_cfg, split: str):
        self.data_cfg, self.split = data_cfg, split
        self.model = self.tok = None

    def on_attach(self, model, tok=None):
        self.model, self.tok = model, tok

    def on_train_end(self, result: dict) -> None:
        import dataclasses

        from ..tasks import get_task

        task = get_task(self.data_cfg.task, dataclasses.replace(self.data_cfg, eval_split=self.split))
        rows = task.rows()["eval"]
        self.model.eval()
        result[f"metrics_{self.split}"] = task.evaluate(self.model, self.tok, task.encode(rows, self.tok),
                                                        self.data_cfg.eval_batch_size)


def execute(spec: dict) -> dict:
    """Train one run and return its measurements (the record minus the run's identity and environment)."""
    import torch

    from ..train.loop import run_training

    cfg = run_config(spec)
    ref_threads = cfg.train.threads or torch.get_num_threads()
    ref_s = reference_seconds(ref_threads)
    callbacks = []
    if spec.get("diagnostics"):
        callbacks = [_Diagnostics(cfg)]
    if spec.get("also_eval"):
        callbacks.append(_AlsoEvaluate(cfg.data, spec["also_eval"]))
    keep = spec.get("keep_dir")
    out = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lorakit-arena-"))
    cfg.output.dir = str(out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        res = run_training(cfg, callbacks=callbacks)
        wall = time.perf_counter() - t0
        size = _dir_bytes(res.get("adapter_dir"))
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    metric = PRIMARY.get(spec["task"], "loss")
    after, before = res.get("metrics_after") or {}, res.get("metrics_before") or {}
    return {
        "metric_name": metric,
        "metric": after.get(metric),
        "metric_before": before.get(metric),
        "metrics": after,
        "metrics_before": before,
        "trainable_params": res.get("trainable_params"),
        "total_params": res.get("total_params"),
        "adapter_bytes": size,
        "steps": res.get("steps"),
        "wall_s": wall,
        "train_s": res.get("train_time_s"),
        "time_per_step_s": res.get("time_per_step_s"),
        "reference_s": ref_s,
        "reference_threads": ref_threads,
        "time_per_step_norm": (res.get("time_per_step_s") or float("nan")) / ref_s if ref_s else None,
        "intruders": res.get("intruders"),
        "forgetting_ratio": (res.get("forgetting") or {}).get("ratio"),
        "forgetting": res.get("forgetting"),
        "diagnostics_version": res.get("diagnostics_version"),
        **({"diagnostics_error": res["diagnostics_error"]} if res.get("diagnostics_error") else {}),
        "tokens_per_s": res.get("tokens_per_s"),
        "peak_rss_mb": res.get("peak_rss_mb"),
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "loss_curve": [round(float(x), 5) for x in res.get("loss_curve", [])],
        "config": res.get("config"),
        **({f"metrics_{spec['also_eval']}": res.get(f"metrics_{spec['also_eval']}")} if spec.get("also_eval") else {}),
    }


def main() -> None:  # python -m lorakit.arena.worker < spec.json  (the --isolate spawn mode)
    import importlib

    spec = json.loads(sys.stdin.read())
    for mod in spec.get("plugins") or []:
        importlib.import_module(mod)
    res = execute(spec)
    sys.stdout.write("ARENA_RESULT " + json.dumps(res, default=str) + "\n")


if __name__ == "__main__":
    main()
