"""``lorakit arena report``: a Markdown table and a self-contained HTML page (plots embedded as PNG).

Per (task, method variant): mean ± std of the task metric over seeds, trainable parameters, adapter size, time
per step, peak memory. The untrained model and the arena's baseline method (LoRA unless ``--baseline``) are marked
as baselines; every other row is set against the baseline, paired over seeds. Sorted by the metric.
"""
from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..procedures.base import DEFAULT_PROCEDURE
from .run import BASELINE, open_edge, read_records

TOP_CURVES = 6  # loss-curve plot: how many methods besides the baselines get a colour and a legend entry
LOWER_IS_BETTER = {"loss", "completion_loss", "eval_loss"}


def _set_threads(rec: dict):
    """The run's own ``train.threads`` (``--set train.threads=1``), None when it set none."""
    return ((rec.get("config") or {}).get("train") or {}).get("threads")


def _run_threads(rec: dict):
    """The torch threads a run trained with: its config's ``train.threads`` when set, else the arena process's own
    count (what the run inherited)."""
    return _set_threads(rec) or (rec.get("hardware") or {}).get("torch_threads")


def _step_norm(rec: dict):
    """The run's time per step over its reference matmul, when that reference ran on the run's thread count (the
    record's ``reference_threads``). Before that was recorded the reference always used the process's pool: such a
    ratio is kept only for a run that set no thread count of its own (a ``train.threads=1`` shard's reference was a
    multi-threaded matmul fighting the other shards for the cores, up to ~100x off); otherwise None."""
    norm = rec.get("time_per_step_norm")
    ref_threads = rec.get("reference_threads")
    if ref_threads is None:
        return None if _set_threads(rec) else norm
    return norm if ref_threads == _run_threads(rec) else None


