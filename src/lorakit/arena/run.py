"""``lorakit arena run``: every (method, task, seed) trained through the same path as ``lorakit train``.

Order: seed-major (every method on every task for seed 0, then seed 1, ...), so an arena cut short still covers
every method; with ``lr_tuning`` task by task (a task's sweep, then its seeds), so it holds whole tasks. Each run happens in its own process: forked from a clean fork server that has the imports loaded
(``isolate="fork"``: imports paid once, and no OpenMP state inherited from a parent that already computed, which
can deadlock a plain fork), or a fresh interpreter (``"spawn"``). Its peak RSS is its own and a crash cannot take
the arena down. ``plugins`` are modules imported by the arena and every run (your own registered methods). Each record is
appended as one JSON line to ``<out>/runs.jsonl`` (fsynced); runs already recorded are skipped, so an interrupted
arena resumes where it stopped; failures are recorded with their error and the arena goes on.

Budget matching happens here, once per (task, method), on the task's model built on the meta device.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..core import REGISTRY, get_method
from ..errors import ConfigError
from ..procedures.base import DEFAULT_PROCEDURE

log = logging.getLogger(__name__)

TASKS = ("sentiment-minilm", "bbc-minilm", "sentiment-smollm2", "gsm8k-smollm2", "multitask-smollm2")
DEFAULT_TASKS = ("sentiment-minilm", "bbc-minilm", "sentiment-smollm2")
BASELINE = "lora"  # the default baseline: every method's trainable parameters are matched to its count on the task,
# and every method is compared against it (paired over seeds); its first run of a (task, seed) also scores the
# untrained model. ``--baseline`` picks another registered method.
BASELINE_LR_SWEEP = (0.3, 1.0, 3.0)  # multiples of the recipe's learning rate, for the baseline (without --tune-lr)

TUNE_EXTEND = 3  # then at most this many stages more, each x2 (or x0.5) beyond a best rate at an open edge
TUNE_EDGE = 2.5  # a side of the best rate is closed when a tried rate lies within this factor of it


@dataclass
class ArenaPlan:
    methods: list[str]
    tasks: list[str]
    seeds: list[int]
    budget: str = "default"  # a key of worker.BUDGETS ("default", "quick", "smoke") or a number of steps
    out: Path = Path("arena/results")
    match_params: bool = True
    lr_sweep: bool = True
    extra: list[str] = field(default_factory=list)  # key=value overrides for every run
    timeout_s: float = 3600.0
    isolate: str = "fork"  # "fork" (from a clean fork server) | "spawn" | "none" (in this process: tests)
    plugins: list[str] = field(default_factory=list)  # modules that register extra methods (imported everywhere)
    lr_policy: str = "paper"  # "paper": configs/methods/<m>.yaml's rate; "recipe": the task's LoRA-tuned rate for all
    procedures: list[str] = field(default_factory=lambda: [DEFAULT_PROCEDURE])  # the second axis: optim.name
    shard: tuple[int, int] | None = None  # (i, N): this process runs the (task, method, procedure) cells i mod N
    backend: str = "local"  # "local" (this machine, one run at a time) | "ray" (tasks on an existing Ray cluster)
    ray_address: str | None = None  # ray.init(address=...); None: "auto" (a running cluster) or a local instance
    diagnostics: bool = True  # per run: intruder dimensions and (causal LMs) forgetting perplexity
    lr_tuning: bool = False  # per cell: choose the rate on the validation split (one seed), then the seeds on test
    lr_extend: int = TUNE_EXTEND  # sweep stages beyond a best rate at an open edge of the rates tried (0: none)
    tune_seed: int | None = None  # the sweep's seed (default: the first of ``seeds``)
    baseline: str = BASELINE  # the method the others are matched to and compared against
    # methods whose recorded test runs are run again when their diagnostics predate the current measurement
    # (worker.DIAGNOSTICS_VERSION): the new record replaces the old one under the same key
    rediagnose: list[str] = field(default_factory=list)


def git_revision(exclude: Path | None = None) -> str | None:
    """The checkout's short revision, ``+dirty`` when tracked files changed; changes under ``exclude`` (the arena's
    own results directory, whose committed records grow while it runs) do not count."""
    try:
        root = Path(__file__).resolve().parents[3]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                             timeout=5).stdout.strip()
        spec = []
        if exclude is not None:
            try:
                spec = ["--", ".", f":(exclude){Path(exclude).resolve().relative_to(root)}"]
            except ValueError:  # outside the checkout
                pass
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *spec], capture_output=True,
                               text=True, cwd=root, timeout=5).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def environment(out: Path | None = None) -> dict:
    versions = {}
    for pkg in ("lorakit", "torch", "transformers", "safetensors", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    hw = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        hw["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            hw["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            hw["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"git_rev": git_revision(exclude=out), "versions": versions, "hardware": hw}


def read_records(out: Path) -> list[dict]:
    """Every record of ``out``: ``runs.jsonl`` and the shards' ``runs-shard-I-of-N.jsonl`` (one file per writer,
    so processes on several machines sharing the directory never interleave a line). A run recorded twice (an
    ``error`` retried by a later ``arena run``) counts once: the later record replaces the earlier one, in place."""
    recs = []
    for f in sorted(Path(out).glob("runs*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:  # a run killed mid-write: that run is simply redone
                    log.warning("%s line %d is not valid JSON (an interrupted write?); ignored", f, i)
    latest: dict = {}
    for n, rec in enumerate(recs):
        latest[rec.get("key", ("unkeyed", n))] = rec
    return list(latest.values())


def records_file(plan: "ArenaPlan") -> str:
    return "runs.jsonl" if plan.shard is None else f"runs-shard-{plan.shard[0]}-of-{plan.shard[1]}.jsonl"


def _append(out: Path, rec: dict, name: str = "runs.jsonl") -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    torn = False  # a run killed mid-write leaves a line without its newline: start on a fresh line, or the new
    if path.exists() and path.stat().st_size:  # record would be glued to the torn one and lost with it
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cell_shard(task: str, method: str, procedure: str, n: int) -> int:
    """The shard of a (task, method, procedure) cell: a stable hash, so every seed and rate of a cell (and its
    baseline comparison inside the same task) can be joined by one report whatever ran where."""
    import zlib

    return zlib.crc32(f"{task}|{method}|{procedure}".encode()) % n


def variant_name(method: str, proc: str) -> str:
    """A cell's name in records and reports: the method, ``"method + procedure"`` for another procedure."""
    return method if proc == DEFAULT_PROCEDURE else f"{method} + {proc}"


