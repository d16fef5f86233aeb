"""The arena report from synthetic records: sorting, baselines, mean ± std, HTML with embedded plots."""
from __future__ import annotations

import json

from lorakit.arena import aggregate, write_report


def _rec(method, seed, metric, before=0.5, status="ok", variant=None, **kw):
    return {"key": f"t|{variant or method}|{seed}", "task": "sentiment-minilm", "method": method,
            "variant": variant or method, "seed": seed, "status": status, "metric_name": "accuracy",
            "metric": metric, "metric_before": before, "trainable_params": 1000 if method == "lora" else 500,
            "adapter_bytes": 4096, "time_per_step_s": 0.1, "wall_s": 10.0, "peak_rss_mb": 900.0,
            "loss_curve": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}],
            "budget_info": {"matched": True}, "versions": {"lorakit": "0.1.0"}, "hardware": {"cpus": 2}, **kw}


def test_aggregate_sorts_and_marks_baselines():
    recs = [_rec("lora", 0, 0.80), _rec("lora", 1, 0.84), _rec("dora", 0, 0.90), _rec("dora", 1, 0.86),
            _rec("vera", 0, None, status="error", error="boom")]
    rows = aggregate(recs)["sentiment-minilm"]
    names = [r["variant"] for r in rows]
    assert names[:3] == ["dora", "lora", "untrained model"]
    assert names[-1] == "vera" and rows[-1]["errors"] == 1
    lora = rows[1]
    assert abs(lora["mean"] - 0.82) < 1e-9 and abs(lora["std"] - 0.028284271) < 1e-6
    assert lora["baseline"] == "lora" and lora["reference"] and rows[2]["baseline"] == "untrained" and rows[2]["mean"] == 0.5


def test_write_report(tmp_path):
    recs = [_rec("lora", 0, 0.8), _rec("dora", 0, 0.9), _rec("vera", 0, 0.7)]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    md, html = write_report(tmp_path)
    text = md.read_text()
    assert "| 1 | dora ◆ | 0.900 ± 0.000 | +0.100 (1 seed) | too few seeds |" in text and "**lora** (baseline)" in text
    assert "untrained model" in text and "vs lora: the mean of the per-seed differences from the baseline, lora" in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "class='base'" in page


def test_overview_ranks_methods_across_tasks_and_updates_readme(tmp_path):
    from lorakit.arena.report import overview, update_readme

    recs = [_rec("lora", 0, 0.8), _rec("dora", 0, 0.9), _rec("vera", 0, 0.7)]
    recs += [{**_rec("lora", 0, 0.5), "task": "bbc-minilm", "metric_name": "macro_f1", "key": "b|lora|0"},
             {**_rec("dora", 0, 0.6), "task": "bbc-minilm", "metric_name": "macro_f1", "key": "b|dora|0"},
             {**_rec("vera", 0, None, status="error", error="x"), "task": "bbc-minilm", "key": "b|vera|0"}]
    tasks = aggregate(recs)
    table = overview(tasks)
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert body[0].startswith("| dora |") and "0.900" in body[0] and body[0].rstrip().endswith("| 0.00 |")
    assert any(ln.startswith("| vera |") and "failed" in ln for ln in body)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- arena:begin -->\nold\n<!-- arena:end -->\nrest\n")
    assert update_readme(readme, tasks, "arena/results/report.md")
    text = readme.read_text()
    assert "\nold\n" not in text and "| dora |" in text and text.endswith("<!-- arena:end -->\nrest\n")
    readme.write_text("no markers")
    assert not update_readme(readme, tasks, "x")


def test_header_names_revisions_and_thread_counts_per_seed(tmp_path):
    recs = [_rec("lora", 0, 0.8, git_rev="aaa", hardware={"cpus": 2, "torch_threads": 2}),
            _rec("lora", 1, 0.8, git_rev="bbb", hardware={"cpus": 2, "torch_threads": 1}),
            _rec("lora", 2, 0.8, git_rev="bbb", hardware={"cpus": 2, "torch_threads": 1})]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    md, _ = write_report(tmp_path)
    head = md.read_text().split("## Overview")[0]
    assert "git aaa (seed 0), bbb (seeds 1, 2)" in head
    assert "torch threads per run: 2 (seed 0), 1 (seeds 1, 2)" in head
    # a run's own train.threads (--set train.threads=1) wins over the arena process's count it would inherit
    recs = [{**r, "hardware": {"cpus": 2, "torch_threads": 2}, "config": {"train": {"threads": 1}}} for r in recs]
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    head = write_report(tmp_path)[0].read_text().split("## Overview")[0]
    assert "torch threads per run: 1." in head


