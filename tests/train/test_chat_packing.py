"""Chat SFT (data.format=messages: loss on assistant turns only) and sample packing (no attention across samples)."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from lorakit import assets
from lorakit.errors import ConfigError
from lorakit.tasks import get_task
from lorakit.tasks.sft import chat_example, check_packing, pack
from lorakit.train import resolve, run_training
from lorakit.train.config import DataSection

from .conftest import NEG, POS, tiny_cfg, tiny_llama_model, tiny_tokenizer

# A word-level template in the tiny vocabulary: "Q : ... [SEP]" for the user, "A : ... [SEP]" for the assistant.
TINY_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q : {% elif m['role'] == 'assistant' %}A : "
                 "{% else %}[CLS] {% endif %}{{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}A : {% endif %}")
# The same with transformers' generation markers: its `assistant_masks` are the reference for our mask.
TINY_TEMPLATE_GEN = TINY_TEMPLATE.replace("{{ m['content'] }} [SEP] ",
                                          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} [SEP] "
                                          "{% endgeneration %}{% else %}{{ m['content'] }} [SEP] {% endif %}")
CHATML_GEN = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
              "<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHAT = [{"role": "system", "content": "the movie"},
        {"role": "user", "content": "good plot"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "awful acting"},
        {"role": "assistant", "content": "negative and dull"}]


def _reference_mask(tok, template, messages):
    enc = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def _check_against_reference(tok, template_plain, template_gen, messages):
    tok.chat_template = template_plain
    ids, labels = chat_example(tok, messages)
    ref_ids, ref_mask = _reference_mask(tok, template_gen, messages)
    assert ids == ref_ids  # the same rendering, tokenized the same way
    assert [int(lab != -100) for lab in labels] == ref_mask
    assert all(lab == t for lab, t in zip(labels, ids) if lab != -100)
    # no user or system text is trained; every assistant content is
    trained = tok.decode([t for t in labels if t != -100])
    for m in messages:
        if m["role"] == "assistant":
            assert m["content"] in trained
    return ids, labels


def test_chat_label_mask_equals_transformers_assistant_mask_tiny(tmp_path):
    tok, _ = tiny_tokenizer(tmp_path)
    _check_against_reference(tok, TINY_TEMPLATE, TINY_TEMPLATE_GEN, CHAT)


def test_chat_label_mask_on_smollm2_tokenizer():
    d = assets.cache_dir() / "models" / "smollm2-135m"
    if not (d / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not prepared (lorakit assets prepare)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    own = tok.chat_template
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5. #### 5"},
            {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "4+4 = 8.\n#### 8"}]
    # SmolLM2's own template has no generation markers; the marked copy renders the same text
    tok.chat_template = own
    assert tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(
        msgs, tokenize=False, chat_template=CHATML_GEN)
    ids, labels = _check_against_reference(tok, own, CHATML_GEN, msgs)
    # the trained runs are exactly "content<|im_end|>\n" of each assistant turn
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == [m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant"]


def test_template_that_rewrites_history_is_refused(tmp_path):
    tok, _ = tiny_tokenizer(tmp_path)
    # drops every turn but the last two: a prefix of the chat does not render as a prefix of the whole
    tok.chat_template = TINY_TEMPLATE.replace("messages %}", "messages[-2:] %}", 1)
    with pytest.raises(ConfigError, match="does not render a conversation's beginning"):
        chat_example(tok, CHAT)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        chat_example(tok, CHAT)


def _examples(tok, n=6, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(POS + NEG) for _ in range(rng.randint(2, 9))]
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
        k = rng.randint(1, len(ids) - 1)
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def _per_sample_nll(logits, labels):
    """Summed next-token NLL of each row's labelled tokens."""
    lp = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                         reduction="none")
    return lp.sum(1)