def procedure_overrides(proc: str) -> list[str]:
    """The ``--set`` overrides that make a run train with procedure ``proc``."""
    return [] if proc == DEFAULT_PROCEDURE else [f"optim.name={proc}"]


def cell_of(run: dict) -> tuple[str, str, str]:
    """A run's (task, method, procedure) cell (records made before the procedure axis: the default procedure)."""
    return run["task"], run["method"], run.get("procedure", DEFAULT_PROCEDURE)


def is_baseline(plan: "ArenaPlan", run: dict) -> bool:
    """Whether ``run`` is the baseline method under the default procedure (the reference of its task)."""
    return run["method"] == plan.baseline and run.get("procedure", DEFAULT_PROCEDURE) == DEFAULT_PROCEDURE


def expand(plan: ArenaPlan) -> list[dict]:
    """The runs, seed-major: one per (seed, task, method variant, procedure). The baseline also gets the
    learning-rate sweep (without ``lr_tuning``). Procedures other than the default are a second axis
    (``variant = "method + procedure"``, ``optim.name``)."""
    runs = []
    for seed in plan.seeds:
        for task in plan.tasks:
            for proc in plan.procedures:
                for method in plan.methods:
                    if plan.shard is not None and cell_shard(task, method, proc, plan.shard[1]) != plan.shard[0]:
                        continue
                    variants = [("", 1.0)]
                    if is_baseline(plan, {"method": method, "procedure": proc}) and plan.lr_sweep \
                            and not plan.lr_tuning:
                        variants = [(f"lr x{m:g}" if m != 1.0 else "", m) for m in BASELINE_LR_SWEEP]
                    for vname, lr_mult in variants:
                        variant = variant_name(method, proc) + (f" ({vname})" if vname else "")
                        runs.append({"key": f"{task}|{variant}|{seed}", "task": task, "method": method,
                                     "procedure": proc, "variant": variant, "seed": seed, "lr_mult": lr_mult,
                                     "budget": plan.budget, "lr_policy": policy(plan), "baseline": plan.baseline,
                                     **({"phase": "test"} if plan.lr_tuning else {})})
    return runs


def policy(plan: "ArenaPlan") -> str:
    """The learning-rate policy recorded with every run: ``tuned`` (``--tune-lr``), else ``paper`` / ``recipe``."""
    return "tuned" if plan.lr_tuning else plan.lr_policy


TUNE_NEIGHBOURS = (0.5, 2.0)  # after the first stage, the better rate's neighbours
SWEEP_FAILED = "not run: no run of the learning-rate sweep succeeded (see its phase=sweep records)"


def _lr_key(lr: float) -> str:
    return f"{lr:.3g}"


def sweep_run(plan: "ArenaPlan", cell: tuple[str, str, str], lr: float, stage: int) -> dict:
    """One run of a cell's learning-rate sweep: the tune seed, ``data.eval_split=validation``, an explicit rate."""
    task, method, proc = cell
    seed = plan.tune_seed if plan.tune_seed is not None else plan.seeds[0]
    variant = variant_name(method, proc)
    return {"key": f"{task}|{variant}|sweep lr={_lr_key(lr)}|{seed}", "task": task, "method": method,
            "procedure": proc, "variant": variant, "seed": seed, "lr_mult": 1.0, "lr": lr, "phase": "sweep",
            "sweep_stage": stage, "eval_split": "validation", "also_eval": "test", "budget": plan.budget,
            "lr_policy": policy(plan), "baseline": plan.baseline}