def _ms(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def baseline_of(rows: list[dict]) -> str:
    """The baseline method of a task's rows (the records say; LoRA for records that predate ``--baseline``)."""
    return next((r["variant"] for r in rows if r.get("reference")), None) or \
        next((r["baseline"] for r in rows if r.get("baseline") not in (None, "untrained")), BASELINE)


def aggregate(records: list[dict]) -> dict[str, list[dict]]:
    """task -> rows (one per method variant, plus the untrained baseline), sorted best first. Rows of the
    baseline method under the default procedure carry ``baseline`` = its name (``reference``: the one at the
    recipe's rate, which every row is compared against); the untrained model's row ``baseline = "untrained"``."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    sweeps: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        (sweeps if r.get("phase") == "sweep" else groups)[(r["task"], r["variant"])].append(r)
    tasks: dict[str, list[dict]] = defaultdict(list)
    for (task, variant), recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok" and r.get("metric") is not None]
        errs = [r for r in recs if r.get("status") != "ok"]
        mean, std = _ms([r["metric"] for r in ok])
        base = recs[0].get("baseline") or BASELINE
        of_base = recs[0]["method"] == base and recs[0].get("procedure", DEFAULT_PROCEDURE) == DEFAULT_PROCEDURE
        row = {"task": task, "variant": variant, "method": recs[0]["method"], "n": len(ok), "errors": len(errs),
               "error": errs[0].get("error") if errs else None, "metric_name": ok[0]["metric_name"] if ok else None,
               "mean": mean, "std": std, "params": _ms([r.get("trainable_params") for r in ok])[0],
               "adapter_mb": _ms([(r.get("adapter_bytes") or 0) / 2**20 for r in ok])[0],
               "step_s": _ms([r.get("time_per_step_s") for r in ok])[0],
               "wall_s": _ms([r.get("wall_s") for r in ok])[0],
               "rss_mb": _ms([r.get("peak_rss_mb") for r in ok])[0],
               "step_norm": _ms([_step_norm(r) for r in ok])[0],
               "threads": {_run_threads(r) for r in ok} - {None},
               "intruders": _ms([r.get("intruders") for r in ok])[0],
               "forgetting": _ms([r.get("forgetting_ratio") for r in ok])[0],
               "lr_chosen": next((r.get("lr_chosen") for r in ok if r.get("lr_chosen") is not None), None),
               "sweep": sorted(((s.get("lr"), s.get("metric") if s.get("status") == "ok" else None)
                                for s in sweeps.get((task, variant), [])), key=lambda x: x[0] or 0.0),
               "lr": next(((r.get("config") or {}).get("optim", {}).get("lr") for r in ok if r.get("config")), None),
               "matched": all((r.get("budget_info") or {}).get("matched", True) for r in ok),
               "budget_note": next(((r.get("budget_info") or {}).get("reason") for r in ok
                                    if (r.get("budget_info") or {}).get("reason")), None),
               "curves": [r.get("loss_curve") or [] for r in ok],
               "by_seed": {r.get("seed"): r["metric"] for r in ok},
               "notes": sorted({n for r in recs for n in (r.get("budget_info") or {}).get("notes", [])}),
               "knob": next((f"{(r.get('budget_info') or {}).get('knob')}={(r.get('budget_info') or {}).get('value')}"
                             for r in ok if (r.get("budget_info") or {}).get("matched")
                             and (r.get("budget_info") or {}).get("knob")), None),
               "baseline": base if of_base else None, "reference": of_base and variant == base}
        if row["lr_chosen"] is not None:
            row["lr"] = row["lr_chosen"]
            row["lr_edge"] = open_edge([lr for lr, _ in row["sweep"] if lr is not None], row["lr_chosen"]) \
                if row["sweep"] else None
        tasks[task].append(row)
        if row["reference"] and ok and ok[0].get("metric_before") is not None:
            bm, bs = _ms([r.get("metric_before") for r in ok])
            tasks[task].append({**row, "variant": "untrained model", "method": "(none)", "knob": None, "notes": [],
                                "mean": bm, "std": bs,
                                "by_seed": {r.get("seed"): r.get("metric_before") for r in ok
                                            if r.get("metric_before") is not None},
                                "params": 0, "adapter_mb": 0, "step_s": float("nan"), "wall_s": float("nan"),
                                "step_norm": float("nan"), "threads": set(), "intruders": float("nan"),
                                "forgetting": float("nan"),
                                "sweep": [], "lr_chosen": None,
                                "rss_mb": float("nan"), "curves": [], "baseline": "untrained", "reference": False,
                                "errors": 0, "lr": None})
    for task, rows in tasks.items():
        name = next((r["metric_name"] for r in rows if r["metric_name"]), "")
        low = name in LOWER_IS_BETTER
        rows.sort(key=lambda r: (math.isnan(r["mean"]), r["mean"] if low else -r["mean"]))
        _paired_vs_baseline(rows, -1.0 if low else 1.0)
        _pareto(rows, -1.0 if low else 1.0)
    return dict(tasks)


BOOTSTRAP = 2000  # resamples of the paired differences
BOOTSTRAP_SEED = 0  # the report is a pure function of the records
MIN_SEEDS = 3  # fewer shared seeds: no verdict


def bootstrap_ci(diffs: list[float], level: float = 0.95, resamples: int = BOOTSTRAP,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``diffs``: ``resamples`` resamples of len(diffs) values
    drawn with replacement (a seeded ``random.Random``), the (1-level)/2 and (1+level)/2 quantiles of their means
    (nearest rank). With 3 seeds the interval lies between the smallest and largest difference (every resample
    mean does), so it excludes 0 only when all the differences have one sign."""
    import random

    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(resamples))
    lo = means[max(0, math.ceil((1 - level) / 2 * resamples) - 1)]
    hi = means[min(resamples - 1, math.ceil((1 + level) / 2 * resamples) - 1)]
    return lo, hi


def verdict(diffs: list[float], level: float = 0.95) -> tuple[str, tuple[float, float] | None]:
    """``better`` / ``worse`` when the bootstrap interval of the mean paired difference (sign: > 0 = better)
    excludes 0, ``no detectable difference`` when it contains 0, ``too few seeds`` under MIN_SEEDS pairs."""
    if len(diffs) < MIN_SEEDS:
        return "too few seeds", None
    lo, hi = bootstrap_ci(diffs, level)
    if lo > 0:
        return "better", (lo, hi)
    if hi < 0:
        return "worse", (lo, hi)
    return "no detectable difference", (lo, hi)