def test_packed_batch_gives_the_unpacked_per_sample_losses(tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = tiny_llama_model(tiny_lm_dir).eval()
    ex = _examples(tok, 7)
    packed = pack(ex, max_length=24, pad_id=0)
    assert packed["input_ids"].shape[0] < len(ex)  # samples do share rows
    assert packed["input_ids"].shape[1] <= 24
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        # per sample: its own slice of its row
        got, row, col = [], 0, 0
        for e in ex:
            n = len(e["input_ids"])
            if col + n > 24 or (col > 0 and packed["position_ids"][row, col] != 0):
                row, col = row + 1, 0
            assert packed["input_ids"][row, col:col + n].tolist() == e["input_ids"]
            sl = slice(col, col + n)
            got.append(float(_per_sample_nll(logits[row:row + 1, sl], torch.tensor([e["labels"]]))))
            col += n
        want = [float(_per_sample_nll(model(input_ids=torch.tensor([e["input_ids"]])).logits,
                                      torch.tensor([e["labels"]]))) for e in ex]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        # and the model's own (token-mean) loss of the packed batch is that of the padded batch
        task = get_task("sft", DataSection(task="sft", max_length=24))
        task.pad_id = 0
        pad_loss = model(**task.padded(ex)).loss
        pack_loss = model(**{k: v for k, v in packed.items()}).loss
        assert float(pack_loss) == pytest.approx(float(pad_loss), rel=1e-4)
        # without per-sample positions (one run per row) the samples would see each other: the losses differ
        leak = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
        assert abs(float(leak) - float(pad_loss)) > 1e-3


def test_packing_refuses_a_model_that_attends_across_samples(tiny_lm_dir):
    model = tiny_llama_model(tiny_lm_dir).eval()
    check_packing(model, [5, 6, 7, 8, 9])  # honours position ids

    class IgnoresPositions(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, position_ids=None, **kw):
            return self.m(**kw)

    with pytest.raises(ConfigError, match="attends across packed samples"):
        check_packing(IgnoresPositions(model), [5, 6, 7, 8, 9])


@pytest.fixture()
def chat_model_dir(tiny_lm_dir, tmp_path):
    """The tiny Llama with a chat template on its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "chat_llama"
    shutil.copytree(tiny_lm_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TINY_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def chat_data(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        turns = []
        for _ in range(rng.randint(1, 2)):
            w = rng.choice(POS + NEG)
            turns += [{"role": "user", "content": f"{w} movie"},
                      {"role": "assistant", "content": "positive" if w in POS else "negative"}]
        rows.append({"messages": turns})
    p = tmp_path / "chats.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("packing", [False, True])
def test_chat_sft_trains_end_to_end(chat_model_dir, chat_data, tmp_path, packing):
    cfg = tiny_cfg(chat_model_dir, chat_data, tmp_path / "run", task="sft", steps=8)
    cfg["data"].update(format="messages", packing=packing)
    r = run_training(cfg)
    assert r["metrics_after"]["loss"] < r["metrics_before"]["loss"]
    task = get_task("sft", resolve(tmp_path / "run" / "config.yaml").data)
    rows = task.rows()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    ex = task.encode(rows["train"], tok)
    b = task.collate(ex[:8])
    assert ("position_ids" in b) == packing
    # only assistant words are trained
    trained = {tok.decode([t]) for t in b["labels"].flatten().tolist() if t != -100}
    assert trained <= {"positive", "negative", "[SEP]"}


def test_chat_config_and_data_errors(chat_model_dir, chat_data, tmp_path):
    with pytest.raises(ConfigError, match="data.format=messages needs an sft task"):
        resolve(overrides=["data.format=messages"])  # the default task is a classifier
    with pytest.raises(ConfigError, match="data.prompt does not apply"):
        resolve(overrides=["data.task=sft", "data.format=messages", "data.prompt=Q {prompt}"])
    with pytest.raises(ConfigError, match="data.packing=true needs an sft task"):
        resolve(overrides=["data.packing=true"])
    with pytest.raises(ConfigError, match="format"):
        resolve(overrides=["data.task=sft", "data.format=chat"])
    bad = tmp_path / "bad.jsonl"
    for rows, match in [([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
                        ([{"messages": [{"role": "robot", "content": "hi"}]}], "role 'robot'"),
                        ([{"messages": "not json"}], "not a JSON list"),
                        ([{"messages": [{"role": "user"}]}], "string 'role' and 'content'"),
                        ([{"prompt": "x"}], "no column 'messages'")]:
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
        cfg = tiny_cfg(chat_model_dir, bad, tmp_path / "bad", task="sft")
        cfg["data"]["format"] = "messages"
        with pytest.raises(ConfigError, match=match):
            run_training(cfg)


def test_gsm8k_rows_become_one_turn_chats():
    try:
        assets.load_dataset("gsm8k")
    except Exception:
        pytest.skip("GSM8K package not installed")
    t = get_task("gsm8k-smollm2", DataSection(task="gsm8k-smollm2", format="messages", train_size=3, eval_size=2))
    rows = t.rows()
    plain = get_task("gsm8k-smollm2", DataSection(task="gsm8k-smollm2", train_size=3, eval_size=2)).rows()
    assert [r["messages"] for r in rows["train"]] == [
        [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]
        for p in plain["train"]]