def candidate_rates(plan: "ArenaPlan", cell: tuple[str, str, str]) -> dict[str, float]:
    """The first stage of a cell's sweep: ``{"paper": the method file's rate, "recipe": the task's LoRA-tuned
    rate}`` (one entry when they are equal), as the run would resolve them (budget and ``--set`` included)."""
    from .worker import run_config

    task, method, proc = cell
    spec = {"task": task, "method": method, "seed": 0, "budget": plan.budget,
            "extra": list(plan.extra) + procedure_overrides(proc)}
    paper = float(run_config({**spec, "lr_policy": "paper"}).optim.lr)
    recipe = float(run_config({**spec, "lr_policy": "recipe"}).optim.lr)
    return {"paper": paper} if _lr_key(paper) == _lr_key(recipe) else {"paper": paper, "recipe": recipe}


def open_edge(rates, best: float | None) -> str | None:
    """Whether the chosen rate ``best`` sits at an open edge of the rates tried (failed runs count as tried):
    ``"up"`` when no tried rate lies above it within :data:`TUNE_EDGE` (a higher rate may be better), ``"down"``
    likewise below, else None (bracketed on both sides)."""
    if best is None:
        return None
    above = [x for x in rates if x > best * (1 + 1e-6)]
    below = [x for x in rates if x < best * (1 - 1e-6)]
    if not above or min(above) > best * TUNE_EDGE:
        return "up"
    if not below or max(below) < best / TUNE_EDGE:
        return "down"
    return None


def beyond_edge(results: dict[float, float | None], lower_is_better: bool) -> float | None:
    """The next rate of a sweep whose best rate is at an open edge (x2 above it, or x0.5 below); None when the best
    is bracketed or no run has a metric."""
    best = choose_rate(results, lower_is_better)
    side = open_edge(list(results), best)
    return None if side is None else best * (2.0 if side == "up" else 0.5)


def choose_rate(results: dict[float, float | None], lower_is_better: bool) -> float | None:
    """The rate with the best validation metric (ties: the smaller rate); None when no sweep run has a metric."""
    ok = {lr: m for lr, m in results.items() if m is not None and math.isfinite(m)}
    if not ok:
        return None
    return min(ok, key=lambda lr: ((ok[lr] if lower_is_better else -ok[lr]), lr))


def _import_plugins(names) -> None:
    import importlib

    for mod in names:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"arena plugin '{mod}' cannot be imported: {e}") from None


def validate(plan: ArenaPlan) -> None:
    _import_plugins(plan.plugins)
    unknown = [m for m in [*plan.methods, plan.baseline, *plan.rediagnose] if m not in REGISTRY]
    if unknown:
        get_method(unknown[0])  # raises, naming the registered methods
    bad = [t for t in plan.tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"unknown arena task '{bad[0]}'; arena tasks: {', '.join(TASKS)}")
    if not plan.methods or not plan.tasks or not plan.seeds:
        raise ConfigError("the arena needs at least one method, one task and one seed")
    if plan.lr_policy not in ("paper", "recipe"):
        raise ConfigError(f"lr_policy must be paper or recipe, not {plan.lr_policy!r}")
    if plan.isolate not in ("fork", "spawn", "none"):
        raise ConfigError(f"isolate must be fork, spawn or none, not {plan.isolate!r}")
    if plan.backend not in ("local", "ray"):
        raise ConfigError(f"backend must be local or ray, not {plan.backend!r}")
    if plan.rediagnose and not plan.diagnostics:
        raise ConfigError("rediagnose re-runs records to measure their diagnostics: it needs diagnostics on")
    outside = [m for m in plan.rediagnose if m not in plan.methods]
    if outside:
        raise ConfigError(f"rediagnose names {outside}, which this arena does not run (--methods)")
    if plan.shard is not None:
        i, n = plan.shard
        if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
            raise ConfigError(f"shard {i}/{n}: give i/N with 0 <= i < N (e.g. --shard 0/4)")
    from ..procedures import PROCEDURES

    badp = [p for p in plan.procedures if p not in PROCEDURES]
    if badp or not plan.procedures:
        raise ConfigError(f"unknown procedure(s) {badp or plan.procedures}; registered: {', '.join(sorted(PROCEDURES))}")
    from .worker import budget_overrides

    for t in plan.tasks:
        budget_overrides(t, plan.budget)


def _context_note(adapter: dict, provided) -> str | None:
    """The note for a method that reads per-batch context the task's data never provides (task ids on a single-task
    set, mixture weights): it runs without it, as ``lorakit train`` would on that data."""
    from ..inject import missing_context

    try:
        missing = missing_context(adapter, provided)
    except Exception as e:  # noqa: BLE001 - a config that does not resolve is reported by its run, not here
        log.debug("context keys of %s: %s", adapter.get("method"), e)
        return None
    return (f"reads the per-batch context {', '.join(missing)}, which this task never provides: that part of the "
            "method is off (a task-routed method sees every example as one task)") if missing else None


