"""Tiny local HF models (a word-level tokenizer + a 2-layer Llama / BERT) and tiny data files, built in code."""
from __future__ import annotations

import json
import random

import pytest
import torch

WORDS = ("good great fine nice superb lovely bad awful poor dull boring terrible the movie was plot acting "
         "very quite so and but a it is").split()
POS, NEG = WORDS[:6], WORDS[6:12]
FILLER = WORDS[12:]


def tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"] + list(WORDS) +
                                         ["positive", "negative", "Label", ":", "Q", "A", "1", "2", "3", "4"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                  cls_token="[CLS]", sep_token="[SEP]")
    tok.save_pretrained(path)
    return tok, len(vocab)


def make_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab = "positive" if i % 2 == 0 else "negative"
        words = [rng.choice(POS if lab == "positive" else NEG)] + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": lab})
    return rows


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    tok, v = tiny_tokenizer(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=2,
                      bos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    tok, v = tiny_tokenizer(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    p = d / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_rows(96)))
    return p


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    p = d / "train.jsonl"
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        w = rng.choice(POS + NEG)
        rows.append({"prompt": f"Q {w} :", "completion": "positive" if w in POS else "negative"})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def tiny_cfg(model_dir, data, out, task="classify-lm", **train):
    """A run config dict for the tiny models (few steps, fast)."""
    return {
        "model": {"name": str(model_dir)},
        "adapter": {"method": "lora", "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0},
        "optim": {"lr": 1e-2, "warmup": 0.1},
        "data": {"task": task, "path": str(data), "max_length": 32, "batch_size": 8, "eval_size": 16},
        "train": {"steps": 6, "seed": 0, **train},
        "output": {"dir": str(out)},
    }


def tiny_llama_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
