"""DPO as a task kind of `lorakit train` (reference = the same model under lorakit.disabled), the GSM8K preference
set, and TRL's DPOTrainer on a lorakit-adapted model."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import lorakit
from lorakit import assets
from lorakit.errors import ConfigError
from lorakit.tasks import get_task
from lorakit.tasks.dpo import corrupt_answer
from lorakit.tasks.sft import final_number
from lorakit.train import resolve, run_training
from lorakit.train.config import DataSection

from .conftest import FILLER, NEG, POS, tiny_cfg, tiny_llama_model


def _pairs(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(POS + NEG)
        good, bad = ("positive", "negative") if w in POS else ("negative", "positive")
        rows.append({"prompt": f"Q {w} {rng.choice(FILLER)} :", "chosen": good, "rejected": bad})
    return rows


@pytest.fixture()
def pref_data(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _pairs(64)))
    return p


def _manual_logp(model, prompt_ids, completion_ids):
    """log π(completion | prompt), one token at a time from the full-sequence logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for k, t in enumerate(completion_ids):
        pos = len(prompt_ids) + k - 1  # the logits at pos predict token pos + 1
        row = logits[pos]
        total += float(row[t] - torch.logsumexp(row, 0))
    return total


def test_dpo_loss_matches_the_formula_with_the_base_as_reference(tiny_lm_dir, pref_data):
    from transformers import AutoTokenizer

    beta = 0.3
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    task = get_task("dpo", DataSection(task="dpo", path=str(pref_data), dpo_beta=beta, max_length=32))
    ex = task.encode(task.rows()["train"][:5], tok)
    base = tiny_llama_model(tiny_lm_dir).eval()
    model = tiny_llama_model(tiny_lm_dir).eval()
    lorakit.attach(model, {"method": "lora", "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or ".B" in n or p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # policy != reference
    with torch.no_grad():
        loss = float(task.loss(model, task.collate(ex)))
        terms = []
        for e in ex:
            pc, pr = _manual_logp(model, e["prompt"], e["chosen"]), _manual_logp(model, e["prompt"], e["rejected"])
            rc, rr = _manual_logp(base, e["prompt"], e["chosen"]), _manual_logp(base, e["prompt"], e["rejected"])
            z = beta * ((pc - rc) - (pr - rr))
            terms.append(-math.log(1 / (1 + math.exp(-z))))
    assert abs(sum(terms) / len(terms) - math.log(2)) > 1e-3  # the adapters do move the policy
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    # and with the adapters disabled the policy is the reference: rewards 0, loss log 2
    with torch.no_grad(), lorakit.disabled(model):
        assert float(task.loss(model, task.collate(ex))) == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_training_raises_the_reward_margin(tiny_lm_dir, pref_data, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, pref_data, tmp_path / "run", task="dpo", steps=8)
    cfg["optim"]["lr"] = 2e-2
    cfg["data"]["dpo_beta"] = 0.5
    r = run_training(cfg)
    before, after = r["metrics_before"], r["metrics_after"]
    assert before["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # no adapter yet: policy = reference
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["rewards/margin"] > 0.1 and after["loss"] < before["loss"]
    assert after["rewards/accuracy"] > 0.5
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    margins = [s["rewards/margin"] for s in steps if s["event"] == "train"]
    assert len(margins) == 8
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.05  # rises over the run
    # the reward statistics are consistent: margin = chosen − rejected
    last = [s for s in steps if s["event"] == "train"][-1]
    assert last["rewards/margin"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-5)


def test_dpo_config_and_data_errors(tiny_lm_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.dpo_beta=0.0 must be > 0"):
        resolve(overrides=["data.task=dpo", "data.dpo_beta=0"])
    with pytest.raises(ConfigError, match="data.format=messages needs an sft task"):
        resolve(overrides=["data.task=dpo", "data.format=messages"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": "Q", "chosen": "a"}) + "\n" for _ in range(8)))
    with pytest.raises(ConfigError, match="no column 'rejected'"):
        run_training(tiny_cfg(tiny_lm_dir, bad, tmp_path / "o", task="dpo"))
    bad.write_text("".join(json.dumps({"prompt": "Q", "chosen": "good", "rejected": "good"}) + "\n"
                           for _ in range(8)))
    with pytest.raises(ConfigError, match="chosen and rejected are the same"):
        run_training(tiny_cfg(tiny_lm_dir, bad, tmp_path / "o", task="dpo"))


def test_corrupt_answer_changes_the_final_number_everywhere():
    ans = "He pays 250 + 250 = <<250+250=500>>500 dollars.\nSo 500 in all, not 5001.\n#### 500"
    bad = corrupt_answer(ans, "q1")
    assert bad == corrupt_answer(ans, "q1")  # deterministic
    w = final_number(bad)
    assert w != "500" and "5001" in bad and bad.count(w) == 4  # 5001 is another number: kept
    assert bad.replace(w, "500") == ans  # only the final number changed
    assert corrupt_answer("no number here", "q") is None


def test_gsm8k_preference_pairs():
    try:
        assets.load_dataset("gsm8k")
    except Exception:
        pytest.skip("GSM8K package not installed")
    t = get_task("gsm8k-dpo-smollm2", DataSection(task="gsm8k-dpo-smollm2", train_size=50, eval_size=20))
    rows = t.rows()
    assert len(rows["train"]) >= 45 and rows["eval"]
    for r in rows["train"]:
        assert final_number(r["chosen"]) != final_number(r["rejected"])
        assert r["chosen"].split("####")[0].count("\n") == r["rejected"].split("####")[0].count("\n")


def _trl_trainer(trl, model, tok, ds, out):
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=8, max_steps=12, learning_rate=5e-3,
                         lr_scheduler_type="constant", beta=0.5, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                         save_strategy="no", precompute_ref_log_probs=True, disable_tqdm=True)
    with lorakit.disabled(model):  # the reference log-probs are computed here, by the base model alone
        return trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


TRL_TARGETS = {"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "r": 4,
               "alpha": 8, "seed": 0}


def test_trl_dpo_trainer_on_a_lorakit_model_with_the_disabled_model_as_reference(tiny_lm_dir, tmp_path):
    """The recipe of docs/training.md: build TRL's DPOTrainer inside `lorakit.disabled(model)` with
    `precompute_ref_log_probs=True`, so the reference log-probs are the base model's and no copy is loaded."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ds = datasets.Dataset.from_list([{**r, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
                                     for r in _pairs(32)])
    base = tiny_llama_model(tiny_lm_dir).eval()

    # 1. the precomputed reference is the base even when the adapter is not at its no-op init
    model = tiny_llama_model(tiny_lm_dir)
    lorakit.attach(model, TRL_TARGETS)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(20 * torch.randn_like(p))
    n_params = sum(p.numel() for p in model.parameters())
    trainer = _trl_trainer(trl, model, tok, ds, tmp_path / "trl0")
    assert trainer.ref_model is None  # no second model
    assert sum(p.numel() for p in model.parameters()) == n_params
    for row in [trainer.train_dataset[i] for i in range(3)]:
        prompt = row["prompt_ids"] if "prompt_ids" in row else tok(row["prompt"])["input_ids"]
        for key, ref_key in (("chosen", "ref_chosen_logps"), ("rejected", "ref_rejected_logps")):
            ids = row[f"{key}_ids"] if f"{key}_ids" in row else tok(row[key], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                want = _manual_logp(base, list(prompt), list(ids))
                policy = _manual_logp(model, list(prompt), list(ids))
                assert row[ref_key] == pytest.approx(want, abs=2e-3)  # TRL stores them at reduced precision
                assert abs(policy - want) > 1e-2  # and they are not the policy's

    # 2. training a fresh adapter raises the reward margin and changes only adapter parameters
    model = tiny_llama_model(tiny_lm_dir)
    lorakit.attach(model, TRL_TARGETS)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _trl_trainer(trl, model, tok, ds, tmp_path / "trl1")
    trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(margins) == 12 and sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.05
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(trainable)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    base_sd = base.state_dict()
    for n, p in model.named_parameters():
        if n not in trainable and n in base_sd:
            assert torch.equal(p, base_sd[n]), n  # the base is untouched
    # the trained adapter is a lorakit adapter: it saves in PEFT's format
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