def budgets(plan: ArenaPlan, pairs: set[tuple[str, str]] | None = None,
            cache: Path | None = None) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(task, method) -> (adapter config to run, budget info), matched to the baseline's trainable count on the
    task (``plan.baseline``, LoRA by default).

    ``pairs`` limits the work to the runs still to do; ``cache`` (a JSON file) keeps decisions between
    invocations, keyed by everything that determines them (task, method, budget, overrides, method settings)."""
    from ..tasks import get_task
    from .budget import fit_targets, match_budget, trainable_count
    from .worker import run_config

    table: dict[tuple[str, str], tuple[dict, dict]] = {}
    memo = {}
    if cache is not None and cache.is_file():
        try:
            memo = json.loads(cache.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; budgets are recomputed", cache)
    for task in plan.tasks:
        if pairs is not None and not any(t == task for t, _ in pairs):
            continue
        spec0 = {"task": task, "method": plan.baseline, "seed": 0, "budget": plan.budget, "extra": plan.extra}
        cfg0 = run_config(spec0)
        t = get_task(cfg0.data.task, cfg0.data)
        make_meta = lambda t=t, name=cfg0.model.name: t.meta_model(name)  # noqa: E731
        ref = dict(cfg0.adapter)
        target = trainable_count(make_meta, ref)
        for method in plan.methods:
            if pairs is not None and (task, method) not in pairs:
                continue
            try:
                cfg = run_config({**spec0, "method": method})
            except Exception as e:  # e.g. a method file that does not validate: its runs are recorded as errors
                table[(task, method)] = ({"method": method}, {"matched": False, "target": target,
                                                              "skip": f"its config does not resolve: {e}"[:500]})
                continue
            key = json.dumps([task, method, plan.budget, plan.extra, plan.match_params, cfg.adapter, ref],
                             sort_keys=True, default=str)
            if key in memo:
                table[(task, method)] = tuple(memo[key])
                continue
            adapter, note = fit_targets(make_meta, dict(cfg.adapter), ref.get("targets"))
            notes = [x for x in (note, _context_note(adapter, t.context_keys)) if x]
            if method == plan.baseline or not plan.match_params:
                try:
                    n = trainable_count(make_meta, adapter)
                except Exception as e:
                    n = None
                    log.debug("count failed for %s: %s", method, e)
                info = {"matched": method == plan.baseline, "trainable": n, "target": target,
                        **({"reason": "matching disabled"} if method != plan.baseline else {}),
                        **({"notes": notes} if notes else {})}
                table[(task, method)] = (adapter, info)
                continue
            try:
                table[(task, method)] = match_budget(make_meta, adapter, target)
                same = {**adapter, "targets": ref.get("targets"), "exclude": ref.get("exclude")}
                if not table[(task, method)][1]["matched"] and adapter.get("targets") != same["targets"]:
                    # the method's own targets (all linear layers, several experts each) cannot come down to
                    # the budget: try it on the baseline's targets before giving up on matching (a method that cannot
                    # adapt those layers at all keeps the first attempt's reason)
                    try:
                        cfg2, info2 = match_budget(make_meta, same, target)
                    except Exception as e:  # noqa: BLE001
                        log.debug("%s on the baseline's targets: %s", method, e)
                        cfg2, info2 = None, {"matched": False}
                    if info2["matched"]:
                        notes.append(f"on {plan.baseline}'s targets {same['targets']} (its own "
                                     f"{adapter.get('targets')} cannot reach the budget)")
                        table[(task, method)] = (cfg2, info2)
            except Exception as e:  # recorded with the runs; the method still runs with its paper settings
                table[(task, method)] = (adapter, {"matched": False, "target": target,
                                                   "reason": f"could not probe: {type(e).__name__}: {e}"[:300]})
            if notes:
                table[(task, method)][1]["notes"] = notes
            memo[key] = list(table[(task, method)])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo, indent=1, default=str))
        tmp.replace(cache)
    return table


def run_arena(plan: ArenaPlan, *, progress: bool = False, on_record=None) -> list[dict]:
    validate(plan)
    old = read_records(plan.out)
    clash = next((r for r in old if r.get("budget", plan.budget) != plan.budget
                  or r.get("lr_policy", "paper") != policy(plan) or r.get("baseline", BASELINE) != plan.baseline),
                 None)
    if clash is not None:
        raise ConfigError(f"{plan.out} holds runs made with budget={clash.get('budget')} "
                          f"lr={clash.get('lr_policy', 'paper')} baseline={clash.get('baseline', BASELINE)}; this "
                          f"arena uses budget={plan.budget} lr={policy(plan)} baseline={plan.baseline}: choose "
                          "another --out so results stay comparable")
    done = {r["key"] for r in old if not _retry(r) and not _stale(plan, r)}
    planned = expand(plan)
    todo = [r for r in planned if r["key"] not in done]
    # a tuned arena looks at every cell again: a sweep extended since (lr_extend) may choose another rate, whose
    # seed runs are then run again even though their keys are recorded
    scope = planned if plan.lr_tuning else todo
    if not scope:
        return []
    env = environment(plan.out)
    cache = "budgets.json" if plan.shard is None else f"budgets-shard-{plan.shard[0]}-of-{plan.shard[1]}.json"
    table = budgets(plan, pairs={(r["task"], r["method"]) for r in scope}, cache=plan.out / cache)
    refusals = _procedure_refusals(plan, table, scope)
    by_key = {r["key"]: r for r in old}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="arena", unit="run", dynamic_ncols=True, file=sys.stderr)
    new = []
    baseline_seen: set[tuple[str, int]] = set()
    fname = records_file(plan)

    def prepare(run: dict) -> tuple[dict, dict | None]:
        adapter, info = table[(run["task"], run["method"])]
        rec = {**run, "budget_info": info}
        why = info.get("skip") or refusals.get(cell_of(run))
        if why:
            rec.update(status="skipped", error=f"not run: {why}")
            return rec, None
        # the untrained metric is measured once per (task, seed): by the baseline's run
        # (not by a sweep run: the untrained model is measured on the test split, by a test run)
        first = is_baseline(plan, run) and run["lr_mult"] == 1.0 and run.get("phase") != "sweep" \
            and (run["task"], run["seed"]) not in baseline_seen
        if first:
            baseline_seen.add((run["task"], run["seed"]))
        extra = list(plan.extra) + procedure_overrides(run.get("procedure", DEFAULT_PROCEDURE))
        if run.get("eval_split"):
            extra.append(f"data.eval_split={run['eval_split']}")
        return rec, {**run, "adapter": adapter, "extra": extra, "eval_before": first, "plugins": list(plan.plugins),
                     "diagnostics": plan.diagnostics}

    def finish(rec: dict, t0: float, res: dict | None, err: BaseException | None) -> None:
        if res is not None:
            rec.update(status="ok", **res)
            prior = by_key.get(rec["key"])
            if prior is not None and _stale(plan, prior) \
                    and _lr_key(prior.get("lr") or 0) == _lr_key(rec.get("lr") or 0):  # the same run re-measured
                keep_original(prior, rec)
        elif err is not None:
            rec.update(status="error", error=f"{type(err).__name__}: {err}"[:2000])
        rec.update(env)
        rec.setdefault("wall_s", time.time() - t0)
        rec["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _append(plan.out, rec, fname)
        new.append(rec)
        by_key[rec["key"]] = rec
        if on_record:
            on_record(rec)
        if bar is not None:
            bar.update(1)
            if rec["status"] != "ok":
                bar.write(f"{rec['key']}: {rec['status']}: {str(rec.get('error'))[:200]}")

    def run_batch(runs: list[dict]) -> None:
        if not runs:
            return
        if plan.backend == "ray":
            _run_on_ray(plan, runs, prepare, finish)
            return
        for run in runs:
            if bar is not None:
                bar.set_postfix_str(f"{run['task']} | {run['variant']} | seed {run['seed']}")
            t0 = time.time()
            rec, spec = prepare(run)
            if spec is None:
                finish(rec, t0, None, None)
                continue
            try:
                res, err = _execute(spec, plan), None
            except Exception as e:  # recorded, the arena goes on
                res, err = None, e
            finish(rec, t0, res, err)

    try:
        if plan.lr_tuning:  # task by task (sweep, then seeds), so an arena cut short has whole tasks
            # in the plan's task order (not todo's, which is seed-major: a resumed arena whose first task has its
            # seed-0 runs done would start on the next task and leave the first one's other seeds for last)
            for task in [t for t in plan.tasks if any(r["task"] == t for r in planned)]:
                _tuned(plan, [r for r in planned if r["task"] == task], done, table, refusals, by_key, run_batch,
                       finish, bar)
        else:
            run_batch(todo)
    finally:
        if bar is not None:
            bar.close()
    return new


def _tuned(plan: ArenaPlan, planned: list[dict], done: set, table: dict, refusals: dict, by_key: dict, run_batch,
           finish, bar) -> None:
    """``--tune-lr``: per (task, method, procedure) cell, a sweep on one seed evaluated on the validation split:
    stage 1 the method's paper rate and the task's recipe rate, stage 2 the better one x0.5 and x2, then while the
    best rate is at an open edge of the rates tried (no tried rate within x2.5 on one side, :func:`open_edge`) one
    more rate x2 (or x0.5) beyond it, for at most ``plan.lr_extend`` stages; the rate with the best validation metric
    is chosen and the seeds run at it on the test split (again, when their records hold another rate: a sweep
    extended after they ran). Stages run over every cell of the task at once (so ``--backend ray`` runs a stage in
    parallel); every sweep run is a record (``phase: sweep``) found again on resume, so the choice is recomputed
    identically. A cell's sweep and seeds share its shard (the cell's hash)."""
    from .report import LOWER_IS_BETTER
    from .worker import PRIMARY

    cells = list(dict.fromkeys(cell_of(r) for r in planned))
    low = bool(planned) and PRIMARY.get(planned[0]["task"], "loss") in LOWER_IS_BETTER  # one task per call
    rates: dict[tuple, list[float]] = {}
    for cell in cells:
        info = table.get(cell[:2], ({}, {}))[1]
        if info.get("skip") or cell in refusals:
            continue  # its seed runs are recorded as skipped with the reason
        try:
            rates[cell] = list(candidate_rates(plan, cell).values())
        except Exception as e:  # noqa: BLE001 - the seed runs record the config error
            log.warning("no learning-rate sweep for %s: %s", cell, e)

    def metric(cell, lr):
        rec = by_key.get(sweep_run(plan, cell, lr, 0)["key"])
        return rec.get("metric") if rec is not None and rec.get("status") == "ok" else None

    def stage(runs):
        if bar is not None:
            bar.total += len(runs)
            bar.refresh()
        run_batch(runs)

    def todo_(run):  # not recorded, or recorded as failed (retried, as every failed run is)
        return run["key"] not in by_key or _retry(by_key[run["key"]])

    stage([sweep_run(plan, c, lr, 1) for c, lrs in rates.items() for lr in lrs if todo_(sweep_run(plan, c, lr, 1))])
    for c, lrs in rates.items():
        best = choose_rate({lr: metric(c, lr) for lr in lrs}, low)
        if best is not None:
            lrs += [best * m for m in TUNE_NEIGHBOURS if _lr_key(best * m) not in {_lr_key(x) for x in lrs}]
    stage([sweep_run(plan, c, lr, 2) for c, lrs in rates.items() for lr in lrs if todo_(sweep_run(plan, c, lr, 2))])
    for k in range(plan.lr_extend):
        more = []
        for c, lrs in rates.items():
            nxt = beyond_edge({lr: metric(c, lr) for lr in lrs}, low)
            if nxt is not None:
                lrs.append(nxt)
                more.append(sweep_run(plan, c, nxt, 3 + k))
        if not more:
            break
        stage([r for r in more if todo_(r)])
    chosen = {}
    for c, lrs in rates.items():
        sweep = {lr: metric(c, lr) for lr in lrs}
        chosen[c] = (choose_rate(sweep, low), [[lr, m] for lr, m in sorted(sweep.items())])
    runs = []
    tune_seed = plan.tune_seed if plan.tune_seed is not None else plan.seeds[0]
    for run in planned:
        cell = cell_of(run)
        if cell not in rates:
            if run["key"] not in done:
                runs.append(run)  # skipped or failing: prepare records why
            continue
        lr, sweep = chosen[cell]
        prior = by_key.get(run["key"])
        moved = lr is not None and prior is not None and prior.get("status") == "ok" \
            and prior.get("lr_chosen") is not None and _lr_key(prior["lr_chosen"]) != _lr_key(lr)
        if run["key"] in done and not moved:
            continue
        if moved:  # the sweep chose another rate since this seed ran: it runs again at that rate
            run = {**run, "rate_changed_from": prior["lr_chosen"]}
            if bar is not None:
                bar.total += 1
                bar.refresh()
        if lr is None:
            rec = {**run, "budget_info": table[cell[:2]][1], "lr_sweep": sweep, "status": "skipped",
                   "error": SWEEP_FAILED}
            finish(rec, time.time(), None, None)
            continue
        run = {**run, "lr": lr, "lr_chosen": lr, "lr_sweep": sweep}
        src = by_key.get(sweep_run(plan, cell, lr, 0)["key"]) if run["seed"] == tune_seed else None
        if src is not None and _reusable(plan, run, src):
            finish({**run, "budget_info": table[cell[:2]][1], "reused_from": src["key"]}, time.time(),
                   _test_measurements(src), None)
            continue
        runs.append(run)
    run_batch(runs)


def _retry(rec: dict) -> bool:
    """Whether a resumed arena runs this record's key again: a failed run (a fix since?), and a seed run skipped
    because its cell's sweep had failed (its sweep runs are retried, so the seeds get another chance too)."""
    return rec.get("status") == "error" or (rec.get("status") == "skipped" and rec.get("error") == SWEEP_FAILED)