def _paired_vs_baseline(rows: list[dict], sign: float) -> None:
    """Each row against the baseline (the ``reference`` row) on the seeds both have (the same seed means the same
    data order, the same head init and the same evaluation rows, so the per-seed differences are paired): ``vs_base`` =
    (mean difference, seeds better, seeds compared), better = higher unless the metric is a loss; ``verdict`` and
    ``ci`` from the seeded bootstrap interval of the mean paired difference (:func:`verdict`)."""
    ref = next((r for r in rows if r.get("reference")), None)
    for r in rows:
        r["vs_base"], r["verdict"], r["ci"] = None, None, None
        if ref is None or r is ref:
            continue
        common = sorted(set(r.get("by_seed", {})) & set(ref.get("by_seed", {})))
        diffs = [sign * (r["by_seed"][s] - ref["by_seed"][s]) for s in common]
        if diffs:
            r["vs_base"] = (statistics.fmean(diffs), sum(d > 0 for d in diffs), len(diffs))
            r["verdict"], r["ci"] = verdict(diffs)


def _pareto(rows: list[dict], sign: float) -> None:
    """``pareto`` = no other trained row scores at least as well with at most as many trainable parameters (and
    strictly better on one of the two): the rows a user with a parameter budget should look at first."""
    on = {id(r) for r in front(rows, "params", sign)}
    for r in rows:
        r["pareto"] = id(r) in on


def _vs_base(r: dict) -> str:
    v = r.get("vs_base")
    if not v:
        return "—"
    d, wins, n = v
    ci = r.get("ci")
    return f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{d:+.3f} ({n} seed{'s' if n > 1 else ''})"


def _sweep(r: dict) -> str:
    if not r.get("sweep"):
        return ""
    return "lr sweep (validation): " + ", ".join(f"{lr:.0e}→{_fmt(m)}" + ("*" if lr == r.get("lr_chosen") else "")
                                                  for lr, m in r["sweep"])


def _fmt(v, spec=".3f"):
    """``spec`` "ratio": 3 decimals, scientific from 1000 (a forgetting ratio can reach 1e8 for a wrecked model)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if spec == "ratio":
        spec = ".3f" if abs(v) < 1000 else ".2e"
    return format(v, spec)


def markdown(tasks: dict[str, list[dict]]) -> str:
    out = []
    for task in sorted(tasks):
        rows = tasks[task]
        metric = next((r["metric_name"] for r in rows if r["metric_name"]), "metric")
        base = baseline_of(rows)
        out.append(f"### {task}  ({metric}, mean ± std over seeds; best first)\n")
        out.append(f"| # | method | {metric} | vs {base} [95% CI] | verdict | seeds | trainable params | lr | "
                   "adapter MB | s/step | step / ref | peak RSS MB | intruders | forgetting | note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            name = f"**{r['variant']}** (baseline)" if r["baseline"] else r["variant"]
            if r.get("pareto"):
                name += " ◆"
            note = []
            if r["errors"]:
                note.append(f"{r['errors']} failed: {str(r['error'])[:80]}")
            if r.get("knob"):
                note.append(f"matched at {r['knob']}")
            if not r["matched"]:
                note.append(f"params not matched ({r['budget_note']})")
            note += r.get("notes") or []
            if _sweep(r):
                note.append(_sweep(r))
            out.append(f"| {i} | {name} | {_fmt(r['mean'])} ± {_fmt(r['std'])} | {_vs_base(r)} | "
                       f"{r.get('verdict') or '—'} | {r['n']} | "
                       f"{_fmt(r['params'], ',.0f')} | {_lr(r)} | {_fmt(r['adapter_mb'], '.2f')} | "
                       f"{_fmt(r['step_s'], '.2f')} | {_fmt(r.get('step_norm'), ',.0f')} | "
                       f"{_fmt(r['rss_mb'], ',.0f')} | {_fmt(r.get('intruders'), '.1f')} | "
                       f"{_fmt(r.get('forgetting'), 'ratio')} | {'; '.join(note)} |")
        out.append("")
        out.append(LEGEND.format(better="lower" if metric in LOWER_IS_BETTER else "higher", base=base))
        out.append("")
    return "\n".join(out)


LEGEND = ("vs {base}: the mean of the per-seed differences from the baseline, {base} (same seed = same data order, "
          "head init and evaluation rows; > 0 = better, {better} metric is better) and the seeded bootstrap 95% interval "
          "of that mean; verdict: better / worse when the interval excludes 0, else no detectable difference (at "
          "least 3 shared seeds; with 3 the interval excludes 0 only when every seed agrees). step / ref: time per "
          "step divided by a fixed matmul timed in the same process, on the run's thread count, just before the run "
          "(compares methods across machine load; — where the reference was not on the run's thread count). "
          "intruders: top-10 singular vectors of the tuned weights with no match (ε = 0.5) among those of the weights "
          "as loaded, summed over the adapted matrices (— where no matrix has a dense update: routed mixtures). "
          "forgetting: perplexity on held-out general text of the trained model / of the model as loaded (causal "
          "LMs; > 1 = training made the model worse at it). Both compare with a second copy of the model as loaded, "
          "not with the adapters switched off, which is another model after a residual init (PiSSA, CorDA, ...), a "
          "quantised or compressed base, or weights trained in place (full fine-tuning). ◆ = on the front of metric "
          "vs trainable parameters: no other method scores as well with as few parameters. With --tune-lr, lr is "
          "the chosen rate and the note lists the sweep (* = chosen); ↑ / ↓: the chosen rate is still the highest / "
          "lowest of the rates tried (none within x2.5 above / below it after the sweep's extension stages), so a "
          "rate beyond it may score better and the method's row may understate it.")
EDGE_MARK = {"up": " ↑", "down": " ↓"}


def _lr(r: dict) -> str:
    """The row's rate, marked when the chosen one is still at an open edge of its sweep."""
    return _fmt(r.get("lr"), ".0e") + EDGE_MARK.get(r.get("lr_edge"), "")