def test_scatter_labels_skip_overlaps_and_keep_the_baseline():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.arena.report import _label_points

    # rows come sorted best first; two methods sit exactly on the LoRA baseline, one far away
    rows = [{"variant": "dora", "mean": 0.8, "baseline": None}, {"variant": "pissa", "mean": 0.8, "baseline": None},
            {"variant": "lora", "mean": 0.8, "baseline": "lora"}, {"variant": "vera", "mean": 0.2, "baseline": None}]
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r, 1000.0 if r["variant"] != "vera" else 10.0) for r in rows]
    for r, x in points:
        ax.scatter([x], [r["mean"]])
    ax.set_xscale("log")
    assert _label_points(fig, ax, points) == 2
    shown = sorted(t.get_text() for t in ax.texts)
    plt.close(fig)
    assert shown == ["lora", "vera"]  # the baseline wins its spot; the far point keeps its label


def test_compare_sets_each_method_against_another_directory_on_the_same_seeds(tmp_path):
    import pytest

    from lorakit.errors import ConfigError

    here, there = tmp_path / "recipe", tmp_path / "paper"
    here.mkdir(), there.mkdir()
    (here / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _rec("lora", 0, 0.80), _rec("lora", 1, 0.70), _rec("dora", 0, 0.90), _rec("vera", 0, 0.70)]) + "\n")
    (there / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _rec("lora", 0, 0.80), _rec("lora", 1, 0.60), _rec("dora", 0, 0.60), _rec("dora", 1, 0.99)]) + "\n")
    md, html = write_report(here, compare=there)
    text = md.read_text()
    sect = text.split("## Against paper (each method on the seeds it has in both)", 1)[1]
    # dora has only seed 0 here: its seed-1 run there (0.99) is left out, so the pair is 0.90 vs 0.60
    assert "| 1 | dora | 0.900 | 0.600 | +0.300 | 0 |" in sect
    assert "| 2 | **lora** (baseline) | 0.750 | 0.700 | +0.050 | 0, 1 |" in sect
    assert "vera" not in sect  # no runs there to compare with
    assert "Against paper" in html.read_text()
    (there / "runs.jsonl").write_text(json.dumps(_rec("lora", 5, 0.8)) + "\n")
    with pytest.raises(ConfigError, match="no arena records there for seeds"):
        write_report(here, compare=there)


def test_paired_difference_from_lora_uses_the_shared_seeds_only():
    # dora beats LoRA on seeds 0 and 1 and loses on seed 2; its seed 3 has no LoRA run to pair with
    recs = [_rec("lora", 0, 0.80), _rec("lora", 1, 0.70), _rec("lora", 2, 0.90),
            _rec("dora", 0, 0.85), _rec("dora", 1, 0.75), _rec("dora", 2, 0.60), _rec("dora", 3, 0.99)]
    rows = {r["variant"]: r for r in aggregate(recs)["sentiment-minilm"]}
    d, wins, n = rows["dora"]["vs_base"]
    assert (wins, n) == (2, 3) and abs(d - (0.05 + 0.05 - 0.30) / 3) < 1e-9
    assert rows["lora"]["vs_base"] is None
    d, wins, n = rows["untrained model"]["vs_base"]  # metric_before 0.5 on every seed
    assert (wins, n) == (0, 3) and abs(d - (0.5 - 0.8)) < 1e-9
    # a loss: lower is better, so a lower loss is a positive difference and a win
    loss = [{**_rec("lora", 0, 2.0), "metric_name": "loss"}, {**_rec("dora", 0, 1.5), "metric_name": "loss"}]
    rows = {r["variant"]: r for r in aggregate(loss)["sentiment-minilm"]}
    assert rows["dora"]["vs_base"] == (0.5, 1, 1)


def test_pareto_front_of_metric_against_trainable_parameters():
    def rec(method, params, metric):
        return {**_rec(method, 0, metric), "trainable_params": params}

    recs = [rec("lora", 1000, 0.80), rec("dora", 1000, 0.85),  # same size, better: dora dominates lora
            rec("vera", 100, 0.70),  # smallest: on the front
            rec("nola", 500, 0.60),  # worse than vera with more parameters: dominated
            rec("pela", 5000, 0.90),  # biggest but best: on the front
            rec("bone", 5000, 0.85)]  # as big as pela and worse: dominated
    rows = {r["variant"]: r for r in aggregate(recs)["sentiment-minilm"]}
    assert {v for v, r in rows.items() if r["pareto"]} == {"dora", "vera", "pela"}
    assert not rows["untrained model"]["pareto"]  # a reference line, not a method