def _stale(plan: ArenaPlan, rec: dict, sweeps: bool = False) -> bool:
    """Whether ``rec`` (a test run; with ``sweeps`` any run) of a method in ``plan.rediagnose`` holds diagnostics
    older than the worker's current measurement, so a resumed arena runs it again (the same training: seeded)."""
    from .worker import DIAGNOSTICS_VERSION

    return rec.get("method") in plan.rediagnose and rec.get("status") == "ok" \
        and (sweeps or rec.get("phase") != "sweep") and (rec.get("diagnostics_version") or 1) < DIAGNOSTICS_VERSION


# what a rediagnosed run keeps of the run it re-measures: the task metric and the cost columns
RERUN_KEEPS = ("metric", "metrics", "metric_before", "metrics_before", "loss_curve", "time_per_step_s",
               "time_per_step_norm", "reference_s", "reference_threads", "tokens_per_s", "peak_rss_mb", "cuda_peak_mb")
RERUN_TOLERANCE = 0.02  # the protocol's own "converged" tolerance: a larger metric change is another run


def keep_original(prior: dict, rec: dict) -> dict:
    """A rediagnosed run (``rec``) replaces ``prior``, the record of the same seeded run, to measure its diagnostics.
    Re-run on another machine the same computation differs only by floating point (other CPU kernels: loss curves
    agree to ~5 digits, the metric moves by a few thousandths at most), so the record keeps the original's metric
    and cost columns, measured with the rest of the arena, and takes the re-run's diagnostics; the re-run's own
    values are kept under ``rediagnosed.rerun``. A metric change beyond :data:`RERUN_TOLERANCE` makes it a new run
    in every column."""
    m0, m1 = prior.get("metric"), rec.get("metric")
    same = m0 is not None and m1 is not None and abs(m1 - m0) <= RERUN_TOLERANCE
    rec["rediagnosed"] = {"same_run": same, "prior_timestamp": prior.get("timestamp"),
                          "rerun": {k: rec.get(k) for k in RERUN_KEEPS if k != "loss_curve"}}
    if same:
        rec.update({k: prior.get(k) for k in RERUN_KEEPS})
    return rec


