"""Arena II report on constructed records: the paired bootstrap verdict against LoRA, the cost columns and the
"what to use" section."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lorakit.arena import aggregate, write_report
from lorakit.arena.report import bootstrap_ci, front, verdict, what_to_use


def _rec(method, seed, metric, task="sentiment-minilm", name="accuracy", **kw):
    base = {"key": f"{task}|{method}|{seed}", "task": task, "method": method, "variant": method, "seed": seed,
            "status": "ok", "metric_name": name, "metric": metric, "metric_before": 0.5,
            "trainable_params": 1000, "adapter_bytes": 4096, "time_per_step_s": 0.1, "time_per_step_norm": 100.0,
            "wall_s": 10.0, "peak_rss_mb": 900.0, "intruders": 0, "forgetting_ratio": 1.0,
            "loss_curve": [1.0, 0.5], "budget_info": {"matched": True}, "versions": {}, "hardware": {"cpus": 2}}
    return {**base, **kw}


def _independent_bootstrap(diffs, resamples=200_000, level=0.95):
    """The percentile bootstrap written here with numpy (not lorakit's helper): many resamples of the mean."""
    rng = np.random.default_rng(123)
    d = np.asarray(diffs)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return np.quantile(means, (1 - level) / 2), np.quantile(means, (1 + level) / 2)


def test_bootstrap_interval_matches_an_independent_bootstrap_and_is_seeded():
    diffs = [0.012, 0.031, -0.004, 0.027, 0.018, 0.040, 0.009]
    lo, hi = bootstrap_ci(diffs)
    ref_lo, ref_hi = _independent_bootstrap(diffs)
    assert lo == pytest.approx(ref_lo, abs=0.002) and hi == pytest.approx(ref_hi, abs=0.002)
    assert lo < np.mean(diffs) < hi
    assert bootstrap_ci(diffs) == (lo, hi)  # seeded: the report is a function of the records
    # three seeds: every resample mean lies between the smallest and largest difference
    lo3, hi3 = bootstrap_ci([0.01, 0.02, 0.05])
    assert 0.01 - 1e-12 <= lo3 <= hi3 <= 0.05 + 1e-12


def test_verdict_from_the_interval_not_from_win_counts():
    assert verdict([0.02, 0.03, 0.01])[0] == "better"
    assert verdict([-0.02, -0.03, -0.01])[0] == "worse"
    assert verdict([0.02, -0.03, 0.01])[0] == "no detectable difference"
    # ahead on 4 of 5 seeds, but one seed far behind: a win count says 4/5, the interval contains 0
    assert verdict([0.01, 0.01, 0.01, 0.01, -0.2])[0] == "no detectable difference"
    assert verdict([0.05, 0.06])[0] == "too few seeds"


def test_aggregate_pairs_seeds_and_flips_the_sign_for_a_loss():
    recs = []
    for s, (l, d, v) in enumerate([(0.80, 0.85, 0.70), (0.70, 0.74, 0.72), (0.60, 0.66, 0.50)]):
        recs += [_rec("lora", s, l), _rec("dora", s, d), _rec("vera", s, v)]
    recs.append(_rec("pissa", 0, 0.9))  # one seed only
    rows = {r["variant"]: r for r in aggregate(recs)["sentiment-minilm"]}
    # dora is ahead on each seed (+0.05, +0.04, +0.06) although its spread across seeds (0.66-0.85) overlaps lora's
    assert rows["dora"]["verdict"] == "better" and rows["dora"]["vs_base"][0] == pytest.approx(0.05)
    assert rows["vera"]["verdict"] == "no detectable difference"
    assert rows["pissa"]["verdict"] == "too few seeds" and rows["lora"]["verdict"] is None
    losses = [_rec(m, s, v, task="gsm8k-smollm2", name="loss")
              for s in range(3) for m, v in (("lora", 1.0 + s / 10), ("dora", 0.9 + s / 10))]
    rows = {r["variant"]: r for r in aggregate(losses)["gsm8k-smollm2"]}
    assert rows["dora"]["verdict"] == "better" and rows["dora"]["vs_base"][0] == pytest.approx(0.1)


def test_cost_columns_front_and_what_to_use(tmp_path):
    recs = []
    for s in range(3):
        recs += [_rec("lora", s, 0.80 + s / 100, trainable_params=1000, time_per_step_norm=100.0, peak_rss_mb=900.0),
                 _rec("dora", s, 0.85 + s / 100, trainable_params=1100, time_per_step_norm=180.0, peak_rss_mb=950.0,
                      intruders=7, forgetting_ratio=1.30),
                 _rec("vera", s, 0.78 + s / 100, trainable_params=100, time_per_step_norm=90.0, peak_rss_mb=880.0,
                      intruders=1, forgetting_ratio=1.02),
                 _rec("slow", s, 0.70 + s / 100, trainable_params=5000, time_per_step_norm=400.0, peak_rss_mb=2000.0,
                      intruders=3, forgetting_ratio=1.10, budget_info={"matched": False, "reason": "x"})]
    tasks = aggregate(recs)
    rows = tasks["sentiment-minilm"]
    assert [r["variant"] for r in front(rows, "params", 1.0)] == ["vera", "lora", "dora"]
    assert [r["variant"] for r in front(rows, "step_norm", 1.0)] == ["vera", "lora", "dora"]
    assert "slow" not in {r["variant"] for r in front(rows, "rss_mb", 1.0)}
    text = what_to_use(tasks)
    assert "Better than lora with confidence at matched parameters: dora (+0.050" in text
    # 3 seeds each: the verdict is sign agreement, so the text says how many such verdicts chance alone gives
    assert ("which a method no different from lora does 1 time in 8: of the 3 compared, ~0.4 are expected here by "
            "chance alone") in text
    assert "Most forgetting (perplexity ratio on general text): dora (1.300), slow (1.100), vera (1.020)" in text
    assert "Most intruder dimensions: dora (7.0), slow (3.0), vera (1.0)" in text
    assert "Front of accuracy vs trainable parameters: vera (0.790 at 100), lora" in text
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    md, page = write_report(tmp_path)
    table = md.read_text()
    assert "## What to use" in table and "| step / ref |" in table and "| intruders | forgetting |" in table
    dora = next(ln for ln in table.splitlines() if ln.startswith("| ") and ln[2].isdigit() and "dora" in ln)
    cells = [c.strip() for c in dora.split("|")]
    assert "better" in cells and "180" in cells and "7.0" in cells and "1.300" in cells
    assert "<h2>What to use</h2>" in page.read_text()


def test_no_confident_winner_is_said_so():
    recs = [_rec(m, s, v) for s in range(3) for m, v in (("lora", 0.8 + s / 50), ("dora", 0.8 + (-1) ** s / 100))]
    text = what_to_use(aggregate(recs))
    assert "No method is better than lora with confidence at matched parameters (1 compared, 0 worse)" in text


def test_a_step_ratio_whose_reference_ran_on_another_thread_count_is_not_shown_or_ranked():
    """A train.threads=1 run whose reference matmul used the process's pool (records before reference_threads):
    the ratio is noise, so the column shows — and the time front falls back to seconds (one thread count)."""
    one = {"config": {"train": {"threads": 1}}}
    recs = []
    for s in range(3):
        recs += [_rec("lora", s, 0.80 + s / 100, time_per_step_s=1.0, time_per_step_norm=5000.0, **one),
                 _rec("dora", s, 0.85 + s / 100, time_per_step_s=1.5, time_per_step_norm=200.0, **one),
                 _rec("vera", s, 0.78 + s / 100, time_per_step_s=0.8, time_per_step_norm=9000.0, **one)]
    rows = {r["variant"]: r for r in aggregate(recs)["sentiment-minilm"]}
    assert all(r["step_norm"] != r["step_norm"] for r in rows.values())  # nan: untrusted
    text = what_to_use(aggregate(recs))
    assert "time per step (normalised)" not in text
    assert "Front of accuracy vs time per step (s, every run on 1 torch thread(s)): vera (0.790 at 0.80), lora " \
           "(0.810 at 1.00), dora (0.860 at 1.50)." in text
    # recorded on the run's thread count: trusted, and the front uses it
    recs = [{**r, "reference_threads": 1} for r in recs]
    rows = {r["variant"]: r for r in aggregate(recs)["sentiment-minilm"]}
    assert rows["dora"]["step_norm"] == pytest.approx(200.0)
    assert "Front of accuracy vs time per step (normalised): dora (0.860 at 200)." in what_to_use(aggregate(recs))
    # a reference on 2 threads for a 1-thread run is dropped
    mixed = [{**r, "reference_threads": 2} if r["variant"] == "vera" else r for r in recs]
    assert next(r for r in aggregate(mixed)["sentiment-minilm"] if r["variant"] == "vera")["step_norm"] != \
        next(r for r in aggregate(mixed)["sentiment-minilm"] if r["variant"] == "vera")["step_norm"]
    # vera trained on 2 threads, its reference on 1: no ratio for it, and seconds on 1 and 2 threads don't compare
    two = [{**r, "config": {"train": {"threads": 2}}} if r["variant"] == "vera" else r for r in recs]
    assert "vs time per step" not in what_to_use(aggregate(two))


def test_the_reference_matmul_runs_on_the_runs_thread_count():
    import torch

    from lorakit.arena.worker import reference_seconds

    prev = torch.get_num_threads()
    seen = []
    real = torch.mm

    def spy(a, b):
        seen.append(torch.get_num_threads())
        return real(a, b)

    torch.mm = spy
    try:
        assert reference_seconds(1, n=16, reps=3) > 0
    finally:
        torch.mm = real
    assert seen == [1] * 4  # one warm-up and three timed, all on the run's single thread
    assert torch.get_num_threads() == prev  # the process's pool is restored


def test_a_wrecked_models_forgetting_ratio_prints_in_scientific_notation():
    from lorakit.arena.report import _fmt

    assert _fmt(313616818.22, "ratio") == "3.14e+08" and _fmt(1.2, "ratio") == "1.200" and _fmt(None, "ratio") == "—"


def test_the_time_plot_uses_the_same_time_cost_as_what_to_use():
    """The metric-vs-time plot sets methods against step / ref when every run has a trusted ratio, else seconds per
    step at one thread count, and only when neither compares runs the wall time per run (which counts loading,
    evaluation and the machine's load)."""
    from lorakit.arena.report import plots

    one = {"config": {"train": {"threads": 1}}}
    recs = []
    for s in range(3):
        recs += [_rec("lora", s, 0.80 + s / 100, time_per_step_s=1.0, time_per_step_norm=5000.0, **one),
                 _rec("dora", s, 0.85 + s / 100, time_per_step_s=1.5, time_per_step_norm=200.0, **one)]
    titles = [t for t, _ in plots(aggregate(recs))["sentiment-minilm"]]
    assert "accuracy vs time per step (s, every run on 1 torch thread(s))" in titles
    trusted = [{**r, "reference_threads": 1} for r in recs]
    assert "accuracy vs time per step (normalised)" in [t for t, _ in plots(aggregate(trusted))["sentiment-minilm"]]
    mixed = [{**r, "config": {"train": {"threads": 2}}} if r["variant"] == "dora" else r for r in recs]
    assert "accuracy vs wall time per run (s)" in [t for t, _ in plots(aggregate(mixed))["sentiment-minilm"]]


def test_the_chance_note_counts_the_comparisons_and_leaves_more_seeds_alone():
    """16 methods, 3 seeds: 16 / 8 = 2 expected by chance; with a 4th seed the bootstrap interval is no longer sign
    agreement and the note goes."""
    def recs(seeds):
        out = []
        for s in range(seeds):
            out.append(_rec("lora", s, 0.80 + s / 100))
            out += [_rec(f"m{i}", s, 0.81 + s / 100 + i / 1000) for i in range(16)]
        return out
    text = what_to_use(aggregate(recs(3)))
    assert "Better than lora with confidence" in text
    assert "of the 16 compared, ~2.0 are expected here by chance alone" in text
    text4 = what_to_use(aggregate(recs(4)))
    assert "Better than lora with confidence" in text4 and "1 time in 8" not in text4
