"""Shared helpers for the serving tests: tiny Llama + tokenizer saved to disk, adapters with non-trivial weights."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

import lorakit
from conftest import tiny_llama

VOCAB = 300  # 256 byte tokens + specials + spare


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    from tokenizers.pre_tokenizers import ByteLevel

    for i, ch in enumerate(sorted(ByteLevel.alphabet())):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_base(directory: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    m = tiny_llama(seed=seed, vocab=VOCAB, hidden=hidden, layers=layers, bos_token_id=0, eos_token_id=1,
                   pad_token_id=2)
    with torch.no_grad():  # a sharper LM head: larger logit margins make greedy comparisons robust
        m.lm_head.weight.mul_(4)
    m.config.max_position_embeddings = 256
    m.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return Path(directory)


def load_base(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_adapter(base, out: Path, method: str = "lora", r: int = 4, seed: int = 0, targets="all-linear",
                 scale: float = 0.3, **opts) -> Path:
    """Attach ``method`` to a copy of ``base``, randomise its factors (seeded), save to ``out``."""
    m = copy.deepcopy(base)
    lorakit.attach(m, {"method": method, "targets": targets, "r": r, **opts}, "a")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lorakit.adapters(m, "a"):
            for n, p in a.named_parameters():
                if n.startswith("lora_B") or n.startswith("lora_A"):
                    p.add_(torch.randn(p.shape, generator=g) * scale)
                elif "magnitude" in n:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    lorakit.save_adapter(m, out, "a")
    return Path(out)


def merged_model(base, adapter_dir: Path):
    m = copy.deepcopy(base)
    lorakit.load_adapter(m, adapter_dir, "x")
    return lorakit.merge_and_unload(m)