def _reusable(plan: ArenaPlan, run: dict, sweep_rec: dict) -> bool:
    """The tune seed's test run at the chosen rate is the sweep run at that rate (same config, same seed, same
    training; it scored the test split too) unless this run must also measure the untrained model (the
    baseline's first run of a (task, seed): ``metric_before``), which the sweep run did not, or its diagnostics are
    to be measured again (``rediagnose``)."""
    if sweep_rec.get("status") != "ok" or not isinstance(sweep_rec.get("metrics_test"), dict) \
            or _stale(plan, sweep_rec, sweeps=True):
        return False
    return not is_baseline(plan, run)


def _test_measurements(sweep_rec: dict) -> dict:
    """A sweep record's measurements with its test-split scores as the run's metrics."""
    skip = {"key", "task", "method", "procedure", "variant", "seed", "lr_mult", "lr", "phase", "sweep_stage",
            "eval_split", "also_eval", "budget", "lr_policy", "baseline", "budget_info", "status", "error",
            "metrics_test", "git_rev", "versions", "hardware", "timestamp"}
    out = {k: v for k, v in sweep_rec.items() if k not in skip}
    test = sweep_rec["metrics_test"]
    out.update(metrics=test, metric=test.get(sweep_rec.get("metric_name")), trained_at=sweep_rec.get("timestamp"),
               trained_git_rev=sweep_rec.get("git_rev"))
    return out


