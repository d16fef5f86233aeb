"""Streaming detokenization in the serving engine: a full decode of the output after every token (the engine
before, O(n²) per request) against lorakit's incremental :class:`Detokenizer` (O(1) per token), on
SmolLM2-135M-Instruct's tokenizer.

    python bench/detok.py [--tokens 256,1024,2048] [--rows 64]

For each output length it times one request's worth of per-token text updates both ways (same tokens: the model's
own tokenization of a long English + multilingual text) and prints the tokenizer seconds for ``--rows`` such
requests and the ratio. Both produce identical text (asserted).
"""
from __future__ import annotations

import argparse
import time

from transformers import AutoTokenizer

from lorakit.assets import model_path
from lorakit.serve.detok import Detokenizer

TEXT = ("The quick brown fox jumps over the lazy dog; naïve café owners sell crème brûlée. 猫が座った。 🎉 "
        "Parameter-efficient fine-tuning trains a few low-rank matrices instead of the whole model. ") * 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="256,1024,2048")
    ap.add_argument("--rows", type=int, default=64)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    ids_all = tok(TEXT)["input_ids"]
    print(f"{'tokens':>7} {'full decode/step (s)':>21} {'incremental (s)':>16} {'ratio':>7}   (x {a.rows} rows)")
    for n in (int(x) for x in a.tokens.split(",")):
        ids = ids_all[:n]
        t = time.perf_counter()
        for k in range(1, n + 1):
            full = tok.decode(ids[:k], skip_special_tokens=True)
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        d = Detokenizer(tok)
        for i in ids:
            d.add(i)
        t_inc = time.perf_counter() - t
        assert d.final() == full
        print(f"{n:>7} {t_full * a.rows:>21.2f} {t_inc * a.rows:>16.2f} {t_inc / t_full:>7.3f}")


if __name__ == "__main__":
    main()
