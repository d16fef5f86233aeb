"""Incremental detokenization matches a full decode of the output at every step, for the three decoder families
(byte-level BPE with multi-byte characters split over tokens, SentencePiece's metaspace, WordPiece's ##)."""
from __future__ import annotations

import random

import pytest

from lorakit.serve.detok import Detokenizer
from serve.helpers import tiny_tokenizer


def _word_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"]
    if kind == "metaspace":
        words += ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "s", "ing", ".", "▁", ",", "▁a", "at"]
        tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        words += ["the", "cat", "sat", "##s", "##ing", "on", "mat", ".", ",", "a", "##at", "'", "##'"]
        tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def _byte_ids(tok, rng):
    # real multi-byte text cut into single-byte tokens, plus random bytes (invalid UTF-8 on purpose)
    text = rng.choice(["héllo wörld ", "猫が座った。", "emoji 🎉🚀 ok", "plain ascii text. "])
    ids = tok(text)["input_ids"] * 2
    return ids + [rng.randrange(3, 259) for _ in range(rng.randrange(0, 6))] + tok(" end")["input_ids"]


@pytest.mark.parametrize("kind", ["byte-level", "metaspace", "wordpiece"])
def test_incremental_text_equals_full_decode_at_every_step(kind):
    tok = tiny_tokenizer() if kind == "byte-level" else _word_tokenizer(kind)
    rng = random.Random(0)
    for _ in range(40):
        if kind == "byte-level":
            ids = _byte_ids(tok, rng)
        else:  # random word sequences, special tokens (skipped in the text) mixed in
            ids = [rng.randrange(1 if rng.random() < 0.1 else 3, len(tok)) for _ in range(rng.randrange(1, 30))]
        d, streamed = Detokenizer(tok), ""
        for n, t in enumerate(ids, 1):
            streamed += d.add(t)
            full = tok.decode(ids[:n], skip_special_tokens=True)
            assert d.final() == full, (kind, ids[:n])
            assert streamed == d.text and full.startswith(d.text)  # settled text never changes afterwards
            assert not d.text.endswith("\ufffd") or full[len(d.text):] == ""
        assert d.final() == tok.decode(ids, skip_special_tokens=True)


def test_split_emoji_settles_only_when_complete():
    tok = tiny_tokenizer()
    ids = tok("a🎉")["input_ids"]
    assert len(ids) == 5  # 'a' + four bytes
    d = Detokenizer(tok)
    assert d.add(ids[0]) == "a"
    assert [d.add(t) for t in ids[1:4]] == ["", "", ""]  # an incomplete UTF-8 sequence: nothing settles
    assert d.text == "a" and d.final().startswith("a")
    assert d.add(ids[4]) == "🎉" and d.text == "a🎉"


def test_work_per_token_is_bounded():
    calls = []
    tok = tiny_tokenizer()

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tok.decode(ids, **kw)

    d = Detokenizer(Counting())
    for t in tok("a long run of plain ascii text " * 8)["input_ids"]:
        d.add(t)
    assert len(d.text) > 200 and max(calls) <= 2  # windows of a token or two, never the whole output