def machine_time(plan: ArenaPlan) -> dict:
    """What the arena in ``plan.out`` has cost and what is left: ``spent_s`` (the wall time of every run recorded,
    reused records not counted twice), ``trained`` (runs that trained), ``left`` (runs still to do: the seed runs not
    recorded, less the tune seed's runs a tuned arena reuses from its sweep, plus each tuned cell's sweep runs not
    recorded: its 1-2 first-stage rates and the 2 neighbours, none once its seeds ran at a chosen rate; the
    extension stages depend on the results and are not counted) and ``left_s`` (those runs at the mean wall time of
    the task's trained runs so far; the mean over every task where a task has none; None with no run yet), one
    process."""
    recs = read_records(plan.out)
    trained = [r for r in recs if not r.get("reused_from") and r.get("status") != "skipped"]
    spent = sum(float(r.get("wall_s") or 0.0) for r in trained)
    walls: dict[str, list[float]] = {}
    for r in trained:
        if r.get("status") == "ok" and r.get("wall_s"):
            walls.setdefault(r["task"], []).append(float(r["wall_s"]))
    every = [w for ws in walls.values() for w in ws]
    done = {r["key"] for r in recs if not _retry(r)}
    tune_seed = plan.tune_seed if plan.tune_seed is not None else plan.seeds[0]
    left: dict[str, int] = {}
    runs = expand(plan)
    for run in runs:
        if run["key"] in done:
            continue
        reused = plan.lr_tuning and run["seed"] == tune_seed and not is_baseline(plan, run)
        left[run["task"]] = left.get(run["task"], 0) + (0 if reused else 1)
    if plan.lr_tuning:
        swept = Counter(cell_of(r) for r in recs if r.get("phase") == "sweep" and r.get("status") != "error")
        # a cell whose seeds ran at a chosen rate has finished its sweep, even with fewer sweep records than rates
        # counted here (a neighbour equal to a first-stage rate, e.g. x0.5 of a paper rate twice the recipe's, is
        # not run twice)
        chosen = {cell_of(r) for r in recs if r.get("lr_chosen") is not None and not _retry(r)}
        for cell in dict.fromkeys((r["task"], r["method"], r["procedure"]) for r in runs):
            if cell in chosen:
                continue
            try:
                n = len(candidate_rates(plan, cell)) + len(TUNE_NEIGHBOURS)
            except Exception:  # noqa: BLE001 - a cell whose config does not resolve runs nothing
                continue
            left[cell[0]] = left.get(cell[0], 0) + max(0, n - swept.get(cell, 0))
    est = None
    if every:
        est = sum(n * (sum(walls[t]) / len(walls[t]) if t in walls else sum(every) / len(every))
                  for t, n in left.items())
    return {"spent_s": spent, "trained": len(trained), "left": sum(left.values()), "left_by_task": left,
            "left_s": est}