def front(rows: list[dict], key: str, sign: float) -> list[dict]:
    """The rows on the front of the metric (``sign`` > 0: higher is better) against the cost ``rows[i][key]``
    (lower is better): no other row scores at least as well at no more cost, strictly better on one. Sorted by
    cost."""
    ok = [r for r in rows if r.get("baseline") != "untrained" and math.isfinite(r["mean"])
          and r.get(key) is not None and math.isfinite(r[key])]
    on = [r for r in ok if not any(q is not r and q[key] <= r[key] and sign * q["mean"] >= sign * r["mean"]
                                   and (q[key] < r[key] or sign * q["mean"] > sign * r["mean"]) for q in ok)]
    return sorted(on, key=lambda r: r[key])


def costs(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The costs the metric is set against in "what to use": trainable parameters, time per step and peak memory.
    Time per step is the normalised one (step / ref) when every trained row has it; else the raw seconds when
    every run of the task trained on one thread count (the arena's same-thread-count protocol); else left out."""
    out = [("params", "trainable parameters", ",.0f")]
    trained = [r for r in rows if r.get("baseline") != "untrained" and math.isfinite(r["mean"])]
    threads = set().union(*(r.get("threads") or set() for r in trained)) if trained else set()
    if trained and all(math.isfinite(r.get("step_norm", float("nan"))) for r in trained):
        out.append(("step_norm", "time per step (normalised)", ",.0f"))
    elif trained and len(threads) == 1:
        out.append(("step_s", f"time per step (s, every run on {next(iter(threads))} torch thread(s))", ".2f"))
    out.append(("rss_mb", "peak memory (MB)", ",.0f"))
    return out


def _chance_note(judged: list[dict], base: str) -> str:
    """How many "better" verdicts chance alone would give among ``judged``, when every comparison has exactly
    MIN_SEEDS = 3 seeds: the bootstrap interval then excludes 0 exactly when all three paired differences share a
    sign, which a method no different from the baseline (continuous, symmetric noise) does with probability 1/8
    each way. With more seeds the interval is a real one and no note is needed."""
    if not judged or any(r["vs_base"][2] != 3 for r in judged):
        return ""
    return (f" With 3 seeds the interval excludes 0 exactly when every seed agrees, which a method no different "
            f"from {base} does 1 time in 8: of the {len(judged)} compared, ~{len(judged) / 8:.1f} are expected here by "
            f"chance alone, so weigh the size of each difference (more seeds give a real interval).")


def what_to_use(tasks: dict[str, list[dict]], worst: int = 3) -> str:
    """The "what to use" section, written from the numbers: per task, the methods better than the baseline with
    confidence (bootstrap verdict) at matched parameters, the front of the metric against each cost, and the methods that
    cost the base model most (forgetting ratio, intruder count)."""
    out = []
    for task in sorted(tasks):
        rows = tasks[task]
        metric = next((r["metric_name"] for r in rows if r["metric_name"]), "metric")
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        base = baseline_of(rows)
        out.append(f"### {task} ({metric})\n")
        methods = [r for r in rows if r.get("baseline") != "untrained"]
        better = [r for r in methods if r.get("verdict") == "better" and r.get("matched")]
        worse = [r for r in methods if r.get("verdict") == "worse"]
        judged = [r for r in methods if r.get("verdict") not in (None, "too few seeds")]
        if better:
            out.append(f"* Better than {base} with confidence at matched parameters: " + ", ".join(
                f"{r['variant']} ({r['vs_base'][0]:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}])" for r in better)
                + "." + _chance_note(judged, base))
        elif judged:
            out.append(f"* No method is better than {base} with confidence at matched parameters ({len(judged)} "
                       f"compared, {len(worse)} worse).")
        else:
            out.append(f"* No verdict against {base}: fewer than {MIN_SEEDS} shared seeds.")
        edge = [r for r in methods if r.get("lr_edge")]
        if edge:
            out.append("* Chosen rate still at an edge of its sweep (a rate beyond it may score better, so these rows "
                       "may understate the method): " + ", ".join(
                           f"{r['variant']} ({_lr(r)})" for r in edge) + ".")
        for key, label, spec in costs(rows):
            f = front(rows, key, sign)
            if f:
                out.append(f"* Front of {metric} vs {label}: " + ", ".join(
                    f"{r['variant']} ({_fmt(r['mean'])} at {_fmt(r[key], spec)})" for r in f) + ".")
        for key, label, spec in (("forgetting", "forgetting (perplexity ratio on general text)", "ratio"),
                                 ("intruders", "intruder dimensions", ".1f")):
            costly = sorted((r for r in rows if r.get("baseline") != "untrained" and r.get(key) is not None
                             and math.isfinite(r[key])), key=lambda r: -r[key])[:worst]
            if costly:
                out.append(f"* Most {label}: " + ", ".join(f"{r['variant']} ({_fmt(r[key], spec)})" for r in costly)
                           + ".")
        out.append("")
    return "\n".join(out)


def overview(tasks: dict[str, list[dict]]) -> str:
    """One row per method variant, one column per task (mean ± std), sorted by the mean rank across tasks."""
    names = sorted(tasks)
    cells: dict[str, dict[str, str]] = {}
    ranks: dict[str, list[float]] = {}
    for task in names:
        rows = [r for r in tasks[task] if not math.isnan(r["mean"])]
        for i, r in enumerate(rows):
            ranks.setdefault(r["variant"], []).append(i / max(len(rows) - 1, 1))
            cells.setdefault(r["variant"], {})[task] = f"{_fmt(r['mean'])} ± {_fmt(r['std'], '.3f')}"
        for r in tasks[task]:
            cells.setdefault(r["variant"], {}).setdefault(task, "failed" if r["errors"] else "—")
            ranks.setdefault(r["variant"], [])
    order = sorted(cells, key=lambda v: (sum(ranks[v]) / len(ranks[v]) if ranks[v] else 2.0, v))
    bases = {r["variant"] for rows in tasks.values() for r in rows
             if r.get("reference") or r["baseline"] == "untrained"}
    metric = {t: next((r["metric_name"] for r in tasks[t] if r["metric_name"]), "") for t in names}
    out = ["| method | " + " | ".join(f"{t} ({metric[t]})" for t in names) + " | mean rank |",
           "|---|" + "---|" * len(names) + "---|"]
    for v in order:
        name = f"**{v}**" if v in bases else v
        rank = f"{sum(ranks[v]) / len(ranks[v]):.2f}" if ranks[v] else "—"
        out.append(f"| {name} | " + " | ".join(cells[v].get(t, "—") for t in names) + f" | {rank} |")
    return "\n".join(out) + "\n\nmean rank: 0 = best on every task, 1 = worst; bold = baselines.\n"


def comparison(tasks: dict[str, list[dict]], other: dict[str, list[dict]], label: str) -> str:
    """Per task, this arena's rows next to another results directory's, each method on the seeds it has in both
    (an arena still running has some methods on fewer seeds): the metric both ways, the difference, the seeds and
    both learning rates. For reading one policy or budget against another (e.g. ``--lr recipe`` against the paper
    rates)."""
    out = []
    for task in sorted(tasks):
        theirs = {r["variant"]: r for r in other.get(task, [])}
        pairs = []
        for r in tasks[task]:
            o = theirs.get(r["variant"])
            common = sorted(set(r.get("by_seed", {})) & set(o.get("by_seed", {}))) if o else []
            if common:
                pairs.append((r, o, common))
        if not pairs:
            continue
        metric = next((r["metric_name"] for r, _, _ in pairs if r["metric_name"]), "metric")
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        out.append(f"### {task}: against {label}  ({metric}; Δ > 0 = better here)\n")
        out.append(f"| # | method | here | {label} | Δ | seeds | lr here | lr {label} |")
        out.append("|---|---|---|---|---|---|---|---|")
        for i, (r, o, common) in enumerate(pairs, 1):
            name = f"**{r['variant']}** (baseline)" if r["baseline"] else r["variant"]
            mine = statistics.fmean(r["by_seed"][s] for s in common)
            yours = statistics.fmean(o["by_seed"][s] for s in common)
            out.append(f"| {i} | {name} | {_fmt(mine)} | {_fmt(yours)} | {_fmt((mine - yours) * sign, '+.3f')} | "
                       f"{', '.join(map(str, common))} | {_fmt(r.get('lr'), '.0e')} | {_fmt(o.get('lr'), '.0e')} |")
        out.append("")
    return "\n".join(out)


def update_readme(readme: str | Path, tasks: dict[str, list[dict]], link: str) -> bool:
    """Replace the text between ``<!-- arena:begin -->`` and ``<!-- arena:end -->`` with the overview table."""
    p = Path(readme)
    text = p.read_text()
    a, b = "<!-- arena:begin -->", "<!-- arena:end -->"
    if a not in text or b not in text:
        return False
    head, rest = text.split(a, 1)
    _, tail = rest.split(b, 1)
    p.write_text(head + a + "\n" + overview(tasks) + f"\nFull report with plots: [{link}]({link}).\n" + b + tail)
    return True


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _label_points(fig, ax, points: list[tuple[dict, float]]) -> int:
    """Name each point, the baselines first, then best first, leaving off a label that would overlap
    one already placed, so a dense cluster stays readable. Returns how many labels were left off."""
    renderer = fig.canvas.get_renderer()
    order = sorted(points, key=lambda p: not p[0]["baseline"])  # stable: rows come sorted best first
    placed, hidden = [], 0
    for r, x in order:
        label = ax.annotate(r["variant"], (x, r["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        box = label.get_window_extent(renderer).expanded(1.05, 1.15)
        if any(box.overlaps(b) for b in placed):
            label.remove()
            hidden += 1
        else:
            placed.append(box)
    return hidden


def plots(tasks: dict[str, list[dict]]) -> dict[str, list[tuple[str, str]]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, list[tuple[str, str]]] = {}
    for task, rows in sorted(tasks.items()):
        metric = next((r["metric_name"] for r in rows if r["metric_name"]), "metric")
        base = baseline_of(rows)
        trained = [r for r in rows if r["baseline"] != "untrained" and not math.isnan(r["mean"])]
        untrained = next((r for r in rows if r["baseline"] == "untrained"), None)
        items = []
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        # time: the same machine-independent cost as "what to use" (step / ref, or seconds at one thread count);
        # wall time per run only when neither compares runs (it counts loading, evaluation and machine load)
        timed = next(((k, lab) for k, lab, _ in costs(rows) if k.startswith("step")),
                     ("wall_s", "wall time per run (s)"))
        for xkey, xlabel, logx in (("params", "trainable parameters", True), (*timed, False)):
            fig, ax = plt.subplots(figsize=(7, 4.2))
            points = []
            for r in trained:
                x = max(r[xkey], 1) if logx else r[xkey]
                style = dict(marker="*", s=160, color="crimson", zorder=3) if r["baseline"] else dict(s=40)
                ax.scatter([x], [r["mean"]], **style)
                ax.errorbar([x], [r["mean"]], yerr=[r["std"]], fmt="none", ecolor="gray", alpha=0.6)
                points.append((r, x))
            # the front: no method above-left of it (on parameters, the ◆ of the table)
            on = {id(r) for r in front(trained, xkey, sign)}
            line = sorted((x, r["mean"]) for r, x in points if id(r) in on)
            if len(line) > 1:
                ax.step([f[0] for f in line], [f[1] for f in line], where="post", color="darkorange", lw=1.2,
                        alpha=0.8, zorder=1, label="front (◆ in the table)" if logx else "front")
            if untrained:
                ax.axhline(untrained["mean"], ls="--", color="black", lw=1, label="untrained model")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=8)
            if logx:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            hidden = _label_points(fig, ax, points)
            ax.set_title(f"{task}: {metric} vs {xlabel}  (★ = the baseline, {base})"
                         + (f"\n{hidden} labels left off where they would overlap: see the table" if hidden else ""),
                         fontsize=10)
            ax.grid(alpha=0.3)
            items.append((f"{metric} vs {xlabel}", _png(fig)))
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(trained))))
        names = [r["variant"] for r in trained]
        ax.barh(names, [r["rss_mb"] for r in trained],
                color=["crimson" if r["baseline"] else "steelblue" for r in trained])
        base_rss = next((r["rss_mb"] for r in trained
                         if r["baseline"] and math.isfinite(r["rss_mb"] or math.nan)), None)
        if base_rss:
            ax.axvline(base_rss, ls=":", color="crimson", lw=1)
        ax.set_xlabel("peak RSS (MB)")
        ax.set_title(f"{task}: peak memory per method (best metric first; red = {base})", fontsize=10)
        ax.invert_yaxis()
        items.append(("memory", _png(fig)))
        fig, ax = plt.subplots(figsize=(7, 4.2))
        # rows come best first: the baselines thick, the best TOP_CURVES others in colour, the rest grey
        top = {r["variant"] for r in [r for r in trained if not r["baseline"]][:TOP_CURVES]}
        every: list[float] = []
        for r in trained:
            if r["curves"] and r["curves"][0]:
                curve = r["curves"][0]
                ys = [c["loss"] if isinstance(c, dict) else c for c in curve]
                every += [y for y in ys if y is not None and math.isfinite(y)]
                named = r["baseline"] or r["variant"] in top
                ax.plot(range(1, len(ys) + 1), ys, lw=2.2 if r["baseline"] else 1.1 if named else 0.7,
                        label=r["variant"] if named else None,
                        **(dict(color="crimson") if r["baseline"]
                           else {} if named else dict(color="gray", alpha=0.35)),
                        zorder=3 if named else 2)
        ax.set_xlabel("logged step")
        ax.set_ylabel("training loss")
        if every and min(every) > 0 and max(every) / min(every) > 10:  # a few diverging runs would flatten the rest
            ax.set_yscale("log")
            ax.set_ylabel("training loss (log scale)")
        ax.set_title(f"{task}: loss curves (first seed; thick red = {base}"
                     + (f"; colour: the {len(top)} best others; grey: the rest)"
                        if len(trained) - len(top) > TOP_CURVES else ")"), fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7, ncol=2)  # "best" searches every curve point: slow
        items.append(("loss curves", _png(fig)))
        figs[task] = items
    return figs


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 compare: str | Path | None = None) -> tuple[Path, Path]:
    """report.md and report.html for the records in ``results_dir``; with ``compare`` (another results
    directory), also a section per task setting each method against its runs there on the same seeds."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir
    recs = read_records(results_dir)
    if not recs:
        from ..errors import ConfigError

        raise ConfigError(f"no arena records in {results_dir}/runs.jsonl: run `lorakit arena run` first")
    tasks = aggregate(recs)
    md = markdown(tasks)
    env = recs[-1]

    def by_seed(get) -> str:
        """``v (seeds 0, 1)`` per distinct value, so runs made on other revisions or thread counts are visible."""
        groups: dict = {}
        for r in recs:
            groups.setdefault(get(r), set()).add(r.get("seed"))
        if len(groups) == 1:
            return str(next(iter(groups)))
        return ", ".join(f"{v} (seed{'s' if len(sd) > 1 else ''} {', '.join(map(str, sorted(sd)))})"
                         for v, sd in sorted(groups.items(), key=lambda kv: min(kv[1])))

    head = (f"# lorakit arena\n\n{len(recs)} runs; lorakit {env.get('versions', {}).get('lorakit')} "
            f"(git {by_seed(lambda r: r.get('git_rev'))}), torch {env.get('versions', {}).get('torch')}, "
            f"{env.get('hardware', {}).get('cpus')} CPUs"
            f"{', ' + env['hardware']['gpu'] if env.get('hardware', {}).get('gpu') else ''}, "
            f"torch threads per run: {by_seed(_run_threads)}.\n\n")
    md_path = out_dir / "report.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = sorted({str(r.get("budget")) for r in recs if r.get("budget") is not None})
    seeds = sorted({r.get("seed") for r in recs})
    head += (f"Budget: {', '.join(budgets)} (see docs/arena.md); seeds {', '.join(map(str, seeds))}. "
             "Metric: mean ± std over seeds, higher is better unless the metric is a loss.\n\n")
    versus = ""
    if compare is not None:
        theirs = [r for r in read_records(compare) if r.get("seed") in set(seeds)]
        if not theirs:
            from ..errors import ConfigError

            raise ConfigError(f"--compare {compare}: no arena records there for seeds {seeds}")
        versus = comparison(tasks, aggregate(theirs), Path(compare).name)
    advice = what_to_use(tasks)
    md_path.write_text(head + "## Overview\n\n" + overview(tasks) + "\n## What to use\n\n" + advice
                       + "\n## Per task\n\n" + md
                       + (f"\n## Against {Path(compare).name} (each method on the seeds it has in both)\n\n"
                          + versus if versus else ""))
    figs = plots(tasks)
    intro = " ".join(ln for ln in head.splitlines()[1:] if ln.strip())
    parts = [f"<h1>lorakit arena</h1><p>{html.escape(intro)}</p>",
             _md_table_to_html("### Overview: every method on every task, by mean rank\n" + overview(tasks)),
             "<h2>What to use</h2>" + _md_list_to_html(advice)]
    for task in sorted(tasks):
        sect = markdown({task: tasks[task]})
        parts.append(_md_table_to_html(sect))
        for title, b64 in figs.get(task, []):
            parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'/>"
                         f"<figcaption>{html.escape(task)}: {html.escape(title)}</figcaption></figure>")
    if versus:
        parts.append(f"<h2>Against {html.escape(Path(compare).name)} (each method on the seeds it has in both)</h2>")
        parts += [_md_table_to_html(sect) for sect in versus.split("\n### ") if sect.strip()]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>lorakit arena</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px}"
            "th{background:#f3f3f3}tr.base td{background:#fff3f3;font-weight:600}figure{display:inline-block;"
            "margin:.5em}img{max-width:520px}p.legend{font-size:12px;color:#555}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path


def _md_table_to_html(md: str) -> str:
    lines = md.strip().splitlines()
    title = lines[0].lstrip("# ").strip()
    rows = [ln for ln in lines[1:] if ln.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    body = []
    for ln in rows[2:]:
        cells = [c.strip().replace("**", "") for c in ln.strip("|").split("|")]
        cls = " class='base'" if "(baseline)" in ln or ln.startswith("| **") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    after = "".join(f"<p class='legend'>{html.escape(ln.strip())}</p>" for ln in lines[1:]
                    if ln.strip() and not ln.startswith("|"))
    return (f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) +
            "</tr>" + "".join(body) + "</table>" + after)


def _md_list_to_html(md: str) -> str:
    """The "what to use" section: ``### task`` headings and ``* item`` lines."""
    parts = []
    for block in md.split("### ")[1:]:
        lines = block.strip().splitlines()
        items = "".join(f"<li>{html.escape(ln[2:])}</li>" for ln in lines[1:] if ln.startswith("* "))
        parts.append(f"<h3>{html.escape(lines[0])}</h3><ul>{items}</ul>")
    return "".join(parts)