def _procedure_refusals(plan: ArenaPlan, table: dict, todo: list[dict]) -> dict[tuple[str, str, str], str]:
    """(task, method, procedure) -> why the procedure cannot train that method (its ``check`` on a shape-only probe
    of the adapter), so such cells are recorded as skipped with the reason instead of failing at run time."""
    from ..procedures import make_procedure, preflight

    out = {}
    for task, method, proc in {cell_of(r) for r in todo}:
        if proc == DEFAULT_PROCEDURE or (task, method) not in table:
            continue
        try:
            preflight(make_procedure(proc), table[(task, method)][0])
        except ConfigError as e:
            out[(task, method, proc)] = str(e)[:300]
        except Exception as e:  # noqa: BLE001 - a probe that cannot run is decided at run time
            log.debug("preflight of %s x %s failed: %s", method, proc, e)
    return out


def _ray_execute(spec: dict) -> dict:
    """A Ray task: one run in a fresh process on a worker (``isolate="spawn"``), so runs never share state."""
    return _execute(spec, ArenaPlan(methods=[], tasks=[], seeds=[], isolate="spawn"))


def _run_on_ray(plan: ArenaPlan, todo: list[dict], prepare, finish) -> None:
    """Submit every run as a task to a Ray cluster (``ray.init(address=plan.ray_address or "auto")``, falling back
    to a local instance); records are written here, on the driver, as results arrive."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'lorakit[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        try:
            ray.init(address=plan.ray_address or "auto", ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError):
            if plan.ray_address:
                raise
            ray.init(ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=0)(_ray_execute if plan.isolate != "none" else _inline_execute)
    pending = {}
    for run in todo:
        t0 = time.time()
        rec, spec = prepare(run)
        if spec is None:
            finish(rec, t0, None, None)
            continue
        pending[remote.remote(spec)] = (rec, t0)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ref = done[0]
        rec, t0 = pending.pop(ref)
        try:
            res, err = ray.get(ref), None
        except Exception as e:  # noqa: BLE001 - a failed task is a recorded error
            res, err = None, e
        finish(rec, t0, res, err)


def _inline_execute(spec: dict) -> dict:
    from .worker import execute

    return execute(spec)


# ---- process isolation ------------------------------------------------------------------------------------------
PRELOAD = ["lorakit", "lorakit.methods", "lorakit.arena.worker", "lorakit.train.loop", "lorakit.tasks",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama"]


def _child(spec: dict, conn) -> None:
    try:
        from .worker import execute

        _import_plugins(spec.get("plugins") or [])
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar (the arena's) is enough
        conn.send(("ok", execute(spec)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as a record
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
    finally:
        conn.close()


def _execute(spec: dict, plan: ArenaPlan) -> dict:
    if plan.isolate == "none":
        from .worker import execute

        return execute(spec)
    if plan.isolate == "spawn":
        proc = subprocess.run([sys.executable, "-m", "lorakit.arena.worker"], input=json.dumps(spec), text=True,
                              capture_output=True, timeout=plan.timeout_s)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ARENA_RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            raise RuntimeError(f"run failed (exit {proc.returncode}): " + " | ".join(tail))
        return json.loads(lines[-1][len("ARENA_RESULT "):])
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + list(plan.plugins))  # used when the server first starts
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(spec, send), daemon=True)
    p.start()
    send.close()
    try:
        if not recv.poll(plan.timeout_s):
            p.kill()
            raise TimeoutError(f"run exceeded {plan.timeout_s:.0f} s")
        status, payload = recv.recv()
    except EOFError:
        p.join(10)
        raise RuntimeError(f"the run's process died (exit code {p.exitcode}; killed for memory?)") from None
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
        recv.close()
    if status != "ok":
        raise RuntimeError(payload.strip() or "unknown error") from None
    return payload
